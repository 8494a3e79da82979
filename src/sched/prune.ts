// Which of a schedule's snapshots its retention keeps, with Proxmox's prune semantics
// (keep-last, keep-hourly, keep-daily, keep-weekly, keep-monthly, keep-yearly); pure, no I/O.
import type { Retention } from './model.ts'

/** A snapshot as the prune selection sees it. */
export interface Prunable {
  name: string
  createdAt: string
}

type Rule = { keep: keyof Retention; period: (p: Parts) => string }
interface Parts {
  y: number
  m: number
  d: number
  h: number
}

// In the order Proxmox applies them (pve-docs "Backup Retention", PBS prune.rs mark_selections).
const RULES: Rule[] = [
  { keep: 'keepLast', period: () => '' },
  { keep: 'keepHourly', period: (p) => `${p.y}-${p.m}-${p.d}T${p.h}` },
  { keep: 'keepDaily', period: (p) => `${p.y}-${p.m}-${p.d}` },
  { keep: 'keepWeekly', period: (p) => isoWeek(p) },
  { keep: 'keepMonthly', period: (p) => `${p.y}-${p.m}` },
  { keep: 'keepYearly', period: (p) => `${p.y}` },
]

/**
 * Splits snapshots into kept and removed. Rules run in Proxmox's order over the snapshots newest
 * first; each keeps the newest snapshot of each of its next N periods (keepLast: each snapshot is
 * its own period), skipping periods that already hold a snapshot an earlier rule kept; whatever
 * no rule keeps is removed. With no rule set, everything is kept. Periods are read in `tz`.
 */
export function selectPrune(snaps: Prunable[], retention: Retention, tz = 'UTC'): { keep: string[]; remove: string[] } {
  const active = RULES.filter((r) => (retention[r.keep] ?? 0) > 0)
  if (active.length === 0) return { keep: snaps.map((s) => s.name), remove: [] }
  const sorted = [...snaps].sort((a, b) => (a.createdAt < b.createdAt ? 1 : a.createdAt > b.createdAt ? -1 : 0))
  const parts = new Map(sorted.map((s) => [s.name, partsIn(new Date(s.createdAt), tz)]))
  const kept = new Set<string>()
  const marked = new Set<string>()
  for (const rule of active) {
    const n = retention[rule.keep]!
    const id = (s: Prunable): string => (rule.keep === 'keepLast' ? s.name : rule.period(parts.get(s.name)!))
    const already = new Set(sorted.filter((s) => kept.has(s.name)).map(id))
    const included = new Set<string>()
    for (const s of sorted) {
      if (marked.has(s.name)) continue
      const p = id(s)
      if (already.has(p)) continue
      if (included.has(p)) {
        marked.add(s.name)
        continue
      }
      if (included.size >= n) break
      included.add(p)
      kept.add(s.name)
      marked.add(s.name)
    }
  }
  return { keep: sorted.filter((s) => kept.has(s.name)).map((s) => s.name), remove: sorted.filter((s) => !kept.has(s.name)).map((s) => s.name) }
}

const formats = new Map<string, Intl.DateTimeFormat>()

function partsIn(d: Date, tz: string): Parts {
  let f = formats.get(tz)
  if (!f) formats.set(tz, (f = new Intl.DateTimeFormat('en-US', { timeZone: tz, year: 'numeric', month: 'numeric', day: 'numeric', hour: 'numeric', hourCycle: 'h23' })))
  const get = (type: string): number => Number(f.formatToParts(d).find((p) => p.type === type)?.value)
  return { y: get('year'), m: get('month'), d: get('day'), h: get('hour') }
}

/** The ISO 8601 week (`YYYY-Www`) of a calendar date: weeks start on Monday, week 1 holds the year's first Thursday. */
function isoWeek(p: Parts): string {
  const date = new Date(Date.UTC(p.y, p.m - 1, p.d))
  const day = (date.getUTCDay() + 6) % 7
  date.setUTCDate(date.getUTCDate() - day + 3)
  const year = date.getUTCFullYear()
  const jan4 = new Date(Date.UTC(year, 0, 4))
  const week = 1 + Math.round(((date.getTime() - jan4.getTime()) / 86_400_000 - 3 + ((jan4.getUTCDay() + 6) % 7)) / 7)
  return `${year}-W${week}`
}
