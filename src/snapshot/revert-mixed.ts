// Revert to an internal snapshot whose tag is in an image that is no longer the active layer (a VM
// with external snapshots too): steps of the revert's journaled program; never writes a frozen image.
import { constants, copyFileSync, openSync, fsyncSync, closeSync, rmSync } from 'node:fs'
import { dirname } from 'node:path'
import { ensureBaseImages, formatOf, removeIfUnneeded } from '../chain/graph.ts'
import { QmpdError } from '../errors.ts'
import { topNodes } from '../images/graph.ts'
import type { JobContext } from '../jobs/manager.ts'
import { driveQemuJob } from '../jobs/qemu-job.ts'
import { withReverter } from '../jobs/reverter.ts'
import type { Operation } from '../ops/journal.ts'
import { trackDowntime } from '../vm/downtime.ts'
import type { SnapshotDeps } from './deps.ts'
import { reserveFile, uniqueFile } from './files.ts'
import { deleteTagsLive } from './internal.ts'
import { tagPlacements } from './mixed.ts'
import type { Snapshot } from './model.ts'
import { definitionRestore, recordRevert } from './revert-definition.ts'
import type { RevertJournal } from './revert.ts'

/** True when some captured disk of internal snapshot `s` has its tag outside the active layer. */
export function needsMixedRevert(deps: SnapshotDeps, vm: string, s: Snapshot): boolean {
  return s.kind === 'internal' && [...tagPlacements(deps, vm, s).values()].some((p) => p !== 'active')
}

/**
 * Reverts to internal snapshot `s` when a tag is in an image an external snapshot froze or a revert
 * left: QEMU quits; a tagged image nothing else reads becomes the active layer again as it is
 * ('in-place'); a frozen one is copied whole (reflink when the filesystem can) and the copy becomes
 * the active layer ('copy'), its other tags dropped; the tag is applied there (qemu-img snapshot -a,
 * or snapshot-load for a checkpoint) and dropped from a copy. Every step is safe to run again from
 * the start (recovery does), and the names of the copies are in the journal before they exist.
 * Returns the guest's downtime for a checkpoint loaded live, else undefined.
 */
export async function revertMixed(
  deps: SnapshotDeps,
  vm: string,
  s: Snapshot,
  target: 'running' | 'paused' | 'shutoff',
  ctx: JobContext,
  o: Operation,
  j: RevertJournal,
): Promise<number | undefined> {
  const placements = tagPlacements(deps, vm, s)
  const captured = s.disks.filter((x) => x.mode === 'internal')
  const dir = deps.paths.vmDir(vm)
  const copies = new Map<string, string>()
  for (const x of captured) if (placements.get(x.id) === 'copy') copies.set(x.id, uniqueFile(dir, `${x.id}-${s.name}-r`, '.qcow2', [...copies.values()]))
  const loadRam = s.memory && target !== 'shutoff'
  // Disks the snapshot's definition no longer holds keep their files (as in an external revert).
  const rec = deps.vms.record(vm)
  const leftBehind = definitionRestore(rec.definition, rec.runtime.disks, s)?.leftBehind ?? []
  const before = rec.runtime.disks.filter((x) => !leftBehind.includes(x.id))
  await o.step('quit', () => deps.vms.quitInJob(vm, ctx))
  await o.step(
    'copy',
    () =>
      withReverter(ctx.log, async (r) => {
        for (const x of captured) {
          const file = copies.get(x.id)
          if (!file) continue
          await reserveFile(file)
          r.add(`remove ${file}`, () => rmSync(file, { force: true }))
          copyFileSync(x.file, file, constants.COPYFILE_FICLONE)
          await settleCopy(deps, vm, x.file, file, s.name)
        }
      }),
    { body: { ...j, overlays: [...copies.values()] } },
  )
  // The file each captured disk runs on from now on: its copy, or the tagged image itself.
  const fileOf = (id: string): string | undefined => {
    const x = captured.find((y) => y.id === id)
    return x ? (copies.get(id) ?? x.file) : undefined
  }
  if (!loadRam) {
    await o.step('apply', async () => {
      for (const x of captured) await deps.qemuImg.snapshot('apply', fileOf(x.id)!, s.name)
    })
    await o.step('untag', async () => {
      for (const file of copies.values()) await deps.qemuImg.snapshot('delete', file, s.name)
    })
    await o.step('commit', () => switchRecords(deps, vm, s, copies, fileOf, true))
    await cleanup(deps, vm, before, ctx, o)
    if (target !== 'shutoff') {
      await o.step('launch', () => deps.vms.launchInJob(vm, ctx))
      if (target === 'running') await o.step('cont', () => deps.vms.contInJob(vm))
    }
    return undefined
  }
  // snapshot-load reads the tag from the nodes QEMU runs on: they must be the active layers first.
  await o.step('switch', () => switchRecords(deps, vm, s, copies, fileOf, false))
  const qmp = await o.step('launch', () => deps.vms.launchInJob(vm, ctx))
  const nodes = await topNodes(qmp, captured.map((x) => x.id))
  const dt = trackDowntime(qmp)
  const jobId = `qmpd-load-${ctx.id.slice(0, 8)}`
  await o.step('snapshot-load', () =>
    driveQemuJob(qmp, jobId, () => qmp.execute('snapshot-load', { 'job-id': jobId, tag: s.name, vmstate: nodes.get(s.vmstateDisk!)!, devices: captured.map((x) => nodes.get(x.id)!) }), {
      log: ctx.log,
      onProgress: (c, t) => ctx.setProgress(c, t),
      manualFinalize: false,
    }),
  )
  await o.step('untag', () => deleteTagsLive(qmp, s.name, [...copies.values()], ctx))
  await o.step('commit', () => recordRevert(deps, vm, s, () => ({ currentSnapshot: s.name })))
  await cleanup(deps, vm, before, ctx, o)
  if (target === 'running') await o.step('cont', () => deps.vms.contInJob(vm))
  else deps.vms.markPaused(vm)
  return dt.end()
}

/**
 * Makes a fresh copy `file` of tagged image `src` stand on its own: its backing named by absolute
 * path (a relative name in the header would resolve against another directory), the tags of
 * other snapshots dropped (they stay in `src`, where the records name them), and on disk (fsync)
 * before any record names it.
 */
async function settleCopy(deps: SnapshotDeps, vm: string, src: string, file: string, keep: string): Promise<void> {
  const images = deps.repo.images(vm)
  const backing = images.find((i) => i.file === src)?.backing
  if (backing) await deps.qemuImg.rebase(file, { file: backing, format: formatOf(images, backing) }, { unsafe: true })
  const info = await deps.qemuImg.chain(file)
  for (const tag of info[0]?.snapshots ?? []) if (tag.name !== keep) await deps.qemuImg.snapshot('delete', file, tag.name)
  for (const f of [file, dirname(file)]) {
    const fd = openSync(f, 'r')
    try {
      fsyncSync(fd)
    } finally {
      closeSync(fd)
    }
  }
}

/** One transaction: the copies join the image graph and the captured disks run on their new files. */
function switchRecords(deps: SnapshotDeps, vm: string, s: Snapshot, copies: Map<string, string>, fileOf: (id: string) => string | undefined, current: boolean): void {
  deps.repo.tx(() => {
    ensureBaseImages(deps, vm)
    const images = deps.repo.images(vm)
    for (const [id, file] of copies) {
      const src = s.disks.find((x) => x.id === id)!.file
      deps.repo.putImage({ vm, disk: id, file, format: 'qcow2', backing: images.find((i) => i.file === src)?.backing ?? null, createdByQmpd: true })
    }
    recordRevert(deps, vm, s, (base) => ({
      disks: base.map((d) => {
        const file = fileOf(d.id)
        return file && file !== d.file ? { ...d, file, format: 'qcow2' as const, gen: d.gen + 1 } : d
      }),
      ...(current ? { currentSnapshot: s.name } : {}),
    }))
  })
}

/** The layers the guest ran on before the revert go when nothing needs them (their tags keep the others). */
async function cleanup(deps: SnapshotDeps, vm: string, before: Array<{ file: string }>, ctx: JobContext, o: Operation): Promise<void> {
  await o.step('cleanup', () => {
    for (const d of before) removeIfUnneeded(deps, vm, d.file, ctx)
  })
}

/** A revert to internal snapshot `s` cannot start: a tagged image is missing. */
export function assertTaggedImages(s: Snapshot, exists: (f: string) => boolean): void {
  for (const x of s.disks.filter((y) => y.mode === 'internal')) {
    if (!exists(x.file)) throw new QmpdError('INVALID_STATE', `snapshot ${s.name}: image ${x.file} of disk ${x.id}, which holds its tag, is missing`, { file: x.file })
  }
}
