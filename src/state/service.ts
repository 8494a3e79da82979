import { existsSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import type { Logger } from 'pino'
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import type { PathPolicy } from '../images/paths.ts'
import type { JobContext, JobManager } from '../jobs/manager.ts'
import type { Job } from '../jobs/model.ts'
import { VM_FILES } from '../vm/argv.ts'
import { isAdopted, PathString } from '../vm/definition.ts'
import { trackDowntime } from '../vm/downtime.ts'
import type { VmManager } from '../vm/manager.ts'
import { assertState } from '../vm/states.ts'
import { checkMigrationStream, loadRamState, saveRamState, stateSocket } from './ramfile.ts'

/** Body of POST /v1/vms/{vm}/save and /restore. */
export const StateFileBody = z.strictObject({ file: PathString.describe('the RAM state file (relative paths are under the VM directory)') })

/**
 * VM state without disks (virsh save/restore/managedsave): RAM and device state to a plain QEMU
 * migration stream, and back. Saving stops the VM; the file is fsynced before the job succeeds and
 * a failed save leaves no file and the VM running.
 */
export class StateService {
  /** Refuses work on a VM whose disks a block job is busy with (set by the daemon). */
  busyCheck: (vm: string, what: string) => void = () => {}

  constructor(private readonly deps: { vms: VmManager; jobs: JobManager; paths: PathPolicy; log: Logger }) {}

  /** The managed-save file of a VM. */
  managedSaveFile(vm: string): string {
    return join(this.deps.paths.vmDir(vm), VM_FILES.managedSave)
  }

  /** Queues a managed save: RAM to the VM's managed-save file, QEMU exits, state "saved". */
  managedSave(vm: string): Job {
    this.precheck(vm, 'managed-save', 'managedsave')
    const file = this.managedSaveFile(vm)
    if (existsSync(file)) throw new QmpdError('FILE_EXISTS', `VM ${vm} already has a managed save`, { vm, file })
    return this.deps.jobs.submit({
      vm,
      op: 'managedsave',
      params: {},
      run: async (ctx) => {
        const out = await this.saveAndQuit(vm, file, 'managedsave', ctx)
        this.deps.vms.markSaved(vm)
        return { ...out, state: 'saved' }
      },
    })
  }

  /** DELETE /v1/vms/{vm}/managedsave: discards it; the next start boots afresh. */
  discardManagedSave(vm: string): void {
    const rec = this.deps.vms.record(vm)
    const file = this.managedSaveFile(vm)
    assertState(vm, rec.runtime.state, 'managedsave-discard')
    if (!existsSync(file)) throw new QmpdError('INVALID_STATE', `VM ${vm} has no managed save`, { vm })
    if (this.deps.jobs.busy(vm)) throw new QmpdError('BUSY', `VM ${vm} has queued or running jobs`, { vm })
    rmSync(file, { force: true })
    this.deps.vms.markShutoff(vm, 'managed save discarded')
  }

  /** Queues a save to a chosen file (like virsh save: the VM stops afterwards). */
  save(vm: string, input: { file: string }): Job {
    const { file: raw } = StateFileBody.parse(input)
    this.precheck(vm, 'save', 'save')
    const file = this.deps.paths.resolve(raw, this.deps.paths.vmDir(vm), 'file')
    if (existsSync(file)) throw new QmpdError('FILE_EXISTS', `${file} exists; qmpd never overwrites a file`, { file })
    return this.deps.jobs.submit({
      vm,
      op: 'save',
      params: { file },
      run: async (ctx) => {
        const out = await this.saveAndQuit(vm, file, 'save', ctx)
        this.deps.vms.updateRuntime(vm, { createdFiles: [...this.deps.vms.record(vm).runtime.createdFiles, file] })
        return { ...out, state: 'shutoff' }
      },
    })
  }

  /** Queues a restore from a file (like virsh restore); the file is checked before anything is touched. */
  async restore(vm: string, input: { file: string }): Promise<Job> {
    const { file: raw } = StateFileBody.parse(input)
    const rec = this.deps.vms.record(vm)
    if (isAdopted(rec.definition)) throw new QmpdError('NOT_SUPPORTED', `VM ${vm} was adopted`, { vm })
    const file = this.deps.paths.resolve(raw, this.deps.paths.vmDir(vm), 'file')
    await checkMigrationStream(file)
    const st = rec.runtime.state
    // With jobs queued the state will change first: the job's launch checks again (as a start).
    if (!this.deps.jobs.busy(vm)) assertState(vm, st, 'restore')
    return this.deps.jobs.submit({
      vm,
      op: 'restore',
      params: { file },
      run: async (ctx) => {
        const qmp = await this.deps.vms.launchInJob(vm, ctx, { incoming: true })
        try {
          const r = await loadRamState(qmp, { file, socket: stateSocket(this.deps.paths.vmDir(vm), true), log: ctx.log })
          await this.deps.vms.contInJob(vm)
          return { file, bytes: r.bytes, ms: r.ms, state: 'running' }
        } catch (err) {
          await this.deps.vms.quitInJob(vm, ctx)
          throw err
        }
      },
    })
  }

  private precheck(vm: string, what: string, op: 'save' | 'managedsave'): void {
    const rec = this.deps.vms.record(vm)
    if (isAdopted(rec.definition)) throw new QmpdError('NOT_SUPPORTED', `VM ${vm} was adopted; qmpd can ${what} only VMs it defines`, { vm })
    this.busyCheck(vm, what)
    const st = rec.runtime.state
    if (!this.deps.jobs.busy(vm)) assertState(vm, st, op)
  }

  /** Stops the guest, writes its RAM state to `file`, then quits QEMU. On failure the guest runs on. */
  private async saveAndQuit(vm: string, file: string, op: 'save' | 'managedsave', ctx: JobContext): Promise<{ file: string; bytes: number; ms: number; downtimeMs: number }> {
    const st = this.deps.vms.record(vm).runtime.state
    assertState(vm, st, op)
    const qmp = this.deps.vms.qmp(vm)
    const dt = trackDowntime(qmp)
    if (st === 'running') await this.deps.vms.stopInJob(vm)
    try {
      const r = await saveRamState(qmp, { file, socket: stateSocket(this.deps.paths.vmDir(vm), true), log: ctx.log, onProgress: (c, t) => ctx.setProgress(c, t) })
      await this.deps.vms.quitInJob(vm, ctx)
      return { file, bytes: r.bytes, ms: r.ms, downtimeMs: dt.end() }
    } catch (err) {
      dt.end()
      if (st === 'running' && this.deps.vms.record(vm).runtime.state === 'paused') await this.deps.vms.contInJob(vm).catch(() => {})
      throw err
    }
  }
}
