// StateService: save, restore and managed save as journaled jobs; the HTTP layer validated its
// input.
import { existsSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import type { Logger } from 'pino'
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import type { PathPolicy } from '../images/paths.ts'
import { assertCreatable } from '../images/files.ts'
import type { JobContext, JobManager } from '../jobs/manager.ts'
import type { Job } from '../jobs/model.ts'
import { VM_FILES } from '../vm/argv.ts'
import { isAdopted, PathString } from '../vm/definition.ts'
import { refuseRelaunch } from '../vm/adopted.ts'
import { trackDowntime } from '../vm/downtime.ts'
import type { VmManager } from '../vm/manager.ts'
import type { Journal, Operation } from '../ops/journal.ts'
import { assertState } from '../vm/states.ts'
import { checkStateFile, loadRamState, saveRamState, stateSocket } from './ramfile.ts'
import type { RamFormat } from './ramformat.ts'
import { assertLoadable } from './load-check.ts'
import { assertMigratable } from '../vm/migration-blockers.ts'
import { RESTORE_OP, SAVE_OP, type RestorePlan, type SavePlan } from './plans.ts'

/** Body of POST /v1/vms/{vm}/save and /restore. */
export const StateFileBody = z.strictObject({ file: PathString.describe('the RAM state file (relative paths are under the VM directory)') })
export type StateFileBody = z.output<typeof StateFileBody>

/**
 * VM state without disks (virsh save/restore/managedsave): RAM and device state to a plain QEMU
 * migration stream, and back. Saving stops the VM; the file is fsynced before the job succeeds and
 * a failed save leaves no file and the VM running.
 */
export class StateService {
  /** Refuses work on a VM whose disks a block job is busy with (set by the daemon). */
  busyCheck: (vm: string, what: string) => void = () => {}

  constructor(private readonly deps: { vms: VmManager; jobs: JobManager; paths: PathPolicy; journal: Journal; log: Logger; qemuBinary?: string }) {}

  /**
   * Refuses `what` (anything that migrates the VM's state: save, managed save, a checkpoint) with
   * 409 MIGRATION_BLOCKED while QEMU reports a migration blocker; asked before any job is made.
   * No-op when no QEMU runs (the operation's own state check answers then).
   * @throws QmpdError VM_NOT_FOUND; MIGRATION_BLOCKED with QEMU's reasons; the QMP errors of query-migrate.
   */
  async assertMigratable(vm: string, what: string): Promise<void> {
    const state = this.deps.vms.record(vm).runtime.state
    if (state !== 'running' && state !== 'paused') return
    await assertMigratable(this.deps.vms.qmp(vm), vm, what)
  }

  /** The managed-save file of a VM. */
  managedSaveFile(vm: string): string {
    return join(this.deps.paths.vmDir(vm), VM_FILES.managedSave)
  }

  /**
   * Queues a managed save: RAM to the VM's managed-save file, QEMU exits, state "saved".
   * @throws QmpdError VM_NOT_FOUND; ADOPTED_NEEDS_RELAUNCH for an adopted VM; INVALID_STATE or BUSY, before any job is made.
   */
  managedSave(vm: string): Job {
    this.precheck(vm, 'managed-save', 'managedsave')
    const file = this.managedSaveFile(vm)
    if (existsSync(file)) throw new QmpdError('FILE_EXISTS', `VM ${vm} already has a managed save`, { vm, file })
    return this.deps.jobs.submit({
      vm,
      op: 'managedsave',
      params: {},
      run: async (ctx) => {
        const o = this.begin(ctx, vm, { file, managed: true, wasRunning: this.deps.vms.record(vm).runtime.state === 'running' })
        const out = await this.saveAndQuit(vm, file, 'managedsave', ctx, o)
        await o.step('mark-saved', () => this.deps.journal.repo.tx(() => {
          this.deps.vms.markSaved(vm)
          o.end()
        }))
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

  /**
   * Queues a save to a chosen file (like virsh save: the VM stops afterwards).
   * @throws QmpdError VM_NOT_FOUND, INVALID_STATE, INVALID_PATH, FILE_EXISTS or BUSY, before any job is made.
   */
  save(vm: string, body: StateFileBody): Job {
    const raw = body.file
    this.precheck(vm, 'save', 'save')
    const file = this.deps.paths.resolve(raw, this.deps.paths.vmDir(vm), 'file')
    // First: a FIFO or device in the way is a bad path (400), a regular file an existing one (409).
    assertCreatable(file, 'file')
    if (existsSync(file)) throw new QmpdError('FILE_EXISTS', `${file} exists; qmpd never overwrites a file`, { file })
    return this.deps.jobs.submit({
      vm,
      op: 'save',
      params: { file },
      run: async (ctx) => {
        // Again where it is used: a directory on the way may have become a symlink since.
        this.deps.paths.confine(file, 'file')
        assertCreatable(file, 'file')
        const o = this.begin(ctx, vm, { file, managed: false, wasRunning: this.deps.vms.record(vm).runtime.state === 'running' })
        const out = await this.saveAndQuit(vm, file, 'save', ctx, o)
        await o.step('record-file', () => this.deps.journal.repo.tx(() => {
          this.deps.vms.updateRuntime(vm, { createdFiles: [...this.deps.vms.record(vm).runtime.createdFiles, file] })
          o.end()
        }))
        return { ...out, state: 'shutoff' }
      },
    })
  }

  /**
   * Queues a restore from a file (like virsh restore); the file is checked before anything is touched.
   * @throws QmpdError VM_NOT_FOUND, INVALID_STATE, INVALID_PATH, ADOPTED_NEEDS_RELAUNCH (an adopted VM), INVALID_INPUT (not a RAM state file),
   *   NOT_SUPPORTED (a mapped-ram file, QEMU without mapped-ram) or BUSY, before any job is made.
   */
  async restore(vm: string, body: StateFileBody): Promise<Job> {
    const raw = body.file
    const rec = this.deps.vms.record(vm)
    if (isAdopted(rec.definition)) refuseRelaunch(vm, 'a restore', 'RAM state loads only into a QEMU started with -incoming')
    const file = this.deps.paths.resolve(raw, this.deps.paths.vmDir(vm), 'file')
    const confine = (real: string): void => void this.deps.paths.confine(real, 'file')
    await assertLoadable(this.deps.qemuBinary, await checkStateFile(file, confine), file)
    const st = rec.runtime.state
    // With jobs queued the state will change first: the job's launch checks again (as a start).
    if (!this.deps.jobs.busy(vm)) assertState(vm, st, 'restore')
    return this.deps.jobs.submit({
      vm,
      op: 'restore',
      params: { file },
      run: async (ctx) => {
        const plan: RestorePlan = { file }
        return this.deps.journal.run({ vm, op: RESTORE_OP, job: ctx.id, body: plan, qemuPid: () => this.deps.vms.record(vm).runtime.pid }, async (o) => {
          const qmp = await o.step('launch', () => this.deps.vms.launchInJob(vm, ctx, { incoming: true }))
          try {
            const r = await o.step('load-ram', () => loadRamState(qmp, { file, check: confine, socket: stateSocket(this.deps.paths.vmDir(vm), true), log: ctx.log }))
            await o.step('cont', () => this.deps.vms.contInJob(vm))
            return { file, bytes: r.bytes, ms: r.ms, format: r.format, state: 'running' }
          } catch (err) {
            await this.deps.vms.quitInJob(vm, ctx)
            throw err
          }
        })
      },
    })
  }

  private precheck(vm: string, what: string, op: 'save' | 'managedsave'): void {
    const rec = this.deps.vms.record(vm)
    // A save writes RAM through the adopted QEMU and quits it; a managed save exists only to be
    // restored by the next start, which would need a new QEMU.
    if (op === 'managedsave' && isAdopted(rec.definition)) refuseRelaunch(vm, 'a managed save', 'the next start restores it into a new QEMU')
    this.busyCheck(vm, what)
    const st = rec.runtime.state
    if (!this.deps.jobs.busy(vm)) assertState(vm, st, op)
  }

  /** Journals a save or managed save (the plan recovery reads: src/state/recovery.ts). */
  private begin(ctx: JobContext, vm: string, plan: SavePlan): Operation {
    return this.deps.journal.begin({ vm, op: SAVE_OP, job: ctx.id, body: plan, qemuPid: () => this.deps.vms.record(vm).runtime.pid })
  }

  /**
   * Stops the guest, writes its RAM state to `file`, then quits QEMU. On failure the guest runs
   * on and the journal entry ends (a failure the daemon lives through is undone here; a crash is
   * recovery's).
   */
  private async saveAndQuit(vm: string, file: string, op: 'save' | 'managedsave', ctx: JobContext, o: Operation): Promise<{ file: string; bytes: number; ms: number; downtimeMs: number; format: RamFormat }> {
    const st = this.deps.vms.record(vm).runtime.state
    try {
      assertState(vm, st, op)
    } catch (err) {
      o.end()
      throw err
    }
    const qmp = this.deps.vms.qmp(vm)
    const dt = trackDowntime(qmp)
    let saved = false
    try {
      if (st === 'running') await o.step('stop', () => this.deps.vms.stopInJob(vm))
      const r = await o.step('save-ram', () =>
        saveRamState(qmp, {
          file,
          socket: stateSocket(this.deps.paths.vmDir(vm), !isAdopted(this.deps.vms.record(vm).definition)),
          log: ctx.log,
          onProgress: (c, t) => ctx.setProgress(c, t),
          onMigrating: () => o.point('save-ram.migrating'),
        }),
      )
      saved = true
      await o.step('quit', () => this.deps.vms.quitInJob(vm, ctx))
      return { file, bytes: r.bytes, ms: r.ms, downtimeMs: dt.end(), format: r.format }
    } catch (err) {
      dt.end()
      // Once the file is whole, the save has happened: quitting is all that is left, and a
      // failure of that is not undone (the next start or recovery finishes it).
      if (!saved) {
        if (st === 'running' && this.deps.vms.record(vm).runtime.state === 'paused') await this.deps.vms.contInJob(vm).catch(() => {})
        o.end()
      }
      throw err
    }
  }
}
