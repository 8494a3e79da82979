// Retention selection with Proxmox's prune semantics, and the cron reader's slots and refusals;
// pure functions, no QEMU.
import t from 'tap'
import { QmpdError } from '../../src/errors.ts'
import { parseCron } from '../../src/sched/cron.ts'
import { durationMs } from '../../src/sched/model.ts'
import { selectPrune } from '../../src/sched/prune.ts'

/** Snapshots named by their instant. */
const at = (...iso: string[]) => iso.map((createdAt) => ({ name: createdAt, createdAt }))

t.test('keepLast keeps the N newest, whatever order they come in', async (t) => {
  const snaps = at('2026-01-01T00:00:03Z', '2026-01-01T00:00:01Z', '2026-01-01T00:00:04Z', '2026-01-01T00:00:02Z')
  t.same(selectPrune(snaps, { keepLast: 2 }), { keep: ['2026-01-01T00:00:04Z', '2026-01-01T00:00:03Z'], remove: ['2026-01-01T00:00:02Z', '2026-01-01T00:00:01Z'] })
})

t.test('no rule keeps everything', async (t) => {
  const snaps = at('2026-01-01T00:00:01Z', '2026-01-01T00:00:02Z')
  t.same(selectPrune(snaps, {}).remove, [])
  t.same(selectPrune(snaps, {}).keep.length, 2)
})

t.test('keepDaily keeps the newest of each of the last N days that have one', async (t) => {
  const snaps = at('2026-03-01T08:00:00Z', '2026-03-01T20:00:00Z', '2026-03-02T09:00:00Z', '2026-03-04T01:00:00Z', '2026-03-04T23:00:00Z')
  t.same(selectPrune(snaps, { keepDaily: 2 }).keep, ['2026-03-04T23:00:00Z', '2026-03-02T09:00:00Z'], 'a day without a snapshot does not count')
})

t.test('a later rule skips the periods an earlier rule kept a snapshot in (Proxmox: keep-last 1 + keep-daily 2)', async (t) => {
  const snaps = at('2026-03-03T10:00:00Z', '2026-03-03T12:00:00Z', '2026-03-02T12:00:00Z', '2026-03-01T12:00:00Z')
  // keep-last 1 keeps 03-03T12; keep-daily skips 03-03 (already covered) and keeps 03-02 and 03-01.
  t.same(selectPrune(snaps, { keepLast: 1, keepDaily: 2 }), { keep: ['2026-03-03T12:00:00Z', '2026-03-02T12:00:00Z', '2026-03-01T12:00:00Z'], remove: ['2026-03-03T10:00:00Z'] })
})

t.test('keepWeekly uses ISO weeks (Monday first; 2026-01-01 is week 1 of 2026, 2025-12-28 week 52 of 2025)', async (t) => {
  const snaps = at('2025-12-28T12:00:00Z', '2025-12-29T12:00:00Z', '2026-01-04T12:00:00Z', '2026-01-05T12:00:00Z')
  // 12-29 and 01-04 are both in 2026-W1: only the newer one is kept.
  t.same(selectPrune(snaps, { keepWeekly: 5 }).keep, ['2026-01-05T12:00:00Z', '2026-01-04T12:00:00Z', '2025-12-28T12:00:00Z'])
})

t.test('periods are read in the time zone given', async (t) => {
  // 23:30Z on 03-01 is 00:30 on 03-02 in Berlin: one day there, two in UTC.
  const snaps = at('2026-03-01T23:30:00Z', '2026-03-02T10:00:00Z')
  t.equal(selectPrune(snaps, { keepDaily: 5 }, 'UTC').keep.length, 2)
  t.equal(selectPrune(snaps, { keepDaily: 5 }, 'Europe/Berlin').keep.length, 1)
})

t.test('keepMonthly and keepYearly', async (t) => {
  const snaps = at('2024-06-01T00:00:00Z', '2025-01-10T00:00:00Z', '2025-01-20T00:00:00Z', '2025-02-01T00:00:00Z')
  t.same(selectPrune(snaps, { keepMonthly: 2 }).keep, ['2025-02-01T00:00:00Z', '2025-01-20T00:00:00Z'])
  t.same(selectPrune(snaps, { keepYearly: 3 }).keep, ['2025-02-01T00:00:00Z', '2024-06-01T00:00:00Z'])
})

t.test('cron: 6 fields with seconds, nicknames, a time zone; next and latest slots', async (t) => {
  const every5 = parseCron('*/5 * * * * *', undefined)
  t.equal(every5.next(new Date('2026-01-01T00:00:05Z'))?.toISOString(), '2026-01-01T00:00:10.000Z', 'next is strictly after')
  t.equal(every5.latest(new Date('2026-01-01T00:00:05Z'))?.toISOString(), '2026-01-01T00:00:05.000Z', 'latest includes the instant itself')
  t.equal(every5.latest(new Date('2026-01-01T00:00:04.999Z'))?.toISOString(), '2026-01-01T00:00:00.000Z')
  t.equal(parseCron('@daily', undefined).next(new Date('2026-01-01T10:00:00Z'))?.toISOString(), '2026-01-02T00:00:00.000Z')
  t.equal(parseCron('0 3 * * *', 'Europe/Berlin').next(new Date('2026-01-01T00:00:00Z'))?.toISOString(), '2026-01-01T02:00:00.000Z', '03:00 in Berlin is 02:00Z in winter')
})

t.test('cron: a bad expression or time zone is INVALID_INPUT with the parser\'s reason', async (t) => {
  const reason = (cron: string, tz?: string): string => {
    try {
      parseCron(cron, tz)
      return 'accepted'
    } catch (err) {
      t.ok(err instanceof QmpdError && err.code === 'INVALID_INPUT', `${cron}: INVALID_INPUT`)
      return (err as Error).message
    }
  }
  t.match(reason('61 * * * *'), /minute/)
  t.match(reason('not a cron'), /parts/)
  t.match(reason('* * * * * * *'), /5 or 6 parts/, 'no year field')
  t.match(reason('0 0 31 2 *'), /never fires/)
  t.match(reason('* * * * *', 'Mars/Olympus'), /unknown time zone/)
})

t.test('durations', async (t) => {
  t.equal(durationMs('30s'), 30_000)
  t.equal(durationMs('1d12h'), 129_600_000)
  t.equal(durationMs('2w'), 1_209_600_000)
})
