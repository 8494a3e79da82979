// SnapshotService: the public face of snapshots (create, list, revert, delete, recover); delegates
// the work.
import type { Logger } from 'pino'
import { ensureBaseImages, neededFiles, removeIfUnneeded } from '../chain/graph.ts'
import type { Job } from '../jobs/model.ts'
import type { VmView } from '../vm/manager.ts'
import type { SnapshotRepo } from '../store/snapshots.ts'
import { submitCreate } from './create.ts'
import { assertNoClonesOfVm, cloneVm, type CloneDefinition } from './clone.ts'
import { submitDelete, type DeleteOptions } from './delete.ts'
import { submitExport, type ExportBody } from './export.ts'
import type { SnapshotDeps } from './deps.ts'
import type { CreateSnapshotInput, RevertBody } from './model.ts'
import { submitRevert } from './revert.ts'
import { getView, listViews, type SnapshotView } from './views.ts'

export type { SnapshotTestHooks } from './deps.ts'
export type { SnapshotView } from './views.ts'

/**
 * Every kind of snapshot: internal disk snapshots and system checkpoints inside qcow2, external
 * disk snapshots and checkpoints (overlays + RAM state file), memory-only checkpoints; their tree,
 * revert (also of external ones, onto any branch) and delete (merging external images out).
 * A facade: planning is plan.ts, creation create.ts with internal.ts and external.ts, then
 * revert.ts, delete.ts, views.ts and recovery.ts.
 */
export class SnapshotService {
  /** Refuses work on a VM whose disks a block job is busy with (set by the daemon). */
  busyCheck: (vm: string, what: string) => void = () => {}

  constructor(private readonly deps: SnapshotDeps) {}

  /** All snapshots of a VM, oldest first, with children, current flag and size. */
  list(vm: string): Promise<SnapshotView[]> {
    return listViews(this.deps, vm)
  }

  /** One snapshot (404 when unknown). `externalSize`: its size, when the caller has it on the way. */
  get(vm: string, name: string, externalSize?: Promise<number>): Promise<SnapshotView> {
    return getView(this.deps, vm, name, externalSize)
  }

  /**
   * Validates a creation request at once (4xx before any job) and queues it.
   * @throws QmpdError VM_NOT_FOUND, SNAPSHOT_EXISTS, INVALID_INPUT, INVALID_STATE, INVALID_PATH, FILE_EXISTS,
   * ADOPTED_NEEDS_RELAUNCH (an adopted VM whose QEMU is gone) or BUSY, before any job is made.
   */
  create(vm: string, input: CreateSnapshotInput): Job {
    return submitCreate(this.deps, (v, what) => this.busyCheck(v, what), vm, input)
  }

  /**
   * Validates and queues a revert.
   * @throws QmpdError VM_NOT_FOUND, SNAPSHOT_NOT_FOUND, INVALID_STATE, ADOPTED_NEEDS_RELAUNCH (an adopted VM, unless an internal checkpoint is reverted in place) or BUSY, before any job is made.
   */
  revert(vm: string, name: string, input: RevertBody): Job {
    return submitRevert(this.deps, (v, what) => this.busyCheck(v, what), vm, name, input)
  }

  /**
   * Validates and queues a delete (children: the whole subtree; metadataOnly: forget, touch no file).
   * @throws QmpdError VM_NOT_FOUND, SNAPSHOT_NOT_FOUND, INVALID_STATE, INVALID_INPUT or BUSY, before any job is made.
   */
  delete(vm: string, name: string, opts: DeleteOptions): Job {
    return submitDelete(this.deps, (v, what) => this.busyCheck(v, what), vm, name, opts)
  }

  /**
   * Validates and queues an export of one disk of a snapshot into a new standalone image.
   * @throws QmpdError VM_NOT_FOUND, SNAPSHOT_NOT_FOUND, DISK_NOT_FOUND, INVALID_INPUT, INVALID_PATH, FILE_EXISTS, INVALID_STATE or BUSY, before any job is made.
   */
  export(vm: string, name: string, body: ExportBody): Job {
    return submitExport(this.deps, (v, what) => this.busyCheck(v, what), vm, name, body)
  }

  /**
   * Defines a new VM from a disk snapshot (POST /v1/vms with `clone`): linked or full copies of
   * its disks, the snapshot's recorded definition with new MACs.
   * @throws QmpdError VM_NOT_FOUND, SNAPSHOT_NOT_FOUND, VM_EXISTS, NOT_SUPPORTED, INVALID_STATE or BUSY; the copy job's error.
   */
  clone(input: CloneDefinition): Promise<VmView & { clone: unknown }> {
    return cloneVm(this.deps, (v, what) => this.busyCheck(v, what), input)
  }

  /**
   * Refuses deleting a VM's storage while linked clones read its snapshot images.
   * @throws QmpdError INVALID_STATE naming the clones.
   */
  assertNoClones(vm: string): void {
    assertNoClonesOfVm(this.deps, vm)
  }

  /** Records the VM's original disk files as the roots of the image graph (created by the user). */
  ensureBaseImages(vm: string): void {
    ensureBaseImages(this.deps, vm)
  }

  /** Files that some snapshot or the current state still reads: their images and all below them. */
  neededFiles(vm: string): Set<string> {
    return neededFiles(this.deps, vm)
  }

  /** Deletes an image qmpd created once nothing needs it; returns whether it did. */
  removeIfUnneeded(vm: string, file: string, ctx: { log: Logger }): boolean {
    return removeIfUnneeded(this.deps, vm, file, ctx)
  }

  /** The image graph repository (block jobs keep it in step with QEMU's graph). */
  get repo(): SnapshotRepo {
    return this.deps.repo
  }

  /** Forgets every snapshot of a deleted VM; with deleteStorage also removes the files qmpd made for them. */
  forgetVm(vm: string): void {
    this.deps.repo.deleteAllFor(vm)
  }

  /** The files qmpd made for a VM's snapshots: the images it created and the RAM state files. */
  filesOf(vm: string): string[] {
    return [...this.deps.repo.images(vm).filter((i) => i.createdByQmpd).map((i) => i.file), ...this.deps.repo.list(vm).flatMap((s) => (s.vmstateFile ? [s.vmstateFile] : []))]
  }
}
