// Recovery rules of save, managed save and restore after a crash (decision table:
// docs/architecture.md, "Crash recovery"). Each rule inspects QEMU and the files, then finishes
// or undoes; no other code decides what happens to these operations after a crash.
import { existsSync } from 'node:fs'
import { rm } from 'node:fs/promises'
import type { Logger } from 'pino'
import type { JobContext } from '../jobs/manager.ts'
import type { Recovery } from '../ops/recovery.ts'
import type { JournalRepo } from '../store/journal.ts'
import { isRunningState, type VmManager } from '../vm/manager.ts'
import { cancelStaleMigration } from '../vm/migration.ts'
import { RESTORE_OP, RestorePlan, SAVE_OP, SavePlan } from './plans.ts'
import { finishReceivedState, partialName } from './ramfile.ts'

/** What the rules use. */
export interface StateRecoveryDeps {
  vms: VmManager
  journal: JournalRepo
}

/** Registers the rules of `save` (also managed) and `restore`. */
export function registerStateRecovery(recovery: Recovery, deps: StateRecoveryDeps): void {
  recovery.register(SAVE_OP, (entry, log) => recoverSave(deps, entry.vm, SavePlan.parse(entry.body), log))
  recovery.register(RESTORE_OP, (entry, log) => recoverRestore(deps, entry.vm, RestorePlan.parse(entry.body), log))
}

/**
 * A save is whole once its file has its final name (it is renamed only after the fsync): then it
 * is finished (QEMU quit, a managed save marks the VM saved). Otherwise it is undone: the partial
 * file goes, the migration QEMU may still run is cancelled, and a guest that ran before runs again.
 */
async function recoverSave(deps: StateRecoveryDeps, vm: string, plan: SavePlan, log: Logger) {
  const alive = isRunningState(deps.vms.record(vm).runtime.state)
  const whole = await finishReceivedState(alive ? deps.vms.qmp(vm) : undefined, plan.file)
  await rm(partialName(plan.file), { force: true })
  if (whole && existsSync(plan.file)) {
    if (alive) await deps.vms.quitInJob(vm, { log } as JobContext)
    deps.journal.tx(() => {
      if (plan.managed) deps.vms.markSaved(vm)
      else if (!deps.vms.record(vm).runtime.createdFiles.includes(plan.file)) {
        deps.vms.updateRuntime(vm, { createdFiles: [...deps.vms.record(vm).runtime.createdFiles, plan.file] })
      }
    })
    return { action: 'forward' as const, detail: `${plan.file} was whole: QEMU quit${plan.managed ? ', VM saved' : ''}`, result: { file: plan.file, state: plan.managed ? 'saved' : 'shutoff' } }
  }
  let detail = `no whole ${plan.file}: the save was undone`
  if (alive) {
    const qmp = deps.vms.qmp(vm)
    const ended = await cancelStaleMigration(qmp, log)
    if (ended) detail += ` (migration cancelled: ${ended.now})`
    if (plan.wasRunning && deps.vms.record(vm).runtime.state === 'paused') {
      await deps.vms.contInJob(vm)
      detail += '; the guest runs again'
    }
  }
  return { action: 'back' as const, detail }
}

/**
 * A restore from a user's file is finished when QEMU already holds the whole state (its incoming
 * migration completed): the guest is resumed. Otherwise the half-loaded QEMU is ended; the file
 * is the user's and stays.
 */
async function recoverRestore(deps: StateRecoveryDeps, vm: string, plan: RestorePlan, log: Logger) {
  const rt = deps.vms.record(vm).runtime
  if (isRunningState(rt.state)) {
    const qmp = deps.vms.qmp(vm)
    const mig = await qmp.execute('query-migrate')
    if (mig.status === 'completed') {
      if (rt.state === 'paused') await deps.vms.contInJob(vm)
      return { action: 'forward' as const, detail: `QEMU had loaded ${plan.file}: resumed`, result: { file: plan.file, state: 'running' } }
    }
    await deps.vms.quitInJob(vm, { log } as JobContext)
    return { action: 'back' as const, detail: `QEMU had not loaded all of ${plan.file}: ended it` }
  }
  return { action: 'back' as const, detail: 'QEMU was gone: nothing to finish' }
}
