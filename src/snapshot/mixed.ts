// Mixed internal and external snapshots on one VM: which image holds which tag, whose current state
// other snapshots need, and which deletes would lose a tag; pure reads of the store, changes nothing.
import { existsSync } from 'node:fs'
import { QmpdError } from '../errors.ts'
import type { SnapshotDeps } from './deps.ts'
import type { Snapshot } from './model.ts'

/** The internal snapshots (other than `except`) whose tag on disk `disk` lives in `file`. */
export function tagsIn(d: SnapshotDeps, vm: string, disk: string, file: string, except?: string): string[] {
  return d.repo
    .list(vm)
    .filter((s) => s.kind === 'internal' && s.name !== except && s.disks.some((x) => x.id === disk && x.mode === 'internal' && x.file === file))
    .map((s) => s.name)
}

/**
 * True when something reads `file`'s current state (not only its tags): an image layered on it
 * (an overlay of an external snapshot or of the active layer), or an external snapshot that froze
 * it. Such a file must not be written: applying a tag in it would change what those read.
 */
export function currentStateNeeded(d: SnapshotDeps, vm: string, file: string): boolean {
  if (d.repo.images(vm).some((i) => i.backing === file && existsSync(i.file))) return true
  return d.repo.list(vm).some((s) => s.kind === 'external' && s.disks.some((x) => x.mode === 'external' && x.file === file))
}

/** How a revert to an internal snapshot brings back one disk's tag. */
export type TagPlacement =
  /** The tag is in the active layer: applied there, as on a VM with internal snapshots only. */
  | 'active'
  /** The tagged image is off the active chain and nothing needs its current state: it becomes the active layer again. */
  | 'in-place'
  /** The tagged image is frozen (other snapshots read its current state): a copy of it becomes the active layer. */
  | 'copy'

/** Per captured disk of internal snapshot `s`: where its tag is brought back (see TagPlacement). */
export function tagPlacements(d: SnapshotDeps, vm: string, s: Snapshot): Map<string, TagPlacement> {
  const rt = d.vms.record(vm).runtime
  const out = new Map<string, TagPlacement>()
  for (const x of s.disks.filter((y) => y.mode === 'internal')) {
    const active = rt.disks.find((y) => y.id === x.id)
    if (active?.file === x.file) out.set(x.id, 'active')
    else out.set(x.id, currentStateNeeded(d, vm, x.file) ? 'copy' : 'in-place')
  }
  return out
}

/**
 * Refuses (409 INVALID_STATE, naming the tags) a delete of external snapshot `s` that would lose
 * an internal snapshot's tag; mirrors what delete.ts mergeOut does per disk. Committing the one
 * child C into the frozen image F removes C: C's tags would go. Streaming F into several children
 * changes each child's backing: the tags in a child read through it, so they would change. F's
 * own tags are safe (an image holding tags is kept; a commit into F leaves them as they were).
 * @throws QmpdError INVALID_STATE when a tag would be lost.
 */
export function assertDeleteKeepsTags(d: SnapshotDeps, vm: string, s: Snapshot): void {
  if (s.kind !== 'external') return
  const all = d.repo.list(vm)
  for (const disk of s.disks.filter((x) => x.mode === 'external')) {
    const F = disk.file
    // Another snapshot's image: kept as it is (mergeOut's rule), nothing merges.
    if (all.some((x) => x.name !== s.name && x.disks.some((y) => y.file === F && y.mode !== 'excluded'))) continue
    const kids = d.repo.images(vm).filter((i) => i.disk === disk.id && i.backing === F && existsSync(i.file))
    const lost = kids.flatMap((k) => tagsIn(d, vm, disk.id, k.file).map((tag) => ({ tag, file: k.file })))
    if (lost.length === 0) continue
    const how = kids.length === 1 ? `committing ${kids[0]!.file} into ${F} removes ${kids[0]!.file}` : `streaming ${F} into its ${kids.length} children changes what their tags read`
    const names = [...new Set(lost.map((l) => l.tag))]
    throw new QmpdError(
      'INVALID_STATE',
      `deleting snapshot ${s.name} would lose internal snapshot${names.length > 1 ? 's' : ''} ${names.join(', ')} (disk ${disk.id}: ${how}); delete ${names.length > 1 ? 'them' : 'it'} first`,
      { vm, snapshot: s.name, tags: names },
    )
  }
}

/** The files of disk `disk`'s active chain as the image graph records it, active layer first. */
export function activeChain(d: SnapshotDeps, vm: string, disk: string): string[] {
  const images = new Map(d.repo.images(vm).map((i) => [i.file, i]))
  const out: string[] = []
  for (let f = d.vms.record(vm).runtime.disks.find((x) => x.id === disk)?.file; f && !out.includes(f); f = images.get(f)?.backing ?? undefined) out.push(f)
  return out
}

/**
 * Refuses (409 INVALID_STATE) deleting internal snapshot `s` while its VM runs when a tag is in a
 * backing file of the running chain: QEMU opens backing files read-only and holds their lock
 * (blockdev-snapshot-delete-internal-sync answers "Need a root block node", qemu-img cannot get
 * the write lock). Tags in the active layer, or in images QEMU does not have open, are deletable.
 * @throws QmpdError INVALID_STATE naming the disk and the file.
 */
export function assertTagsDeletableLive(d: SnapshotDeps, vm: string, s: Snapshot): void {
  if (s.kind !== 'internal') return
  for (const x of s.disks.filter((y) => y.mode === 'internal')) {
    const chain = activeChain(d, vm, x.id)
    if (chain.indexOf(x.file) > 0) {
      throw new QmpdError('INVALID_STATE', `snapshot ${s.name}: its tag on disk ${x.id} is in ${x.file}, a backing file of the running VM (QEMU holds it read-only); stop the VM to delete it`, {
        vm,
        snapshot: s.name,
        file: x.file,
      })
    }
  }
}
