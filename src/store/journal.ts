// The operation journal's rows: what a multi-step operation intends, and the step it reached.
// Only SQL lives here; what an entry means and how it is recovered is src/ops and each service.
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import type { Db } from './db.ts'
import { Quarantine } from './integrity.ts'
import { transaction } from './tx.ts'

/** One journal row: an operation that has begun and not yet ended (committed or undone). */
export interface JournalEntry {
  id: string
  vm: string
  op: string
  /** The qmpd job that runs the operation, when it runs as one. */
  job?: string
  /** The last step the operation began (recorded before the step touched anything). */
  step?: string
  /** What the operation will create or change: its plan, validated by the operation's own schema. */
  body: unknown
  createdAt: string
}

const Row = z.strictObject({
  id: z.string(),
  vm: z.string(),
  op: z.string(),
  body: z.string(),
  created_at: z.string(),
  job: z.string().nullable(),
  step: z.string().nullable(),
  updated_at: z.string().nullable(),
})

/** Repository of journal rows. */
export class JournalRepo {
  /** @param quarantine VMs with a row that fails its schema: their entries are left out of pending(). */
  constructor(
    private readonly db: Db,
    readonly quarantine: Quarantine = new Quarantine(),
  ) {}

  /** Runs fn in one SQLite transaction (an operation's metadata and the end of its entry). */
  tx<T>(fn: () => T): T {
    return transaction(this.db, fn)
  }

  /**
   * Records an operation's intent before it touches QEMU or files (with `step`: and the step it is
   * about to run, in the same statement).
   * @throws QmpdError INTERNAL when the body has no JSON form (never written); DISK_FULL or IO_ERROR
   *   when the store cannot be written.
   */
  add(e: { id: string; vm: string; op: string; job?: string; body: unknown; step?: string }): void {
    const now = new Date().toISOString()
    this.db
      .prepare('INSERT INTO journal (id, vm, op, body, created_at, job, step, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)')
      .run(e.id, e.vm, e.op, bodyText(e.id, e.body), now, e.job ?? null, e.step ?? null, now)
  }

  /**
   * Records the step an operation is about to run, and (when given) a new body.
   * @throws QmpdError INTERNAL when the body has no JSON form; DISK_FULL or IO_ERROR when the store cannot be written.
   */
  setStep(id: string, step: string, body?: unknown): void {
    const now = new Date().toISOString()
    if (body === undefined) this.db.prepare('UPDATE journal SET step = ?, updated_at = ? WHERE id = ?').run(step, now, id)
    else this.db.prepare('UPDATE journal SET step = ?, body = ?, updated_at = ? WHERE id = ?').run(step, bodyText(id, body), now, id)
  }

  /** The operation ended (committed or undone): forget it. */
  done(id: string): void {
    this.db.prepare('DELETE FROM journal WHERE id = ?').run(id)
  }

  /**
   * Operations a previous daemon left unfinished, oldest first (optionally of one VM). Entries of a
   * quarantined VM (a row of it fails its schema) are left out: recovery must not act on them.
   */
  pending(vm?: string): JournalEntry[] {
    if (vm !== undefined && this.quarantine.has(vm)) return []
    const rows = vm === undefined ? this.db.prepare('SELECT * FROM journal ORDER BY created_at, rowid').all() : this.db.prepare('SELECT * FROM journal WHERE vm = ? ORDER BY created_at, rowid').all(vm)
    return rows.filter((raw) => !this.quarantine.has(String((raw as { vm?: unknown }).vm))).map(parseJournalRow)
  }

  /** Forgets every entry of a deleted VM. */
  deleteAllFor(vm: string): void {
    this.db.prepare('DELETE FROM journal WHERE vm = ?').run(vm)
  }
}

/** The JSON text of a journal body; a body without one would be a row the read path cannot parse. */
function bodyText(id: string, body: unknown): string {
  const text = JSON.stringify(body)
  if (text === undefined) throw new QmpdError('INTERNAL', `journal entry ${id}: its body has no JSON form`, { journal: id })
  return text
}

/**
 * A journal row parsed as the read path does (the body's own schema is the operation's, checked by its recovery rule).
 * @throws ZodError or SyntaxError when the row does not fit.
 */
export function parseJournalRow(raw: unknown): JournalEntry {
  const r = Row.parse(raw)
  return {
    id: r.id,
    vm: r.vm,
    op: r.op,
    ...(r.job ? { job: r.job } : {}),
    ...(r.step ? { step: r.step } : {}),
    body: JSON.parse(r.body) as unknown,
    createdAt: r.created_at,
  }
}
