// The image graph qmpd keeps (images table): which files are needed and which may be deleted; reads
// QEMU never, SQL only through SnapshotRepo.
import { rmSync } from 'node:fs'
import type { Logger } from 'pino'
import type { ImageRow, SnapshotRepo } from '../store/snapshots.ts'
import { isAdopted } from '../vm/definition.ts'
import type { VmManager } from '../vm/manager.ts'

/** What the image-graph code reads and writes: the VM records and the images/snapshots tables. */
export interface GraphDeps {
  vms: Pick<VmManager, 'record' | 'updateRuntime'>
  repo: SnapshotRepo
}

/** One layer of a disk's chain, top first: QEMU's (with its node) when the VM runs, qemu-img's when it is off. */
export interface Layer {
  file: string
  format: string
  node?: string
}

/** Records the VM's original disk files as the roots of the image graph (created by the user). */
export function ensureBaseImages(g: GraphDeps, vm: string): void {
  const rec = g.vms.record(vm)
  // An adopted VM has no disks in its definition: the roots are the files its QEMU ran on when
  // qmpd first snapshotted it (discovered at adoption; called before the runtime moves on).
  const def = rec.definition
  for (const d of isAdopted(def) ? rec.runtime.disks : def.disks) {
    if (!g.repo.hasImage(vm, d.file)) {
      g.repo.putImage({ vm, disk: d.id, file: d.file, format: d.format, backing: null, createdByQmpd: rec.runtime.createdFiles.includes(d.file) })
    }
  }
}

/** Files that some snapshot or the current state still reads: their images and all below them. */
export function neededFiles(g: GraphDeps, vm: string): Set<string> {
  const images = new Map(g.repo.images(vm).map((i) => [i.file, i]))
  const roots = [
    ...g.vms.record(vm).runtime.disks.map((d) => d.file),
    ...g.repo.list(vm).flatMap((s) => s.disks.filter((d) => d.mode !== 'excluded').map((d) => d.file)),
  ]
  const needed = new Set<string>()
  for (let f of roots) {
    for (let guard = 0; f && !needed.has(f) && guard < 10_000; guard++) {
      needed.add(f)
      f = images.get(f)?.backing ?? ''
    }
  }
  return needed
}

/** Deletes an image qmpd created once nothing needs it; returns whether it did. */
export function removeIfUnneeded(g: GraphDeps, vm: string, file: string, ctx: { log: Logger }): boolean {
  const img = g.repo.images(vm).find((i) => i.file === file)
  if (!img?.createdByQmpd || neededFiles(g, vm).has(file)) return false
  if (g.repo.images(vm).some((i) => i.backing === file)) return false
  rmSync(file, { force: true })
  g.repo.deleteImage(vm, file)
  ctx.log.info({ file }, 'removed an image nothing needs any more')
  return true
}

/** Makes sure every layer of the chain is in the image graph (chains built outside qmpd, too). */
export function trackChain(g: GraphDeps, vm: string, disk: string, layers: Layer[]): void {
  const known = new Set(g.repo.images(vm).map((i) => i.file))
  layers.forEach((l, i) => {
    if (!known.has(l.file)) {
      g.repo.putImage({ vm, disk, file: l.file, format: l.format === 'raw' ? 'raw' : 'qcow2', backing: layers[i + 1]?.file ?? null, createdByQmpd: false })
    }
  })
}

/** The image row of a layer, or the row it would have as an image qmpd did not create. */
export function imageRow(g: GraphDeps, vm: string, disk: string, l: Layer): ImageRow {
  return (
    g.repo.images(vm).find((i) => i.file === l.file) ?? {
      vm,
      disk,
      file: l.file,
      format: (l.format === 'raw' ? 'raw' : 'qcow2'),
      backing: null,
      createdByQmpd: false,
    }
  )
}

/** The format the image graph records for a file (qcow2 when it is not there). */
export function formatOf(images: ImageRow[], file: string): 'qcow2' | 'raw' {
  return images.find((i) => i.file === file)?.format ?? 'qcow2'
}

/**
 * Removes every image qmpd created that nothing needs any more (no snapshot, no active layer, no
 * other image layered on it): what an operation a crash interrupted left between its metadata
 * commit and its clean-up. Returns the files removed.
 */
export function removeGarbage(g: GraphDeps, vm: string, ctx: { log: Logger }): string[] {
  const removed: string[] = []
  for (let progress = true; progress; ) {
    progress = false
    for (const img of g.repo.images(vm)) {
      if (removeIfUnneeded(g, vm, img.file, ctx)) {
        removed.push(img.file)
        progress = true
      }
    }
  }
  return removed
}
