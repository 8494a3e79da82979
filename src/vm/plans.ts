// Journal bodies of the VM lifecycle operations qmpd journals: start (from a managed save above
// all) and delete with storage. No logic here.
import { z } from 'zod'

/** Journal name of a start. */
export const START_OP = 'start'
/** A start in progress: whether it restores the managed save, and whether it leaves the guest paused. */
export interface StartJournal {
  managed: boolean
  paused: boolean
}

/** StartJournal as read back from the journal. */
export const StartJournal = z.strictObject({ managed: z.boolean(), paused: z.boolean() }) satisfies z.ZodType<StartJournal>

/** Journal name of a VM delete. */
export const VM_DELETE_OP = 'vm-delete'
/** A delete in progress: the files it removes (with storage) and the VM directory. */
export interface VmDeleteJournal {
  files: string[]
  dir: string
  deleteStorage: boolean
}

/** VmDeleteJournal as read back from the journal. */
export const VmDeleteJournal = z.strictObject({ files: z.array(z.string()), dir: z.string(), deleteStorage: z.boolean() }) satisfies z.ZodType<VmDeleteJournal>
