// Undoing a snapshot creation that made its disks and files but whose metadata is not in the
// store: after a crash (recovery, ./recovery.ts) and when the store refuses the metadata while the
// daemon lives (./create.ts). Writes nothing to the store.
import { existsSync } from 'node:fs'
import { rm } from 'node:fs/promises'
import type { Logger } from 'pino'
import type { QmpClient } from '../qmp/index.ts'
import type { SnapshotDeps } from './deps.ts'
import { undoLiveOverlays } from './external.ts'
import { deleteTagsLive } from './internal.ts'
import type { CreatePlan } from './plan.ts'

/**
 * Undoes everything a creation made: internal tags deleted (live or with qemu-img); live overlays
 * committed back into their backing and pivoted (the guest's writes since are kept); overlays of a
 * QEMU that died committed back offline; overlays and the RAM state file removed unless a record
 * names them. `qmp` is the VM's running QEMU, if any. Returns what was undone, for the log.
 */
export async function undoCreate(d: SnapshotDeps, vm: string, plan: CreatePlan, qmp: QmpClient | undefined, ctx: { id: string; log: Logger }): Promise<string[]> {
  const s = plan.snapshot
  const undone: string[] = []
  const captured = s.disks.filter((x) => x.mode !== 'excluded')
  if (s.kind === 'internal') {
    if (qmp) undone.push(...(await deleteTagsLive(qmp, s.name, captured.map((x) => x.file), ctx)))
    else {
      for (const x of captured) {
        const info = await d.qemuImg.chain(x.file).catch(() => [])
        if (!info[0]?.snapshots?.some((t) => t.name === s.name)) continue
        await d.qemuImg.snapshot('delete', x.file, s.name)
        undone.push(x.file)
      }
    }
    return undone
  }
  if (qmp) await undoLiveOverlays(d, qmp, plan, ctx)
  for (const o of plan.overlays) {
    const known = d.repo.images(vm).some((i) => i.file === o.overlay) || d.vms.record(vm).runtime.disks.some((x) => x.file === o.overlay)
    if (known) continue
    // QEMU died after it switched to the overlay: the guest's last writes are in it. Merge them
    // down into the image the store still names (a no-op for an overlay nobody wrote to).
    if (!qmp && s.vmState !== 'shutoff' && (await backedBy(d, o.overlay, o.file))) await d.qemuImg.commit(o.overlay, o.file)
    await rm(o.overlay, { force: true })
    undone.push(o.overlay)
  }
  if (s.vmstateFile && !d.repo.list(vm).some((x) => x.vmstateFile === s.vmstateFile)) {
    await rm(s.vmstateFile, { force: true })
    undone.push(s.vmstateFile)
  }
  return undone
}

/** True when `file` is a qcow2 whose backing file is `backing`. */
export async function backedBy(d: SnapshotDeps, file: string, backing: string): Promise<boolean> {
  if (!existsSync(file)) return false
  const info = await d.qemuImg.chain(file, { forceShare: true }).catch(() => [])
  return info[0]?.format === 'qcow2' && (info[0]['full-backing-filename'] ?? info[0]['backing-filename']) === backing
}
