// Crash recovery of a start (above all one from a managed save, which must never be lost) and of
// deleting a VM (decision table: docs/architecture.md, "Crash recovery").
import { existsSync, rmdirSync, rmSync } from 'node:fs'
import { rename } from 'node:fs/promises'
import { join } from 'node:path'
import type { Logger } from 'pino'
import type { JobContext } from '../jobs/manager.ts'
import type { Recovery, RecoveryOutcome } from '../ops/recovery.ts'
import type { JournalEntry } from '../store/journal.ts'
import { VM_FILES } from './argv.ts'
import type { VmManager } from './manager.ts'
import { START_OP, VM_DELETE_OP, StartJournal, VmDeleteJournal } from './plans.ts'
import { isRunningState } from './states.ts'

/** What the rules use. */
export interface VmRecoveryDeps {
  vms: VmManager
  vmDir: (vm: string) => string
  /** Forgets a deleted VM's records (the VM row, its snapshots and images). */
  forget: (vm: string) => void
}

/** Registers the rules of start and vm-delete. */
export function registerVmRecovery(recovery: Recovery, d: VmRecoveryDeps): void {
  recovery.register(START_OP, (e, log) => recoverStart(d, e, StartJournal.parse(e.body), log))
  recovery.register(VM_DELETE_OP, (e, log) => recoverDelete(d, e, VmDeleteJournal.parse(e.body), log))
}

/**
 * A start from a managed save: while the save file still has its name, the restore had not
 * finished: the QEMU that was loading it is ended and the VM stays saved. Once it was renamed
 * the load had finished: a QEMU still running holds the restored guest and is resumed; a QEMU
 * that is gone means the guest is not running anywhere, so the save is put back. A plain start
 * is finished when its QEMU runs (resumed unless the start asked for paused).
 */
async function recoverStart(d: VmRecoveryDeps, e: JournalEntry, j: StartJournal, log: Logger): Promise<RecoveryOutcome> {
  const vm = e.vm
  const dir = d.vmDir(vm)
  const save = join(dir, VM_FILES.managedSave)
  const restored = join(dir, VM_FILES.restoredSave)
  const alive = isRunningState(d.vms.record(vm).runtime.state)
  if (j.managed && existsSync(save)) {
    if (alive) await d.vms.quitInJob(vm, { log } as JobContext)
    d.vms.markSaved(vm)
    return { action: 'back', detail: 'the managed save had not been restored: the VM is still saved' }
  }
  if (alive) {
    if (!j.paused && d.vms.record(vm).runtime.state === 'paused') await d.vms.contInJob(vm)
    rmSync(restored, { force: true })
    return { action: 'forward', detail: 'QEMU was up: the start is finished', result: { state: d.vms.record(vm).runtime.state, ...(j.managed ? { restoredFromManagedSave: true } : {}) } }
  }
  if (j.managed && existsSync(restored)) {
    await rename(restored, save)
    d.vms.markSaved(vm)
    return { action: 'back', detail: 'the restored QEMU was gone: the managed save is put back' }
  }
  return { action: 'back', detail: 'QEMU was gone: the VM stays off' }
}

/** Deleting a VM is finished: records forgotten, its files removed. */
async function recoverDelete(d: VmRecoveryDeps, e: JournalEntry, j: VmDeleteJournal, _log: Logger): Promise<RecoveryOutcome> {
  d.forget(e.vm)
  for (const f of j.files) rmSync(f, { force: true })
  if (j.deleteStorage) {
    try {
      rmdirSync(j.dir)
    } catch {
      /* not empty or absent: keep it */
    }
  }
  return { action: 'forward', detail: `VM ${e.vm} deleted` }
}
