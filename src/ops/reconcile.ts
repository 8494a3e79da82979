// Reconciler: brings the store in line with QEMU and the files at start and on repair; never
// touches a guest.
import { rm } from 'node:fs/promises'
import type { Logger } from 'pino'
import { QmpdError } from '../errors.ts'
import type { JobManager } from '../jobs/manager.ts'
import type { SnapshotRepo } from '../store/snapshots.ts'
import type { VmManager } from '../vm/manager.ts'
import type { VmChecker } from './check.ts'
import type { CheckReport, Finding, Fix } from './check-model.ts'

/** What reconcile reads and writes. */
export interface ReconcileDeps {
  checker: VmChecker
  vms: VmManager
  snapshots: SnapshotRepo
  jobs: JobManager
  /** True while the VM has a job queued or running (its own queue or a block job on a disk). */
  busy: (vm: string) => boolean
  log: Logger
}

/** How long POST /v1/vms/{vm}/repair waits for its job (a check runs a few qemu-img per image). */
const REPAIR_WAIT_MS = 300_000
/** VMs reconciled at once at start: each check runs qemu-img per image, on few cores. */
const START_CONCURRENCY = 4
/** The flag's reason is for people: the report has the whole list. */
const MAX_REASON_CHARS = 2000

/**
 * Brings the store in line with QEMU and the files where the truth is not in doubt, and flags the
 * VM needs-repair (runtime.repair) where it is. Runs for every VM at daemon start, after
 * re-attach and journal recovery, and for one VM on POST /v1/vms/{vm}/repair. What it changes:
 * a disk's active layer when QEMU runs on a layer reachable from the stored one (a pivot the
 * daemon died before recording), 'shutoff' <-> 'saved' after the managed-save file, and qmpd's
 * temporary files nothing uses. Every change is logged at warn with before and after.
 */
export class Reconciler {
  constructor(private readonly deps: ReconcileDeps) {}

  /** Reconciles every VM (daemon start, before the HTTP server listens). Never throws. */
  async reconcileAll(names: string[]): Promise<void> {
    const todo = [...names]
    const needRepair: string[] = []
    const worker = async (): Promise<void> => {
      for (let vm = todo.shift(); vm !== undefined; vm = todo.shift()) {
        try {
          if ((await this.reconcile(vm)).needsRepair) needRepair.push(vm)
        } catch (err) {
          // Not flagged: nothing was learnt about the VM. Loud, so it is not a silent disagreement.
          this.deps.log.error({ vm, err }, 'reconcile: could not check the VM')
        }
      }
    }
    await Promise.all(Array.from({ length: START_CONCURRENCY }, worker))
    if (needRepair.length > 0) this.deps.log.warn({ vms: needRepair.sort() }, 'reconcile: VMs that need repair (see GET /v1/vms/{vm}/check)')
    else this.deps.log.info({ vms: names.length }, 'reconcile: store, QEMU and files agree')
  }

  /**
   * POST /v1/vms/{vm}/repair: reconciles the VM now, as a job in its queue so nothing else changes
   * it meanwhile. 409 BUSY while the VM has a job queued or running. Answers the check afterwards.
   */
  async repair(vm: string): Promise<CheckReport> {
    this.deps.vms.record(vm) // VM_NOT_FOUND first
    if (this.deps.busy(vm)) throw new QmpdError('BUSY', `VM ${vm} has jobs queued or running; repair it when they are done`, { vm })
    const job = this.deps.jobs.submit({ vm, op: 'repair', params: {}, run: () => this.reconcile(vm, { idle: true }) })
    const done = await this.deps.jobs.wait(job.id, REPAIR_WAIT_MS)
    if (done.state === 'succeeded') return done.result as CheckReport
    if (done.error) throw new QmpdError(done.error.code as QmpdError['code'], done.error.message, { job: done.id, ...done.error.details })
    throw new QmpdError('TIMEOUT', `repair of VM ${vm} did not finish within ${REPAIR_WAIT_MS / 1000} s (job ${done.id})`, { job: done.id })
  }

  /**
   * Checks the VM, applies the fixes, checks again, then sets or clears the needs-repair flag.
   * `idle`: the caller runs inside the VM's queue, so the VM counts as idle although that queue
   * holds the caller's own job. Returns the final check (with the flag).
   */
  async reconcile(vm: string, opts: { idle?: boolean } = {}): Promise<CheckReport> {
    const log = this.deps.log.child({ vm })
    const first = await this.deps.checker.inspect(vm, { withFlag: false, ...(opts.idle ? { idle: true } : {}) })
    const fixable = first.findings.filter((f): f is Finding & { fix: Fix } => f.fix !== undefined)
    for (const f of fixable) {
      try {
        await this.apply(vm, f, log)
      } catch (err) {
        log.error({ err, code: f.code }, 'reconcile: a fix failed; the problem stays')
      }
    }
    const after = fixable.length > 0 ? await this.deps.checker.inspect(vm, { withFlag: false, ...(opts.idle ? { idle: true } : {}) }) : first
    this.setFlag(vm, after.findings, log)
    return (await this.deps.checker.inspect(vm, opts.idle ? { idle: true } : {})).report
  }

  private async apply(vm: string, f: Finding & { fix: Fix }, log: Logger): Promise<void> {
    const fix = f.fix
    switch (fix.kind) {
      case 'follow-top': {
        const rt = this.deps.vms.record(vm).runtime
        const before = rt.disks.find((d) => d.id === fix.disk)
        if (!before) return
        const after = { ...before, file: fix.file, format: fix.format, gen: fix.gen }
        this.deps.snapshots.tx(() => {
          if (fix.recordImage) {
            this.deps.snapshots.putImage({ vm, disk: fix.disk, file: fix.file, format: fix.format, backing: fix.backing, createdByQmpd: false })
          }
          const now = this.deps.vms.record(vm).runtime
          this.deps.vms.updateRuntime(vm, { disks: now.disks.map((d) => (d.id === fix.disk ? after : d)) })
        })
        log.warn({ code: f.code, disk: fix.disk, before, after, recordedImage: fix.recordImage ? { file: fix.file, backing: fix.backing } : undefined }, 'reconcile: the store follows the active layer QEMU runs on')
        return
      }
      case 'mark-saved': {
        const before = this.deps.vms.record(vm).runtime.state
        this.deps.vms.markSaved(vm)
        log.warn({ code: f.code, before: { state: before }, after: { state: 'saved' } }, 'reconcile: a managed save exists; the VM is saved')
        return
      }
      case 'mark-shutoff': {
        const before = this.deps.vms.record(vm).runtime.state
        this.deps.vms.markShutoff(vm, 'managed save file missing (reconcile)')
        log.warn({ code: f.code, before: { state: before }, after: { state: 'shutoff' } }, 'reconcile: the managed save is gone; the VM is shutoff')
        return
      }
      case 'remove-temp-file':
        await rm(fix.file, { force: true })
        log.warn({ code: f.code, before: { file: fix.file }, after: { file: null } }, 'reconcile: removed a temporary file nothing uses')
        return
    }
  }

  /** Sets the flag when problems are left (keeping its time when the reason is the same), else clears it. */
  private setFlag(vm: string, left: Finding[], log: Logger): void {
    const before = this.deps.vms.record(vm).runtime.repair
    if (left.length === 0) {
      if (!before) return
      this.deps.vms.updateRuntime(vm, { repair: undefined })
      log.warn({ before, after: null }, 'reconcile: no problem left; needs-repair cleared')
      return
    }
    let reason = left.map((f) => `${f.code}: ${f.message}`).join('; ')
    if (reason.length > MAX_REASON_CHARS) reason = reason.slice(0, MAX_REASON_CHARS - 1) + '…'
    if (before?.reason === reason) return
    const after = { reason, at: new Date().toISOString() }
    this.deps.vms.updateRuntime(vm, { repair: after })
    log.warn({ before: before ?? null, after, problems: left.map(({ fix: _f, ...p }) => p) }, 'reconcile: the VM needs repair')
  }
}
