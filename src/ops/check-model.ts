// The check's report and problem codes (not error codes); no behaviour.
import { z } from 'zod'
import { VmState } from '../vm/definition.ts'

/**
 * Every kind of disagreement the check finds. Stable: clients and crash tests switch on them.
 * docs/api.md lists what each means and what repair does about it.
 */
export const ProblemCode = z.enum([
  // process
  'PROCESS_GONE',
  'QMP_DISCONNECTED',
  'PROCESS_UNRECORDED',
  // disks
  'DISK_FILE_MISSING',
  'DISK_NOT_IN_QEMU',
  'DISK_TOP_MISMATCH',
  'CHAIN_MISMATCH',
  'CHAIN_UNREADABLE',
  // image graph
  'IMAGE_FILE_MISSING',
  'IMAGE_BACKING_MISMATCH',
  // snapshots
  'SNAPSHOT_FILE_MISSING',
  'SNAPSHOT_FILE_UNTRACKED',
  'SNAPSHOT_TAG_MISSING',
  'VMSTATE_MISSING',
  'VMSTATE_INVALID',
  'SNAPSHOT_PARENT_MISSING',
  'CURRENT_SNAPSHOT_MISSING',
  // managed save
  'MANAGED_SAVE_MISSING',
  'MANAGED_SAVE_UNRECORDED',
  // operations
  'JOURNAL_PENDING',
  'QEMU_JOB_ORPHANED',
  'MIGRATION_ORPHANED',
  // files
  'ORPHAN_FILE',
  // the VM's own flag
  'NEEDS_REPAIR',
])
export type ProblemCode = z.output<typeof ProblemCode>

/** One disagreement between the store, QEMU and the files. */
export const CheckProblem = z.object({
  code: ProblemCode,
  message: z.string(),
  /** What the store says (a file, a state…), when it says something. */
  store: z.unknown().optional(),
  /** What QEMU or the files say instead. */
  actual: z.unknown().optional(),
  /** In words: what POST /v1/vms/{vm}/repair (and reconcile at start) does about it. */
  repair: z.string(),
})
export type CheckProblem = z.output<typeof CheckProblem>

/** The answer of GET /v1/vms/{vm}/check and POST /v1/vms/{vm}/repair. */
export const CheckReport = z.object({
  vm: z.string(),
  ok: z.boolean(),
  state: VmState,
  /**
   * A job of this VM was queued or running while the check ran: the checks that an operation in
   * flight legitimately upsets (temporary files, QEMU jobs and migration) were skipped, and a disk
   * may be caught between QEMU's switch and the store's record.
   */
  busy: z.boolean(),
  /** The VM's needs-repair flag (runtime.repair), when set. */
  needsRepair: z.object({ reason: z.string(), at: z.string() }).optional(),
  problems: z.array(CheckProblem),
  /** How many of each thing were looked at. */
  checked: z.object({
    processes: z.number().int(),
    disks: z.number().int(),
    images: z.number().int(),
    snapshots: z.number().int(),
    files: z.number().int(),
    journal: z.number().int(),
    qemuJobs: z.number().int(),
  }),
})
export type CheckReport = z.output<typeof CheckReport>

/**
 * What reconcile may do on its own about a finding: only changes where the truth is not in doubt.
 * Findings without a fix flag the VM as needing repair.
 */
export type Fix =
  /**
   * QEMU runs the disk on `file`, reachable from the stored layer: the store follows QEMU, with
   * node generation `gen`. `recordImage`: the file is not in the image graph yet (a layer made
   * through the QMP escape hatch), so it is added, as not created by qmpd, on `backing`.
   */
  | { kind: 'follow-top'; disk: string; file: string; format: 'qcow2' | 'raw'; backing: string | null; recordImage: boolean; gen: number }
  /** The managed-save file exists while the store says shutoff. */
  | { kind: 'mark-saved' }
  /** The store says saved but there is no managed-save file. */
  | { kind: 'mark-shutoff' }
  /** A temporary file of qmpd's own naming that no operation in flight uses. */
  | { kind: 'remove-temp-file'; file: string }

/** A problem as the check finds it: the public part plus what reconcile may do about it. */
export interface Finding extends CheckProblem {
  fix?: Fix
}
