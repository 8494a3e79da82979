// Internal snapshots: tags in the qcow2s (transaction, snapshot-save, qemu-img); no journal writes
// of its own.
import { topNodes } from '../images/graph.ts'
import type { JobContext } from '../jobs/manager.ts'
import { driveQemuJob } from '../jobs/qemu-job.ts'
import { withReverter } from '../jobs/reverter.ts'
import type { Operation } from '../ops/journal.ts'
import type { QmpClient, TransactionAction } from '../qmp/index.ts'
import { trackDowntime } from '../vm/downtime.ts'
import type { Live, SnapshotDeps } from './deps.ts'
import { diskSwitch, transaction } from './disk-switch.ts'
import { qemuGone } from './files.ts'
import type { CreatePlan } from './plan.ts'

/**
 * Creates an internal snapshot (tags inside the qcow2 disks): offline with qemu-img, live with
 * blockdev-snapshot-internal-sync (disk-only) or snapshot-save (a checkpoint, RAM in the vmstate
 * disk). Returns the guest's downtime in ms.
 */
export async function createInternal(d: SnapshotDeps, vm: string, plan: CreatePlan, live: Live | undefined, ctx: JobContext, o: Operation): Promise<number> {
  const s = plan.snapshot
  const captured = s.disks.filter((x) => x.mode === 'internal')
  if (!live) {
    await o.step('tags', () =>
      withReverter(ctx.log, async (r) => {
        for (const disk of captured) {
          await d.qemuImg.snapshot('create', disk.file, s.name)
          r.add(`delete tag in ${disk.file}`, () => d.qemuImg.snapshot('delete', disk.file, s.name))
        }
      }),
    )
    return 0
  }
  const nodes = await topNodes(live.qmp, captured.map((x) => x.id))
  if (!s.memory) {
    const actions: TransactionAction[] = captured.map((x) => ({
      type: 'blockdev-snapshot-internal-sync',
      data: { device: nodes.get(x.id)!, name: s.name },
    }))
    await diskSwitch(d, vm, s, ctx, () => o.step('transaction', () => transaction(d, live.qmp, actions)))
    return 0
  }
  // snapshot-save stops the guest for the whole RAM write, on QEMU's side; measure it.
  const dt = trackDowntime(live.qmp)
  const jobId = `qmpd-save-${ctx.id.slice(0, 8)}`
  await o.step('snapshot-save', () => withReverter(ctx.log, async (r) => {
  // A snapshot-save that fails part-way may leave the tag in some disks (QEMU does not remove
  // it): undo removes whatever tag of this name is there, so a retry of the name can succeed.
  r.add('delete tags left by a failed snapshot-save', async () => {
    if (!qemuGone(d, vm)) return deleteTagsLive(live.qmp, s.name, captured.map((x) => x.file), ctx)
    // QEMU died during the save: the images are free, and qemu-img removes what it left.
    for (const x of captured) {
      const info = await d.qemuImg.chain(x.file).catch(() => [])
      if (info[0]?.snapshots?.some((t) => t.name === s.name)) await d.qemuImg.snapshot('delete', x.file, s.name)
    }
    return []
  })
  await driveQemuJob(
    live.qmp,
    jobId,
    () =>
      live.qmp.execute('snapshot-save', {
        'job-id': jobId,
        tag: s.name,
        vmstate: nodes.get(s.vmstateDisk!)!,
        devices: captured.map((x) => nodes.get(x.id)!),
      }),
    { log: ctx.log, onProgress: (c, t) => ctx.setProgress(c, t), manualFinalize: false },
  )
  }))
  return dt.end()
}

/**
 * Deletes the internal snapshot `tag` from every image in `files` that a running QEMU has open
 * and that holds it (blockdev-snapshot-delete-internal-sync per format node); images without it
 * are left alone (deleting a missing tag is an error there).
 */
export async function deleteTagsLive(qmp: QmpClient, tag: string, files: string[], ctx: { log: JobContext['log'] }): Promise<string[]> {
  const done: string[] = []
  for (const n of await qmp.execute('query-named-block-nodes', { flat: true })) {
    const snaps = (n.image as { snapshots?: Array<{ name: string }> }).snapshots ?? []
    if (!n['node-name'] || !files.includes(n.file) || !snaps.some((x) => x.name === tag) || done.includes(n.file)) continue
    await qmp.execute('blockdev-snapshot-delete-internal-sync', { device: n['node-name'], name: tag })
    ctx.log.info({ file: n.file, tag }, 'deleted an internal snapshot tag')
    done.push(n.file)
  }
  return done
}
