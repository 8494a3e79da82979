// External snapshots: overlays and RAM state files, live or offline; no journal writes of its own.
import { rmSync } from 'node:fs'
import { commit } from '../chain/editor.ts'
import { liveChain, noteTopNodes, topNodes } from '../images/graph.ts'
import type { JobContext } from '../jobs/manager.ts'
import { withReverter } from '../jobs/reverter.ts'
import type { Operation } from '../ops/journal.ts'
import type { QmpClient, TransactionAction } from '../qmp/index.ts'
import { fileMigrationSupport } from '../state/filemig.ts'
import { resumeOnceTracking } from './bg-resume.ts'
import { saveRamState, stateSocket } from '../state/ramfile.ts'
import { trackDowntime } from '../vm/downtime.ts'
import { isAdopted } from '../vm/definition.ts'
import type { Live, SnapshotDeps } from './deps.ts'
import { diskSwitch, transaction } from './disk-switch.ts'
import { qemuGone, reserveFile, reserveFiles } from './files.ts'
import type { CreateSnapshotBody, Snapshot } from './model.ts'
import type { CreatePlan } from './plan.ts'

/** QMP sessions whose QEMU accepted the background-snapshot capability. */
const backgroundSnapshotSupport = new WeakSet<QmpClient>()

/**
 * Creates an external snapshot: offline, a qcow2 overlay per disk with qemu-img; live, the
 * overlays in one QEMU transaction, and with memory the RAM state to a file (background-snapshot,
 * pre-copy with the disk switch in the final pause, or a paused checkpoint). Records how RAM was
 * captured in `ram`; returns the guest's downtime in ms.
 */
export async function createExternal(
  d: SnapshotDeps,
  vm: string,
  plan: CreatePlan,
  live: Live | undefined,
  ctx: JobContext,
  body: CreateSnapshotBody,
  ram: { method?: Snapshot['ramMethod']; format?: Snapshot['ramFormat'] },
  op: Operation,
): Promise<number> {
  const s = plan.snapshot
  if (!live) {
    await op.step('overlays', () =>
      withReverter(ctx.log, async (r) => {
        for (const o of plan.overlays) {
          await reserveFile(o.overlay)
          r.add(`remove ${o.overlay}`, () => rmSync(o.overlay, { force: true }))
          await d.qemuImg.create(o.overlay, 'qcow2', { backing: { file: o.file, format: o.format } })
          await d.overlayExtras?.offline(vm, o.id, o.overlay)
        }
      }),
    )
    return 0
  }
  const { qmp } = live
  return withReverter(ctx.log, async (r) => {
    // Reserve the names (O_EXCL): QEMU's blockdev-snapshot-sync would silently overwrite a file.
    await op.step('reserve', () => reserveFiles(plan.overlays.map((o) => o.overlay), r))
    const nodes = await topNodes(qmp, plan.overlays.map((o) => o.id))
    const gens = new Map(d.vms.record(vm).runtime.disks.map((x) => [x.id, x.gen]))
    const newNode = (disk: string): string => `${disk}-f${(gens.get(disk) ?? 0) + 1}`
    const actions: TransactionAction[] = plan.overlays.map((o) => ({
      type: 'blockdev-snapshot-sync',
      data: {
        'node-name': nodes.get(o.id)!,
        'snapshot-file': o.overlay,
        'snapshot-node-name': newNode(o.id),
        format: 'qcow2',
        // Absolute backing paths in every overlay: the chain opens the same from any cwd.
        mode: 'absolute-paths',
      },
    }))
    if (actions.length > 0 && d.overlayExtras) actions.push(...d.overlayExtras.live(vm, plan.overlays.map((o) => ({ disk: o.id, node: newNode(o.id) }))))
    const diskTransaction = async (): Promise<void> => {
      if (actions.length === 0) return
      const epoch = qmp.graphEpoch
      await op.step('transaction', () => transaction(d, qmp, actions))
      noteTopNodes(qmp, epoch, new Map(plan.overlays.map((o) => [o.id, newNode(o.id)])))
      r.add('merge the new overlays back', async () => {
        if (!qemuGone(d, vm)) return undoLiveOverlays(d, qmp, plan, ctx)
        // QEMU died after the switch: the guest's last writes are in the overlays. Merge them
        // down offline into the images the store still names before the overlays are removed.
        for (const o of plan.overlays) await d.qemuImg.commit(o.overlay, o.file).catch((err: unknown) => ctx.log.warn({ err, overlay: o.overlay }, 'offline merge back failed'))
      })
    }
    if (!s.memory) {
      await diskSwitch(d, vm, s, ctx, diskTransaction)
      return 0
    }
    const ramFile = {
      file: s.vmstateFile!,
      // An adopted QEMU's cwd is its owner's: it gets the socket's absolute path.
      socket: stateSocket(d.paths.vmDir(vm), !isAdopted(d.vms.record(vm).definition)),
      log: ctx.log,
      onProgress: (c: number, t: number) => ctx.setProgress(c, t),
      onMigrating: () => op.point('save-ram.migrating'),
    }
    const dt = trackDowntime(qmp)
    r.add('measure', () => dt.end())
    if (body.live && live.running) {
      if (await backgroundSnapshotUsable(d, qmp, ctx)) {
        // Stop, switch disks, then a background-snapshot migration resumes the guest at once and
        // writes RAM as it was at the stop: disks and RAM are from one instant. Migration
        // capabilities and parameters are set before the stop (saveRamState's beforeMigrate).
        ram.method = 'background-snapshot'
        ram.format = 'stream'
        await op.step('save-ram', () =>
          saveRamState(qmp, {
            ...ramFile,
            background: true,
            // QEMU 9+ keeps a guest stopped before `migrate` paused throughout (see bg-resume.ts).
            onMigrating: async () => {
              await ramFile.onMigrating()
              await resumeOnceTracking(qmp, () => d.vms.contInJob(vm))
            },
            beforeMigrate: async () => {
              await op.step('stop', () => d.vms.stopInJob(vm))
              r.add('resume the guest', () => qmp.execute('cont').catch(() => {}))
              await diskTransaction()
            },
          }),
        )
        // The RAM file is whole now; if resuming fails (QEMU died), the snapshot is undone with it.
        r.add(`remove ${s.vmstateFile!}`, () => rmSync(s.vmstateFile!, { force: true }))
        const st = await qmp.execute('query-status')
        if (!st.running) await d.vms.contInJob(vm)
        return dt.end()
      }
      ctx.log.info('background-snapshot unavailable (no userfaultfd write-protect); pre-copy with the disk switch in the final pause')
      ram.method = 'precopy'
      ram.format = 'stream'
      let downtimeMs = 0
      await op.step('save-ram', () =>
        saveRamState(qmp, {
          ...ramFile,
          beforeSwitchover: diskTransaction,
          afterTransfer: async () => {
            await d.vms.contInJob(vm)
            downtimeMs = dt.end()
          },
        }),
      )
      return downtimeMs
    }
    // Paused checkpoint: the guest stays stopped while RAM is written, then the disks switch, so
    // a failure of either leaves the other untouched.
    ram.method = 'paused'
    if (live.running) {
      await op.step('stop', () => d.vms.stopInJob(vm))
      r.add('resume the guest', () => d.vms.contInJob(vm).catch(() => {}))
    }
    let downtimeMs = 0
    await op.step('save-ram', async () => {
      const saved = await saveRamState(qmp, {
        ...ramFile,
        // RAM is all in the file (not yet flushed): switch the disks and let the guest go; the
        // fsync that follows does not keep it paused.
        afterTransfer: async () => {
          await diskTransaction()
          if (live.running) await op.step('cont', () => d.vms.contInJob(vm))
          else d.vms.markPaused(vm)
          downtimeMs = dt.end()
        },
      })
      ram.format = saved.format
    })
    return downtimeMs
  })
}

/** Probes background-snapshot (userfaultfd write-protect) by setting the capability; leaves it off. */
async function backgroundSnapshotUsable(d: SnapshotDeps, qmp: QmpClient, ctx: JobContext): Promise<boolean> {
  if (d.hooks?.backgroundSnapshot === false) return false
  // Once QEMU has accepted it, it will again: the host's userfaultfd write-protect does not go
  // away while a QEMU runs. A refusal is not kept (QEMU also refuses while a migration ends).
  if (backgroundSnapshotSupport.has(qmp)) return true
  try {
    // A mapped-ram save or load on this QEMU leaves multifd and mapped-ram on, and QEMU refuses
    // background-snapshot beside either (migration/options.c migrate_caps_check): switched off in
    // the same call, or the probe would report "unavailable" after every mapped-ram restore.
    const off = (await fileMigrationSupport(qmp)) ? [{ capability: 'mapped-ram' as const, state: false }, { capability: 'multifd' as const, state: false }] : []
    await qmp.execute('migrate-set-capabilities', { capabilities: [...off, { capability: 'background-snapshot', state: true }] })
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: false }] })
  } catch (err) {
    ctx.log.debug({ err }, 'background-snapshot probe failed')
    return false
  }
  backgroundSnapshotSupport.add(qmp)
  return true
}

/** Rolls the live overlays of a failed creation back: commit each into its backing and pivot. */
export async function undoLiveOverlays(d: SnapshotDeps, qmp: QmpClient, plan: CreatePlan, ctx: { id: string; log: JobContext['log'] }): Promise<void> {
  for (const o of plan.overlays) {
    const chain = await liveChain(qmp, o.id)
    if (chain[0]?.file !== o.overlay || !chain[1]) continue
    const jobId = `qmpd-undo-${o.id}-${ctx.id.slice(0, 8)}`
    await commit(d, { disk: o.id, qmp, layers: chain, top: 0, base: 1, job: { jobId, log: ctx.log } })
  }
}
