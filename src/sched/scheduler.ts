// The scheduler: one timer for every schedule and every expiring snapshot. Records each slot
// before its job is queued, queues the snapshot through the normal VM queue, then applies the
// schedule's retention and deletes expired snapshots through the delete queue. Never takes a
// snapshot or deletes one itself.
import type { Logger } from 'pino'
import { toQmpdError } from '../errors.ts'
import type { BusEvent, EventBus, ScheduleEvent } from '../events/bus.ts'
import type { JobManager } from '../jobs/manager.ts'
import { isFinal, type Job } from '../jobs/model.ts'
import { failPoint } from '../ops/failpoints.ts'
import type { BackupService } from '../backup/service.ts'
import type { SnapshotService } from '../snapshot/service.ts'
import type { ScheduleRepo } from '../store/schedules.ts'
import type { VmManager } from '../vm/manager.ts'
import { isRunningState } from '../vm/states.ts'
import { parseCron, type CronSpec } from './cron.ts'
import type { SchedDeletes } from './deletes.ts'
import type { Schedule, ScheduleRun } from './model.ts'
import { selectPrune } from './prune.ts'

/**
 * Catch-up window: at start (or after any pause of the event loop) the latest missed slot of a
 * schedule runs once if it is at most this old; an older one is recorded as skipped with an
 * event. Earlier missed slots are never run (catch-up policy: latest missed slot only).
 */
export const CATCH_UP_GRACE_MS = 60 * 60 * 1000
/** The longest the timer sleeps: a clock step or a missed wake-up is noticed within this long. */
const MAX_SLEEP_MS = 60_000
/** Woken this long after a slot: croner's slots are whole seconds, the timer must land past them. */
const WAKE_SLACK_MS = 20

/** Fail points of a firing (src/ops/failpoints.ts): after the slot is recorded, and after its job is queued. */
export const FIRE_POINTS = { recorded: 'schedule-fire.recorded.after', enqueued: 'schedule-fire.enqueued.after' } as const

/** What the scheduler works with. */
export interface SchedulerDeps {
  repo: ScheduleRepo
  vms: VmManager
  snapshots: SnapshotService
  backups: Pick<BackupService, 'create'>
  jobs: JobManager
  bus: EventBus
  deletes: SchedDeletes
  log: Logger
  /** Default CATCH_UP_GRACE_MS. */
  graceMs?: number
}

/** The snapshot name of a schedule's slot: `<id>-YYYYMMDDTHHMMSSZ` (at most 57 characters). */
export function slotName(id: string, slot: Date): string {
  return `${id}-${slot.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '')}`
}

/**
 * Runs every enabled schedule at its slots, with one timer. A slot is recorded in the store
 * (unique per schedule and slot) before its job is queued, so no crash makes it run twice: a slot
 * recorded whose job was never queued is reported `interrupted` at the next start, never run.
 */
export class Scheduler {
  /** Expired snapshots of quarantined VMs: skipped by expiry and by the timer's wake-up choice. */
  private readonly unreadable = new Set<string>()
  private timer: NodeJS.Timeout | undefined
  private running = false
  private ticking = false
  private again = false
  private unsubscribe: (() => void) | undefined
  private readonly crons = new Map<string, CronSpec>()
  private readonly graceMs: number

  constructor(private readonly d: SchedulerDeps) {
    this.graceMs = d.graceMs ?? CATCH_UP_GRACE_MS
  }

  /**
   * Settles the slots the previous daemon left unsettled (after crash recovery ran: a job it
   * rolled forward counts as succeeded), applies every schedule's retention once, then starts the
   * timer. Called once, at daemon start.
   */
  start(): void {
    this.running = true
    this.unsubscribe = this.d.bus.subscribe((ev) => this.onEvent(ev))
    for (const run of this.d.repo.unsettled()) this.settleFromStore(run)
    for (const s of this.d.repo.list()) this.retain(s)
    // At once, not at the next slot: a slot missed while the daemon was down is caught up now.
    void this.tick()
  }

  /** Stops the timer; slots in flight keep their records (their jobs finish in the job queue). */
  stop(): void {
    this.running = false
    clearTimeout(this.timer)
    this.timer = undefined
    this.unsubscribe?.()
  }

  /** The next slot of a schedule, from now (undefined when disabled or there is none). */
  nextRun(s: Schedule): string | undefined {
    if (!s.enabled) return undefined
    const floor = this.floor(s)
    const now = new Date()
    return this.cron(s).next(floor > now ? floor : now)?.toISOString()
  }

  /** Computes the next wake-up again (a schedule or an expiry changed). */
  rearm(): void {
    if (!this.running) return
    if (this.ticking) {
      this.again = true
      return
    }
    clearTimeout(this.timer)
    const now = Date.now()
    let wake = now + MAX_SLEEP_MS
    for (const s of this.d.repo.list()) {
      try {
        const next = this.nextRun(s)
        if (next) wake = Math.min(wake, Date.parse(next))
      } catch {
        // A stored cron this croner no longer reads: tick() logs it at each pass.
      }
    }
    const first = this.d.repo.expiring().find((e) => !this.d.deletes.has(e.vm, e.name) && !this.unreadable.has(`${e.vm}\0${e.name}`))
    if (first) wake = Math.min(wake, Date.parse(first.expiresAt))
    this.timer = setTimeout(() => void this.tick(), Math.max(0, wake - now) + WAKE_SLACK_MS)
    // The daemon's lifetime is its server's; the timer alone keeps no process alive.
    this.timer.unref()
  }

  private async tick(): Promise<void> {
    if (!this.running) return
    this.ticking = true
    try {
      const now = new Date()
      for (const s of this.d.repo.list()) {
        if (!this.running) return
        if (!s.enabled) continue
        try {
          const due = this.cron(s).latest(now)
          if (due && due > this.floor(s)) await this.fire(s, due, now)
        } catch (err) {
          this.d.log.error({ err, vm: s.vm, schedule: s.id }, 'schedule not run')
        }
      }
      this.expire(now)
    } catch (err) {
      this.d.log.error({ err }, 'scheduler tick failed')
    } finally {
      this.ticking = false
      this.again = false
      this.rearm()
    }
  }

  /** Slots at or before this instant are done with: the newest recorded slot, or the schedule's since. */
  private floor(s: Schedule): Date {
    const last = this.d.repo.runs(s.vm, s.id, 1)[0]
    const since = new Date(s.since)
    if (!last) return since
    const slot = new Date(last.slot)
    return slot > since ? slot : since
  }

  private cron(s: Schedule): CronSpec {
    const k = `${s.cron}\0${s.tz ?? ''}`
    let c = this.crons.get(k)
    if (!c) this.crons.set(k, (c = parseCron(s.cron, s.tz)))
    return c
  }

  /** One slot: recorded first, then skipped (why) or its snapshot job queued. */
  private async fire(s: Schedule, slot: Date, now: Date): Promise<void> {
    const name = slotName(s.id, slot)
    const run: ScheduleRun = { vm: s.vm, schedule: s.id, slot: slot.toISOString(), state: 'firing', ...(s.action.type === 'snapshot' ? { snapshot: name } : {}), firedAt: now.toISOString() }
    if (!this.d.repo.record(run)) return
    await failPoint(FIRE_POINTS.recorded)
    const skip = (reason: string): void => {
      this.d.repo.update({ ...run, state: 'skipped', reason, finishedAt: new Date().toISOString() })
      this.emit({ event: 'schedule.skipped', vm: s.vm, schedule: s.id, slot: run.slot, reason })
      this.d.log.info({ vm: s.vm, schedule: s.id, slot: run.slot, reason }, 'schedule slot skipped')
    }
    const late = now.getTime() - slot.getTime()
    if (late > this.graceMs) return skip(`missed: the slot was ${Math.round(late / 1000)} s ago, past the catch-up window of ${Math.round(this.graceMs / 1000)} s`)
    const previous = this.d.repo.runs(s.vm, s.id, 2)[1]
    if (previous?.state === 'queued' && previous.job && this.d.jobs.isLive(previous.job)) return skip(`the previous slot's job ${previous.job} is still queued or running`)
    const a = s.action
    let job: Job
    try {
      const state = this.d.vms.record(s.vm).runtime.state
      if (a.type === 'backup') {
        if (!isRunningState(state)) return skip(`the VM is ${state}: a backup needs it running or paused`)
        const { type: _type, ...body } = a
        job = this.d.backups.create(s.vm, body)
      } else {
        if ((a.memory || a.quiesce) && !isRunningState(state)) return skip(`the VM is ${state}: a ${a.memory ? 'checkpoint (memory)' : 'quiesced snapshot'} needs it running`)
        job = this.d.snapshots.create(s.vm, {
          name,
          kind: a.kind,
          memory: a.memory,
          ...(a.quiesce ? { quiesce: true } : {}),
          description: `schedule ${s.id}, slot ${run.slot}`,
          schedule: s.id,
          ...(s.expiry ? { expiresIn: s.expiry } : {}),
        })
      }
    } catch (err) {
      return skip(toQmpdError(err).message)
    }
    this.d.repo.update({ ...run, state: 'queued', job: job.id })
    this.emit({ event: 'schedule.fired', vm: s.vm, schedule: s.id, slot: run.slot, job: job.id, ...(run.snapshot ? { snapshot: run.snapshot } : {}) })
    await failPoint(FIRE_POINTS.enqueued)
  }

  /** A slot the previous daemon left firing or queued: what became of it, from the store after recovery. */
  private settleFromStore(run: ScheduleRun): void {
    const at = new Date().toISOString()
    const job = run.job ? this.d.jobs.get(run.job) : undefined
    if (run.state === 'firing' || !job) {
      // Recorded, and no job was queued for it (or its job row is gone): never run now.
      const reason = 'interrupted: the daemon stopped after recording the slot and before queuing its job; the slot is not run again'
      this.d.repo.update({ ...run, state: 'interrupted', reason, finishedAt: at })
      this.emit({ event: 'schedule.skipped', vm: run.vm, schedule: run.schedule, slot: run.slot, reason })
      return
    }
    if (isFinal(job.state)) this.settle(run, job)
    // Still live cannot be at start; otherwise the job event settles it.
  }

  /** Records a slot's outcome from its finished job; a success applies the schedule's retention. */
  private settle(run: ScheduleRun, job: Job): void {
    const interrupted = job.error?.code === 'INTERRUPTED'
    const state = job.state === 'succeeded' ? 'succeeded' : interrupted ? 'interrupted' : 'failed'
    this.d.repo.update({ ...run, state, ...(job.error ? { reason: job.error.message } : {}), finishedAt: job.finishedAt ?? new Date().toISOString() })
    if (state !== 'succeeded') return
    const s = this.d.repo.get(run.vm, run.schedule)
    if (s) this.retain(s)
    // The new snapshot may expire before the timer's next wake-up.
    this.rearm()
  }

  /** Deletes, through the delete queue, the schedule's own snapshots its retention does not keep. */
  private retain(s: Schedule): void {
    if (!s.retention) return
    let own
    try {
      own = this.d.snapshots.repo.list(s.vm).filter((x) => x.schedule === s.id && !this.d.deletes.has(s.vm, x.name))
    } catch (err) {
      this.d.log.warn({ vm: s.vm, schedule: s.id, err }, 'retention: cannot read the snapshots')
      return
    }
    const { remove } = selectPrune(own, s.retention, s.tz)
    for (const name of remove) {
      const e = this.d.deletes.request(s.vm, name, 'retention', s.id)
      this.d.log.info({ vm: s.vm, schedule: s.id, snapshot: name, job: e.job, refused: e.refused }, 'retention: snapshot not kept')
    }
  }

  /** Snapshots whose expiresAt passed go to the delete queue, once each. */
  private expire(now: Date): void {
    for (const e of this.d.repo.expiring()) {
      if (Date.parse(e.expiresAt) > now.getTime()) break
      if (this.d.deletes.has(e.vm, e.name)) continue
      let schedule: string | undefined
      try {
        schedule = this.d.snapshots.repo.get(e.vm, e.name)?.schedule
      } catch {
        // A quarantined VM: its rows are not used; not looked at again (nor woken for) until restart.
        this.unreadable.add(`${e.vm}\0${e.name}`)
        continue
      }
      const entry = this.d.deletes.request(e.vm, e.name, 'expiry', schedule)
      this.emit({ event: 'snapshot.expired', vm: e.vm, snapshot: e.name, ...(schedule ? { schedule } : {}), ...(entry.job ? { job: entry.job } : {}), ...(entry.refused ? { reason: entry.refused } : {}) })
    }
  }

  private onEvent(ev: BusEvent): void {
    if (ev.type !== 'job' || !isFinal(ev.job.state)) return
    const job = ev.job
    // Listeners must not block, nor submit jobs while the job manager is finishing one.
    setImmediate(() => {
      if (!this.running) return
      try {
        this.d.deletes.onJobFinal(job)
        if (job.op === 'backup') {
          // A backup job carries no schedule id: its slot is found by the job id.
          for (const sch of this.d.repo.list(job.vm)) {
            if (sch.action.type !== 'backup') continue
            const run = this.d.repo.runs(job.vm, sch.id, 5).find((r) => r.job === job.id)
            if (run && (run.state === 'queued' || run.state === 'firing')) this.settle(run, job)
          }
          return
        }
        if (job.op !== 'snapshot-create') return
        const p = job.params as { schedule?: unknown; name?: unknown } | null
        if (typeof p?.schedule !== 'string') {
          if (job.state === 'succeeded') this.rearm()
          return
        }
        const run = this.d.repo.runs(job.vm, p.schedule, 5).find((r) => r.job === job.id)
        if (run && (run.state === 'queued' || run.state === 'firing')) this.settle(run, job)
      } catch (err) {
        this.d.log.error({ err, job: job.id }, 'scheduler: job outcome not recorded')
      }
    })
  }

  private emit(ev: Omit<ScheduleEvent, 'type'>): void {
    this.d.bus.emit({ type: 'schedule', ...ev })
  }
}
