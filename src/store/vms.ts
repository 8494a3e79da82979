// VmRepo: the vms table (definitions and runtime), rows validated when read; SQL only.
import { z } from 'zod'
import { StoredDefinition, VmRuntime } from '../vm/definition.ts'
import type { Db } from './db.ts'
import { onRollback } from './tx.ts'

/** A VM row as the rest of qmpd sees it. */
export interface VmRecord {
  name: string
  definition: StoredDefinition
  runtime: VmRuntime
  createdAt: string
  updatedAt: string
}

const Row = z.strictObject({
  name: z.string(),
  definition: z.string(),
  runtime: z.string(),
  created_at: z.string(),
  updated_at: z.string(),
})

/** Repository of VM definitions and their persisted runtime facts. */
export class VmRepo {
  constructor(private readonly db: Db) {}

  /** Inserts a VM; returns false when the name is taken (nothing written then). */
  insert(rec: Omit<VmRecord, 'createdAt' | 'updatedAt'>): boolean {
    const now = new Date().toISOString()
    const res = this.db
      .prepare(
        'INSERT OR IGNORE INTO vms (name, definition, runtime, created_at, updated_at) VALUES (?, ?, ?, ?, ?)',
      )
      .run(rec.name, JSON.stringify(rec.definition), JSON.stringify(rec.runtime), now, now)
    return res.changes === 1
  }

  get(name: string): VmRecord | undefined {
    const row = this.db.prepare('SELECT * FROM vms WHERE name = ?').get(name)
    return row === undefined ? undefined : fromRow(row)
  }

  list(): VmRecord[] {
    return this.db.prepare('SELECT * FROM vms ORDER BY name').all().map(fromRow)
  }

  /**
   * Stores a VM's runtime. Inside a transaction (src/store/tx.ts), `undo` runs if that transaction
   * rolls back: the caller's in-memory copy of the row puts itself back.
   */
  updateRuntime(name: string, runtime: VmRuntime, undo?: () => void): void {
    this.db
      .prepare('UPDATE vms SET runtime = ?, updated_at = ? WHERE name = ?')
      .run(JSON.stringify(runtime), new Date().toISOString(), name)
    if (undo) onRollback(this.db, undo)
  }

  delete(name: string): boolean {
    return this.db.prepare('DELETE FROM vms WHERE name = ?').run(name).changes === 1
  }
}

function fromRow(raw: unknown): VmRecord {
  const row = Row.parse(raw)
  return {
    name: row.name,
    definition: StoredDefinition.parse(JSON.parse(row.definition)),
    runtime: VmRuntime.parse(JSON.parse(row.runtime)),
    createdAt: row.created_at,
    updatedAt: row.updated_at,
  }
}
