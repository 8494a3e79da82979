// Schedules as the API takes, stores and shows them (zod), and the duration syntax; no behaviour.
import { z } from 'zod'
import { CreateBackupBody } from '../backup/model.ts'

/** A schedule id: short enough that `<id>-<slot stamp>` is a snapshot name (64 characters at most). */
export const ScheduleId = z
  .string()
  .regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$/, 'must match [A-Za-z0-9][A-Za-z0-9._-]{0,39}')
  .describe('1-40 characters: letters, digits, ".", "_" and "-", starting with a letter or digit')

const UNIT_MS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 }
const DURATION = /^(?:\d{1,6}[smhdw])+$/
/** Longest expiry accepted: 100 years (a Date beyond year 275760 is invalid anyway). */
const MAX_DURATION_MS = 100 * 365 * 86_400_000

/** The milliseconds of a duration such as `30s`, `7d` or `1d12h` (units s, m, h, d, w). */
export function durationMs(text: string): number {
  let ms = 0
  for (const m of text.matchAll(/(\d+)([smhdw])/g)) ms += Number(m[1]) * UNIT_MS[m[2]!]!
  return ms
}

/** A duration: one or more `<number><unit>` with units s, m, h, d, w (e.g. `30s`, `7d`, `1d12h`). */
export const Duration = z
  .string()
  .regex(DURATION, 'a duration such as 30s, 15m, 12h, 7d, 2w or 1d12h')
  .refine((s) => durationMs(s) >= 1000 && durationMs(s) <= MAX_DURATION_MS, 'between 1s and 100 years')
  .describe('a duration: <number><unit>… with units s, m, h, d, w (e.g. 30s, 7d, 1d12h)')

const Keep = (what: string): z.ZodOptional<z.ZodNumber> => z.number().int().min(1).max(100_000).optional().describe(what)

/**
 * Which of the schedule's own snapshots to keep, with Proxmox's prune semantics (keep-last,
 * keep-hourly…; see src/sched/prune.ts). No option set keeps every snapshot.
 */
export const Retention = z.strictObject({
  keepLast: Keep('keep the N newest'),
  keepHourly: Keep('keep the newest of each of the last N hours that have one'),
  keepDaily: Keep('keep the newest of each of the last N days that have one'),
  keepWeekly: Keep('keep the newest of each of the last N ISO weeks that have one'),
  keepMonthly: Keep('keep the newest of each of the last N months that have one'),
  keepYearly: Keep('keep the newest of each of the last N years that have one'),
})
export type Retention = z.output<typeof Retention>

/** Take a snapshot of the given kind (the options of POST /v1/vms/{vm}/snapshots it uses). */
export const SnapshotAction = z.strictObject({
  type: z.literal('snapshot'),
  kind: z.enum(['internal', 'external']).default('internal'),
  memory: z.boolean().default(false).describe('capture RAM too (a checkpoint: needs a running VM, else the slot is skipped)'),
  quiesce: z.boolean().optional().describe('freeze guest filesystems through the guest agent (needs a running VM)'),
})

/**
 * Take a push-mode backup into a chain (the options of POST /v1/vms/{vm}/backups it uses; needs a
 * running or paused VM, else the slot is skipped). Retention and expiry apply to snapshots only.
 */
export const BackupAction = z.strictObject({
  type: z.literal('backup'),
  ...CreateBackupBody.shape,
})
export type BackupAction = z.output<typeof BackupAction>

/** What a schedule does at each slot, told apart by `type`. */
export const ScheduleAction = z.discriminatedUnion('type', [SnapshotAction, BackupAction])
export type ScheduleAction = z.output<typeof ScheduleAction>

const CronText = z.string().min(1).max(200).describe('5-field cron (minute hour day month weekday), 6 fields with seconds first, or @hourly, @daily, @weekly, @monthly, @yearly')
const Tz = z.string().min(1).max(64).describe('IANA time zone the cron is read in (default UTC)')

/** Body of POST /v1/vms/{vm}/schedules. */
export const ScheduleBody = z.strictObject({
  id: ScheduleId.optional().describe('default: generated'),
  cron: CronText,
  tz: Tz.optional(),
  action: ScheduleAction,
  retention: Retention.optional(),
  expiry: Duration.optional().describe('each snapshot it takes expires this long after it is taken'),
  enabled: z.boolean().default(true),
})
export type ScheduleBody = z.output<typeof ScheduleBody>

/** Body of PATCH /v1/vms/{vm}/schedules/{id}: the fields given replace the stored ones; null removes tz, retention or expiry. */
export const SchedulePatch = z.strictObject({
  cron: CronText.optional(),
  tz: Tz.nullable().optional(),
  action: ScheduleAction.optional(),
  retention: Retention.nullable().optional(),
  expiry: Duration.nullable().optional(),
  enabled: z.boolean().optional(),
})
export type SchedulePatch = z.output<typeof SchedulePatch>

/** A schedule as stored. */
export const Schedule = z.strictObject({
  vm: z.string(),
  id: z.string(),
  cron: z.string(),
  tz: z.string().optional(),
  action: ScheduleAction,
  retention: Retention.optional(),
  expiry: z.string().optional(),
  enabled: z.boolean(),
  /** Slots at or before this instant are never run: set when the schedule is created, changed or enabled. */
  since: z.string(),
  createdAt: z.string(),
  updatedAt: z.string(),
})
export type Schedule = z.output<typeof Schedule>

/**
 * What became of one slot. firing: recorded, its job not yet queued (a crash here leaves it
 * `interrupted`); queued: its job is queued or running; then succeeded, failed, skipped (why in
 * `reason`) or interrupted (the daemon stopped before the job was queued: it is never run later).
 */
export const RunState = z.enum(['firing', 'queued', 'succeeded', 'failed', 'skipped', 'interrupted'])
export type RunState = z.output<typeof RunState>

/** One slot of a schedule, recorded before its job is queued (unique per schedule and slot). */
export const ScheduleRun = z.strictObject({
  vm: z.string(),
  schedule: z.string(),
  slot: z.string(),
  state: RunState,
  job: z.string().optional(),
  snapshot: z.string().optional(),
  reason: z.string().optional(),
  firedAt: z.string(),
  finishedAt: z.string().optional(),
})
export type ScheduleRun = z.output<typeof ScheduleRun>

/** A delete the scheduler asked for (retention or expiry), while its job is queued or running, or after it was refused. */
export const PendingDelete = z.strictObject({
  snapshot: z.string(),
  why: z.enum(['retention', 'expiry']),
  job: z.string().optional(),
  refused: z.string().optional().describe('set when the delete was refused or failed; it is not asked for again until the daemon restarts'),
})
export type PendingDelete = z.output<typeof PendingDelete>

/** A schedule as the API shows it: the stored one plus its next slot, last run and pending deletes. */
export const ScheduleView = z.looseObject({
  ...Schedule.shape,
  nextRun: z.string().optional().describe('the next slot (absent when disabled or the cron has none)'),
  lastRun: ScheduleRun.optional(),
  pendingDeletes: z.array(PendingDelete),
})
export type ScheduleView = z.output<typeof ScheduleView>
