// Forks of an internal checkpoint (src/snapshot/clone.ts): each image holding the tag is copied
// whole (a reflink where the filesystem can) and keeps only that tag; the clone gets the
// checkpoint as its own snapshot record. Never writes an image of the source VM.
import { constants } from 'node:fs'
import { copyFile } from 'node:fs/promises'
import { QmpdError } from '../errors.ts'
import { isRunningState } from '../vm/states.ts'
import type { SnapshotDeps } from './deps.ts'
import type { Snapshot, SnapshotDisk } from './model.ts'

/** True for a checkpoint whose RAM state is inside the qcow2 (a tag's vmstate). */
export function isInternalCheckpoint(s: Snapshot): boolean {
  return s.kind === 'internal' && s.memory
}

/**
 * Refuses a fork qmpd cannot copy consistently: while the source's QEMU has the images open
 * (a copy of a qcow2 being written is not an image), or of an image with a backing file.
 * @throws QmpdError INVALID_STATE while the source runs; NOT_SUPPORTED for a linked fork or a backed image.
 */
export async function assertForkable(d: SnapshotDeps, source: string, s: Snapshot, linked: boolean): Promise<void> {
  if (linked) throw new QmpdError('NOT_SUPPORTED', `snapshot ${s.name} is an internal checkpoint: its fork is a full copy of the images holding the tag; ask linked: false`, { snapshot: s.name })
  if (isRunningState(d.vms.record(source).runtime.state)) {
    throw new QmpdError('INVALID_STATE', `VM ${source} runs: a fork of its internal checkpoint ${s.name} copies the qcow2 images whole, which needs QEMU to have them closed; stop it first`, { vm: source, snapshot: s.name })
  }
  for (const x of s.disks) {
    const info = await d.qemuImg.info(d.paths.confine(x.file, 'snapshot image'))
    if (info['backing-filename']) {
      throw new QmpdError('NOT_SUPPORTED', `disk ${x.id} of checkpoint ${s.name} is an image with a backing file: a fork copies only standalone images`, { snapshot: s.name, disk: x.id })
    }
  }
}

/** Copies one tagged image to `file` and deletes every other tag from the copy. */
export async function copyForkDisk(d: SnapshotDeps, from: SnapshotDisk, file: string, tag: string): Promise<void> {
  await copyFile(d.paths.confine(from.file, 'snapshot image'), d.paths.confine(file, 'clone disk'), constants.COPYFILE_FICLONE)
  const info = await d.qemuImg.info(file)
  for (const t of info.snapshots ?? []) if (t.name !== tag) await d.qemuImg.snapshot('delete', file, t.name)
}

/** Stores the checkpoint as the fork's own snapshot (its disks the fork's copies) and makes it current. */
export function recordFork(d: SnapshotDeps, s: Snapshot, fork: string): void {
  const rec = d.vms.record(fork)
  if (d.repo.get(fork, s.name)) return
  const { parent: _p, clones: _c, ...rest } = s
  const file = (id: string): string => rec.runtime.disks.find((x) => x.id === id)!.file
  d.repo.put({ ...rest, vm: fork, disks: s.disks.map((x) => ({ ...x, file: file(x.id) })), definition: rec.definition })
  d.vms.updateRuntime(fork, { currentSnapshot: s.name })
}
