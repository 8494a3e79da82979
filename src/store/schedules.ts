// ScheduleRepo: the schedules and schedule_runs tables (and a read of the snapshots that expire),
// rows validated when read; SQL only.
import type { Logger } from 'pino'
import { z } from 'zod'
import { Schedule, ScheduleRun } from '../sched/model.ts'
import type { Db } from './db.ts'
import { describeIssue } from './integrity.ts'

/** Slot records kept per schedule: the newest ones (the newest alone is what prevents a slot from running twice). */
const RUNS_KEPT = 50

/** Repository of schedules and of what became of their slots. */
export class ScheduleRepo {
  constructor(
    private readonly db: Db,
    private readonly log?: Logger,
  ) {}

  /** Every schedule whose row is sound (a bad row is logged and left out), by VM then id. */
  list(vm?: string): Schedule[] {
    const rows = (vm === undefined ? this.db.prepare('SELECT body FROM schedules ORDER BY vm, id').all() : this.db.prepare('SELECT body FROM schedules WHERE vm = ? ORDER BY id').all(vm)) as Array<{ body: string }>
    return rows.flatMap((r) => this.parse(Schedule, r.body, 'schedules'))
  }

  get(vm: string, id: string): Schedule | undefined {
    const row = this.db.prepare('SELECT body FROM schedules WHERE vm = ? AND id = ?').get(vm, id) as { body: string } | undefined
    return row ? this.parse(Schedule, row.body, 'schedules')[0] : undefined
  }

  /** Inserts or replaces a schedule. */
  put(s: Schedule): void {
    this.db.prepare('INSERT OR REPLACE INTO schedules (vm, id, body) VALUES (?, ?, ?)').run(s.vm, s.id, JSON.stringify(Schedule.parse(s)))
  }

  /** Deletes a schedule and its slot records; returns whether it existed. */
  delete(vm: string, id: string): boolean {
    return this.db.transaction(() => {
      this.db.prepare('DELETE FROM schedule_runs WHERE vm = ? AND schedule = ?').run(vm, id)
      return this.db.prepare('DELETE FROM schedules WHERE vm = ? AND id = ?').run(vm, id).changes > 0
    })()
  }

  /** Forgets every schedule of a deleted VM. */
  deleteAllFor(vm: string): void {
    this.db.transaction(() => {
      this.db.prepare('DELETE FROM schedule_runs WHERE vm = ?').run(vm)
      this.db.prepare('DELETE FROM schedules WHERE vm = ?').run(vm)
    })()
  }

  /**
   * Records a slot before anything is done for it. Returns false when the slot is recorded
   * already (the primary key refuses a second record): the caller must then do nothing.
   */
  record(run: ScheduleRun): boolean {
    const r = this.db.prepare('INSERT OR IGNORE INTO schedule_runs (vm, schedule, slot, body) VALUES (?, ?, ?, ?)').run(run.vm, run.schedule, run.slot, JSON.stringify(ScheduleRun.parse(run)))
    if (r.changes === 0) return false
    this.db
      .prepare('DELETE FROM schedule_runs WHERE vm = ? AND schedule = ? AND slot NOT IN (SELECT slot FROM schedule_runs WHERE vm = ? AND schedule = ? ORDER BY slot DESC LIMIT ?)')
      .run(run.vm, run.schedule, run.vm, run.schedule, RUNS_KEPT)
    return true
  }

  /** Rewrites a recorded slot (its state moved on). */
  update(run: ScheduleRun): void {
    this.db.prepare('UPDATE schedule_runs SET body = ? WHERE vm = ? AND schedule = ? AND slot = ?').run(JSON.stringify(ScheduleRun.parse(run)), run.vm, run.schedule, run.slot)
  }

  /** A schedule's recorded slots, newest first. */
  runs(vm: string, schedule: string, limit = RUNS_KEPT): ScheduleRun[] {
    const rows = this.db.prepare('SELECT body FROM schedule_runs WHERE vm = ? AND schedule = ? ORDER BY slot DESC LIMIT ?').all(vm, schedule, limit) as Array<{ body: string }>
    return rows.flatMap((r) => this.parse(ScheduleRun, r.body, 'schedule_runs'))
  }

  /** Slots whose outcome is not known yet (firing or queued), of every schedule. */
  unsettled(): ScheduleRun[] {
    // json_extract throws on malformed JSON: a poisoned row must not stop the daemon (parse() logs it).
    const rows = this.db.prepare("SELECT body FROM schedule_runs WHERE CASE WHEN json_valid(body) THEN json_extract(body, '$.state') IN ('firing', 'queued') ELSE 1 END").all() as Array<{ body: string }>
    return rows.flatMap((r) => this.parse(ScheduleRun, r.body, 'schedule_runs'))
  }

  /**
   * Snapshots with an expiry, of every VM: (vm, name, expiresAt), soonest first. Rows that are not
   * JSON or whose expiresAt is no instant are left out (the start-up scan quarantines their VM).
   */
  expiring(): Array<{ vm: string; name: string; expiresAt: string }> {
    const rows = this.db
      .prepare("SELECT vm, name, e AS expiresAt FROM (SELECT vm, name, CASE WHEN json_valid(body) THEN json_extract(body, '$.expiresAt') END AS e FROM snapshots) WHERE e IS NOT NULL ORDER BY e")
      .all() as Array<{ vm: string; name: string; expiresAt: unknown }>
    return rows.filter((r): r is { vm: string; name: string; expiresAt: string } => typeof r.expiresAt === 'string' && !Number.isNaN(Date.parse(r.expiresAt)))
  }

  private parse<T>(schema: z.ZodType<T>, body: string, table: string): T[] {
    try {
      return [schema.parse(JSON.parse(body))]
    } catch (err) {
      this.log?.error({ table, issue: describeIssue(err) }, 'stored row fails its schema; left out')
      return []
    }
  }
}
