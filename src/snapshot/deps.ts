// What the snapshot code depends on, and test hooks no HTTP request can reach; no behaviour of its
// own.
import type PQueue from 'p-queue'
import type { Logger } from 'pino'
import { QmpdError } from '../errors.ts'
import type { PathPolicy } from '../images/paths.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import type { JobManager } from '../jobs/manager.ts'
import type { Journal } from '../ops/journal.ts'
import type { QmpClient, TransactionAction } from '../qmp/index.ts'
import type { SnapshotRepo } from '../store/snapshots.ts'
import type { VmManager } from '../vm/manager.ts'
import type { Snapshot } from './model.ts'

/** Hooks for tests to inject faults QEMU would not produce on demand; never reachable over HTTP. */
export interface SnapshotTestHooks {
  /** May append actions to the disk transaction (e.g. one that fails) or observe the guest before it is sent. */
  transaction?: (actions: TransactionAction[]) => void | Promise<void>
  /** false: behave as if userfaultfd write-protect were missing (exercises the pre-copy fallback). */
  backgroundSnapshot?: boolean
}

/** What every snapshot module works with: SnapshotService's constructor deps. */
export interface SnapshotDeps {
  vms: VmManager
  jobs: JobManager
  repo: SnapshotRepo
  /** Every create, revert and delete is a journaled step program (src/ops/journal.ts). */
  journal: Journal
  paths: PathPolicy
  qemuImg: QemuImg
  /** Host-wide slots for disk-only snapshots switching disks in QEMU (config.parallelDiskSnapshots). */
  diskSwitches: PQueue
  log: Logger
  hooks?: SnapshotTestHooks
  /** What other features add to a new overlay (the backup chains' bitmaps, src/backup/overlay-bitmaps.ts). */
  overlayExtras?: {
    /** Actions appended to the live snapshot's transaction, given each disk's new overlay node. */
    live: (vm: string, overlays: ReadonlyArray<{ disk: string; node: string }>) => TransactionAction[]
    /** Runs on each offline overlay right after qemu-img created it (inside the same journal step). */
    offline: (vm: string, disk: string, file: string) => Promise<void>
  }
}

/** The QEMU of a VM that runs (or is paused) while a snapshot is taken. */
export type Live = { qmp: QmpClient; running: boolean }

/** The stored snapshot (SNAPSHOT_NOT_FOUND when there is none; VM_NOT_FOUND for an unknown VM). */
export function mustSnapshot(d: SnapshotDeps, vm: string, name: string): Snapshot {
  d.vms.record(vm)
  const s = d.repo.get(vm, name)
  if (!s) throw new QmpdError('SNAPSHOT_NOT_FOUND', `VM ${vm} has no snapshot ${name}`, { vm, snapshot: name })
  return s
}
