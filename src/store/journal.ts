// The operation journal's rows: what a multi-step operation intends, and the step it reached.
// Only SQL lives here; what an entry means and how it is recovered is src/ops and each service.
import { z } from 'zod'
import type { Db } from './db.ts'
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
  constructor(private readonly db: Db) {}

  /** Runs fn in one SQLite transaction (an operation's metadata and the end of its entry). */
  tx<T>(fn: () => T): T {
    return transaction(this.db, fn)
  }

  /** Records an operation's intent before it touches QEMU or files. */
  add(e: { id: string; vm: string; op: string; job?: string; body: unknown }): void {
    const now = new Date().toISOString()
    this.db
      .prepare('INSERT INTO journal (id, vm, op, body, created_at, job, step, updated_at) VALUES (?, ?, ?, ?, ?, ?, NULL, ?)')
      .run(e.id, e.vm, e.op, JSON.stringify(e.body), now, e.job ?? null, now)
  }

  /** Records the step an operation is about to run, and (when given) a new body. */
  setStep(id: string, step: string, body?: unknown): void {
    const now = new Date().toISOString()
    if (body === undefined) this.db.prepare('UPDATE journal SET step = ?, updated_at = ? WHERE id = ?').run(step, now, id)
    else this.db.prepare('UPDATE journal SET step = ?, body = ?, updated_at = ? WHERE id = ?').run(step, JSON.stringify(body), now, id)
  }

  /** The operation ended (committed or undone): forget it. */
  done(id: string): void {
    this.db.prepare('DELETE FROM journal WHERE id = ?').run(id)
  }

  /** Operations a previous daemon left unfinished, oldest first (optionally of one VM). */
  pending(vm?: string): JournalEntry[] {
    const rows = vm === undefined ? this.db.prepare('SELECT * FROM journal ORDER BY created_at, rowid').all() : this.db.prepare('SELECT * FROM journal WHERE vm = ? ORDER BY created_at, rowid').all(vm)
    return rows.map((raw) => {
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
    })
  }

  /** Forgets every entry of a deleted VM. */
  deleteAllFor(vm: string): void {
    this.db.prepare('DELETE FROM journal WHERE vm = ?').run(vm)
  }
}
