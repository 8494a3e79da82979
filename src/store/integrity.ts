// Stored rows that fail their schema: the scan at start, the per-VM quarantine the repositories
// consult, and the purge that forgets a quarantined VM. Only SQL and row checks; never repairs a row.
import type { z } from 'zod'
import { QmpdError } from '../errors.ts'
import type { Db } from './db.ts'
import { transaction } from './tx.ts'

/** The tables whose rows belong to a VM. */
export type StoreTable = 'vms' | 'snapshots' | 'images' | 'jobs' | 'journal'

/** One stored row that does not fit its schema. */
export interface RowProblem {
  table: StoreTable
  /** The row's key: the VM name, `vm/snapshot`, `vm:file`, the job or journal id. */
  key: string
  /** What failed, in words (the zod issues, or the JSON error). */
  issue: string
}

/** A row checker: throws (ZodError, SyntaxError) when the row does not fit, like the read path. */
export type RowCheck = (raw: unknown) => unknown

/** The checkers of every table, given by the repositories (the same parse their reads run). */
export type RowChecks = Record<StoreTable, RowCheck>

/** Words for what a parse threw: zod's issues with their paths, else the error's message. */
export function describeIssue(err: unknown): string {
  const issues = (err as { issues?: z.core.$ZodIssue[] } | null)?.issues
  if (Array.isArray(issues) && issues.length > 0) {
    return issues
      .slice(0, 5)
      .map((i) => `${i.path.length ? i.path.map(String).join('.') : '(row)'}: ${i.message}`)
      .join('; ')
      .slice(0, 1000)
  }
  return (err instanceof Error ? err.message : String(err)).slice(0, 1000)
}

/**
 * The VMs whose stored rows fail their schema. Every repository asks it before it reads a VM's
 * rows: a quarantined VM's rows are never parsed again (its reads answer STORE_ROW_INVALID), so one bad
 * row cannot stop the daemon or a listing of the other VMs.
 */
export class Quarantine {
  private readonly byVm = new Map<string, { problems: RowProblem[]; at: string }>()

  /** Records a problem row of `vm`. */
  note(vm: string, p: RowProblem): void {
    const e = this.byVm.get(vm)
    if (e) e.problems.push(p)
    else this.byVm.set(vm, { problems: [p], at: new Date().toISOString() })
  }

  /** Whether `vm` has a row that fails its schema. */
  has(vm: string): boolean {
    return this.byVm.has(vm)
  }

  /** The problem rows of `vm` and when they were found, or undefined when it has none. */
  get(vm: string): { problems: RowProblem[]; at: string } | undefined {
    return this.byVm.get(vm)
  }

  /** Every quarantined VM, by name. */
  vms(): string[] {
    return [...this.byVm.keys()].sort()
  }

  /** One line for the VM's reason: the first problem, and how many more. */
  reason(vm: string): string | undefined {
    const e = this.byVm.get(vm)
    if (!e) return undefined
    const [first, ...rest] = e.problems
    return `stored ${first!.table} row ${first!.key} fails its schema: ${first!.issue}${rest.length ? ` (and ${rest.length} more row${rest.length > 1 ? 's' : ''})` : ''}`
  }

  /**
   * Refuses to read or change a quarantined VM's records.
   * @throws QmpdError STORE_ROW_INVALID naming the bad row(s), when `vm` is quarantined.
   */
  assertUsable(vm: string): void {
    const e = this.byVm.get(vm)
    if (!e) return
    throw new QmpdError('STORE_ROW_INVALID', `VM ${vm} is quarantined: ${this.reason(vm)}; DELETE /v1/vms/${vm} forgets its records`, { vm, problems: e.problems })
  }

  /** Forgets the VM's problems (its rows were purged). */
  release(vm: string): void {
    this.byVm.delete(vm)
  }
}

/** A row of one table as the scan reads it: its raw columns, the VM it belongs to and its key. */
interface ScanSource {
  table: StoreTable
  sql: string
  key: (r: Record<string, unknown>) => string
}

const SOURCES: ScanSource[] = [
  { table: 'vms', sql: 'SELECT * FROM vms', key: (r) => String(r['name']) },
  { table: 'snapshots', sql: 'SELECT * FROM snapshots', key: (r) => `${String(r['vm'])}/${String(r['name'])}` },
  { table: 'images', sql: 'SELECT * FROM images', key: (r) => `${String(r['vm'])}:${String(r['file'])}` },
  { table: 'jobs', sql: 'SELECT * FROM jobs', key: (r) => String(r['id']) },
  { table: 'journal', sql: 'SELECT * FROM journal', key: (r) => String(r['id']) },
]

/**
 * Checks every row of every table with the read path's own parse and quarantines the VM of each
 * row that fails (a vms row by its name, the others by their `vm` column). Returns the problems.
 */
export function scanStore(db: Db, checks: RowChecks, q: Quarantine): Array<RowProblem & { vm: string }> {
  const found: Array<RowProblem & { vm: string }> = []
  for (const src of SOURCES) {
    for (const raw of db.prepare(src.sql).iterate() as Iterable<Record<string, unknown>>) {
      try {
        checks[src.table](raw)
      } catch (err) {
        const vm = String(src.table === 'vms' ? raw['name'] : raw['vm'])
        const p: RowProblem = { table: src.table, key: src.key(raw), issue: describeIssue(err) }
        q.note(vm, p)
        found.push({ ...p, vm })
      }
    }
  }
  return found
}

/**
 * Forgets everything the store holds of a quarantined VM: its vms row, snapshots, images and
 * journal entries, and the job rows the scan found broken (valid job history stays), in one
 * transaction. The files stay where they are.
 */
export function purgeVm(db: Db, q: Quarantine, vm: string): void {
  const badJobs = (q.get(vm)?.problems ?? []).filter((p) => p.table === 'jobs').map((p) => p.key)
  transaction(db, () => {
    db.prepare('DELETE FROM vms WHERE name = ?').run(vm)
    db.prepare('DELETE FROM snapshots WHERE vm = ?').run(vm)
    db.prepare('DELETE FROM images WHERE vm = ?').run(vm)
    db.prepare('DELETE FROM journal WHERE vm = ?').run(vm)
    for (const id of badJobs) db.prepare('DELETE FROM jobs WHERE id = ? AND vm = ?').run(id, vm)
  })
  q.release(vm)
}
