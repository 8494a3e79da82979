// Journal bodies of the VM lifecycle operations qmpd journals: start (from a managed save above
// all) and delete with storage. No logic here.

/** Journal name of a start. */
export const START_OP = 'start'
/** A start in progress: whether it restores the managed save, and whether it leaves the guest paused. */
export interface StartJournal {
  managed: boolean
  paused: boolean
}

/** Journal name of a VM delete. */
export const VM_DELETE_OP = 'vm-delete'
/** A delete in progress: the files it removes (with storage) and the VM directory. */
export interface VmDeleteJournal {
  files: string[]
  dir: string
  deleteStorage: boolean
}
