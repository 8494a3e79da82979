// Reads cron expressions with croner (5 or 6 fields, @hourly…) in a time zone and finds their
// slots; never runs anything on its own (no croner timers: the scheduler keeps one timer).
import { Cron } from 'croner'
import { QmpdError } from '../errors.ts'

/** A parsed cron expression in its time zone. */
export interface CronSpec {
  /** The first slot strictly after `after`, or undefined when there is none. */
  next(after: Date): Date | undefined
  /** The latest slot at or before `at`, or undefined when there is none. */
  latest(at: Date): Date | undefined
}

/**
 * Parses `cron` in time zone `tz` (default UTC). Five fields, or six with seconds first, and the
 * nicknames croner knows (@hourly, @daily, @weekly, @monthly, @yearly); day-of-month and weekday
 * combine with OR, as in Vixie cron.
 * @throws QmpdError INVALID_INPUT with the parser's reason for a bad expression or an unknown time zone.
 */
export function parseCron(cron: string, tz: string | undefined): CronSpec {
  const timezone = tz ?? 'UTC'
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: timezone })
  } catch {
    throw new QmpdError('INVALID_INPUT', `tz: unknown time zone ${JSON.stringify(timezone)} (an IANA name such as Europe/Berlin)`, { field: 'tz', tz: timezone })
  }
  let c: Cron
  try {
    // paused: croner would otherwise start a timer of its own. 5-or-6-parts: no year field.
    c = new Cron(cron, { paused: true, timezone, mode: '5-or-6-parts', domAndDow: false })
  } catch (err) {
    const reason = (err instanceof Error ? err.message : String(err)).replace(/^CronPattern: /, '')
    throw new QmpdError('INVALID_INPUT', `cron: ${reason}`, { field: 'cron', cron })
  }
  if (c.nextRun(new Date()) === null) throw new QmpdError('INVALID_INPUT', `cron: ${JSON.stringify(cron)} never fires`, { field: 'cron', cron })
  return {
    next: (after) => c.nextRun(after) ?? undefined,
    latest: (at) => {
      // previousRuns counts a run earlier in the same second as the reference: step past it.
      const [prev] = c.previousRuns(1, new Date(at.getTime() + 1))
      return prev && prev.getTime() <= at.getTime() ? prev : undefined
    },
  }
}
