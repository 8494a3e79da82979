import { topNodes } from '../images/graph.ts'
import type { JobContext } from '../jobs/manager.ts'
import { driveQemuJob } from '../jobs/qemu-job.ts'
import { withReverter } from '../jobs/reverter.ts'
import type { TransactionAction } from '../qmp/index.ts'
import { trackDowntime } from '../vm/downtime.ts'
import type { Live, SnapshotDeps } from './deps.ts'
import { diskSwitch, transaction } from './disk-switch.ts'
import type { CreatePlan } from './plan.ts'

/**
 * Creates an internal snapshot (tags inside the qcow2 disks): offline with qemu-img, live with
 * blockdev-snapshot-internal-sync (disk-only) or snapshot-save (a checkpoint, RAM in the vmstate
 * disk). Returns the guest's downtime in ms.
 */
export async function createInternal(d: SnapshotDeps, vm: string, plan: CreatePlan, live: Live | undefined, ctx: JobContext): Promise<number> {
  const s = plan.snapshot
  const captured = s.disks.filter((x) => x.mode === 'internal')
  if (!live) {
    await withReverter(ctx.log, async (r) => {
      for (const disk of captured) {
        await d.qemuImg.snapshot('create', disk.file, s.name)
        r.add(`delete tag in ${disk.file}`, () => d.qemuImg.snapshot('delete', disk.file, s.name))
      }
    })
    return 0
  }
  const nodes = await topNodes(live.qmp, captured.map((x) => x.id))
  if (!s.memory) {
    const actions: TransactionAction[] = captured.map((x) => ({
      type: 'blockdev-snapshot-internal-sync',
      data: { device: nodes.get(x.id)!, name: s.name },
    }))
    await diskSwitch(d, vm, s, ctx, () => transaction(d, live.qmp, actions))
    return 0
  }
  // snapshot-save stops the guest for the whole RAM write, on QEMU's side; measure it.
  const dt = trackDowntime(live.qmp)
  const jobId = `qmpd-save-${ctx.id.slice(0, 8)}`
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
  return dt.end()
}
