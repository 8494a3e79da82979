// ScheduleService: create, list, change and delete a VM's schedules and show them with their next
// slot, last run and pending deletes; the firing is scheduler.ts's.
import { randomBytes } from 'node:crypto'
import { QmpdError } from '../errors.ts'
import type { ScheduleRepo } from '../store/schedules.ts'
import type { VmManager } from '../vm/manager.ts'
import { parseCron } from './cron.ts'
import type { SchedDeletes } from './deletes.ts'
import type { Schedule, ScheduleBody, SchedulePatch, ScheduleView } from './model.ts'
import type { Scheduler } from './scheduler.ts'

/** Per-VM snapshot schedules (cron + action + retention + expiry), kept in the store. */
export class ScheduleService {
  constructor(
    private readonly d: {
      repo: ScheduleRepo
      vms: VmManager
      scheduler: Scheduler
      deletes: SchedDeletes
      /** Refuses a backup action's dir that is not an existing directory inside the roots (INVALID_PATH). */
      checkBackupDir: (vm: string, dir: string) => void
    },
  ) {}

  /** What a schedule must hold, checked on create and change. @throws QmpdError INVALID_INPUT, INVALID_PATH. */
  private validate(s: Schedule): void {
    parseCron(s.cron, s.tz)
    if (s.action.type !== 'backup') return
    if (s.retention || s.expiry) throw new QmpdError('INVALID_INPUT', 'retention and expiry apply to snapshot schedules; a backup schedule keeps every point', { schedule: s.id })
    this.d.checkBackupDir(s.vm, s.action.dir)
  }

  /**
   * The VM's schedules, by id.
   * @throws QmpdError VM_NOT_FOUND.
   */
  list(vm: string): ScheduleView[] {
    this.d.vms.record(vm)
    return this.d.repo.list(vm).map((s) => this.view(s))
  }

  /**
   * One schedule.
   * @throws QmpdError VM_NOT_FOUND, SCHEDULE_NOT_FOUND.
   */
  get(vm: string, id: string): ScheduleView {
    return this.view(this.must(vm, id))
  }

  /**
   * Adds a schedule; its first slot is the first after now (none before it is ever run).
   * @throws QmpdError VM_NOT_FOUND, INVALID_INPUT (the cron parser's reason, an unknown tz), SCHEDULE_EXISTS.
   */
  create(vm: string, body: ScheduleBody): ScheduleView {
    this.d.vms.record(vm)
    parseCron(body.cron, body.tz)
    const id = body.id ?? `s${randomBytes(4).toString('hex')}`
    if (this.d.repo.get(vm, id)) throw new QmpdError('SCHEDULE_EXISTS', `VM ${vm} has a schedule ${id} already`, { vm, schedule: id })
    const now = new Date().toISOString()
    const s: Schedule = {
      vm,
      id,
      cron: body.cron,
      ...(body.tz !== undefined ? { tz: body.tz } : {}),
      action: body.action,
      ...(body.retention !== undefined ? { retention: body.retention } : {}),
      ...(body.expiry !== undefined ? { expiry: body.expiry } : {}),
      enabled: body.enabled,
      since: now,
      createdAt: now,
      updatedAt: now,
    }
    this.validate(s)
    this.d.repo.put(s)
    this.d.scheduler.rearm()
    return this.view(s)
  }

  /**
   * Changes a schedule. A new cron or tz, or enabling it, starts its slots afresh from now: the
   * slots a disabled schedule passed are not caught up.
   * @throws QmpdError VM_NOT_FOUND, SCHEDULE_NOT_FOUND, INVALID_INPUT.
   */
  patch(vm: string, id: string, p: SchedulePatch): ScheduleView {
    const old = this.must(vm, id)
    const next: Schedule = { ...old }
    if (p.cron !== undefined) next.cron = p.cron
    if (p.tz === null) delete next.tz
    else if (p.tz !== undefined) next.tz = p.tz
    if (p.action !== undefined) next.action = p.action
    if (p.retention === null) delete next.retention
    else if (p.retention !== undefined) next.retention = p.retention
    if (p.expiry === null) delete next.expiry
    else if (p.expiry !== undefined) next.expiry = p.expiry
    if (p.enabled !== undefined) next.enabled = p.enabled
    this.validate(next)
    const now = new Date().toISOString()
    if (next.cron !== old.cron || next.tz !== old.tz || (next.enabled && !old.enabled)) next.since = now
    next.updatedAt = now
    this.d.repo.put(next)
    this.d.scheduler.rearm()
    return this.view(next)
  }

  /**
   * Deletes a schedule and its slot records; the snapshots it took stay (with their expiry).
   * @throws QmpdError VM_NOT_FOUND, SCHEDULE_NOT_FOUND.
   */
  delete(vm: string, id: string): void {
    this.must(vm, id)
    this.d.repo.delete(vm, id)
    this.d.scheduler.rearm()
  }

  /** Forgets every schedule of a deleted VM (VmManager's delete hook). */
  forgetVm(vm: string): void {
    this.d.repo.deleteAllFor(vm)
    this.d.deletes.forgetVm(vm)
  }

  private must(vm: string, id: string): Schedule {
    this.d.vms.record(vm)
    const s = this.d.repo.get(vm, id)
    if (!s) throw new QmpdError('SCHEDULE_NOT_FOUND', `VM ${vm} has no schedule ${id}`, { vm, schedule: id })
    return s
  }

  private view(s: Schedule): ScheduleView {
    const last = this.d.repo.runs(s.vm, s.id, 1)[0]
    let nextRun: string | undefined
    try {
      nextRun = this.d.scheduler.nextRun(s)
    } catch {
      nextRun = undefined
    }
    return { ...s, ...(nextRun ? { nextRun } : {}), ...(last ? { lastRun: last } : {}), pendingDeletes: this.d.deletes.of(s.vm, s.id) }
  }
}
