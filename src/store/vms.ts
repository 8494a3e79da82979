// VmRepo: the vms table (definitions and runtime), rows validated when read and, in their stored
// form, before they are written; SQL only.
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import { StoredDefinition, VmRuntime } from '../vm/definition.ts'
import type { Db } from './db.ts'
import { writeClaimed } from './idempotency.ts'
import { purgeVm, Quarantine } from './integrity.ts'
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
  /**
   * @param quarantine VMs with a stored row that fails its schema (src/store/integrity.ts): their
   *   rows are left out of list() and get() refuses them.
   */
  constructor(
    private readonly db: Db,
    readonly quarantine: Quarantine = new Quarantine(),
  ) {}

  /**
   * Inserts a VM; returns false when the name is taken (nothing written then).
   * @throws QmpdError INVALID_INPUT when the definition or runtime, as they would be stored, fail
   *   the schema the read path applies (a resolved path over the length limit): never written.
   */
  insert(rec: Omit<VmRecord, 'createdAt' | 'updatedAt'>): boolean {
    const now = new Date().toISOString()
    const definition = storedForm(StoredDefinition, rec.definition, 'definition', 'INVALID_INPUT')
    const runtime = storedForm(VmRuntime, rec.runtime, 'runtime', 'INVALID_INPUT')
    // A keyed POST /v1/vms (Idempotency-Key) stores its key in this very transaction.
    return writeClaimed(this.db, { kind: 'vm', id: rec.name }, () => {
      const res = this.db
        .prepare(
          'INSERT OR IGNORE INTO vms (name, definition, runtime, created_at, updated_at) VALUES (?, ?, ?, ?, ?)',
        )
        .run(rec.name, definition, runtime, now, now)
      return res.changes === 1
    })
  }

  /**
   * The VM's row, or undefined when there is none.
   * @throws QmpdError STORE_ROW_INVALID when one of the VM's stored rows fails its schema.
   */
  get(name: string): VmRecord | undefined {
    this.quarantine.assertUsable(name)
    const row = this.db.prepare('SELECT * FROM vms WHERE name = ?').get(name)
    return row === undefined ? undefined : parseVmRow(row)
  }

  /** Every VM whose rows are sound, by name (the quarantined ones: quarantine.vms()). */
  list(): VmRecord[] {
    return this.db
      .prepare('SELECT * FROM vms ORDER BY name')
      .all()
      .filter((r) => !this.quarantine.has((r as { name: string }).name))
      .map(parseVmRow)
  }

  /** The raw stored definition of a VM, parsed as JSON when it can be (for the view of a quarantined VM). */
  rawDefinition(name: string): unknown {
    const row = this.db.prepare('SELECT definition FROM vms WHERE name = ?').get(name) as { definition?: unknown } | undefined
    if (typeof row?.definition !== 'string') return undefined
    try {
      return JSON.parse(row.definition) as unknown
    } catch {
      return row.definition
    }
  }

  /**
   * Stores a VM's runtime. Inside a transaction (src/store/tx.ts), `undo` runs if that transaction
   * rolls back: the caller's in-memory copy of the row puts itself back.
   * @throws QmpdError INTERNAL when the runtime, as it would be stored, fails its schema (a qmpd bug;
   *   nothing is written); DISK_FULL or IO_ERROR when the store cannot be written.
   */
  updateRuntime(name: string, runtime: VmRuntime, undo?: () => void): void {
    this.db
      .prepare('UPDATE vms SET runtime = ?, updated_at = ? WHERE name = ?')
      .run(storedForm(VmRuntime, runtime, 'runtime', 'INTERNAL'), new Date().toISOString(), name)
    if (undo) onRollback(this.db, undo)
  }

  /**
   * Stores a VM's definition and runtime together, in one statement (PATCH /v1/vms/{vm}, a revert
   * that restores a snapshot's definition). `undo` runs if an enclosing transaction rolls back.
   * @throws QmpdError INVALID_INPUT when the definition as it would be stored fails the read
   *   path's schema; INTERNAL for such a runtime; DISK_FULL or IO_ERROR when the store cannot be written.
   */
  updateDefinition(name: string, definition: StoredDefinition, runtime: VmRuntime, undo?: () => void): void {
    const def = storedForm(StoredDefinition, definition, 'definition', 'INVALID_INPUT')
    const rt = storedForm(VmRuntime, runtime, 'runtime', 'INTERNAL')
    this.db.prepare('UPDATE vms SET definition = ?, runtime = ?, updated_at = ? WHERE name = ?').run(def, rt, new Date().toISOString(), name)
    if (undo) onRollback(this.db, undo)
  }

  /** Forgets every stored row of a quarantined VM (src/store/integrity.ts purgeVm); its files stay. */
  purge(name: string): void {
    purgeVm(this.db, this.quarantine, name)
  }

  delete(name: string): boolean {
    return this.db.prepare('DELETE FROM vms WHERE name = ?').run(name).changes === 1
  }
}

/**
 * The JSON text of `value`, after checking that the read path's schema accepts that very text (so
 * a row that could not be read back is never written).
 */
function storedForm(schema: z.ZodType, value: unknown, what: string, code: 'INVALID_INPUT' | 'INTERNAL'): string {
  const text = JSON.stringify(value)
  const r = schema.safeParse(text === undefined ? undefined : JSON.parse(text))
  if (!r.success) {
    throw new QmpdError(code, `the VM's ${what} as it would be stored is invalid: ${z.prettifyError(r.error)}`, { issues: r.error.issues })
  }
  return text
}

/**
 * A vms row parsed as the read path does.
 * @throws ZodError or SyntaxError when the row does not fit its schema.
 */
export function parseVmRow(raw: unknown): VmRecord {
  const row = Row.parse(raw)
  return {
    name: row.name,
    definition: StoredDefinition.parse(JSON.parse(row.definition)),
    runtime: VmRuntime.parse(JSON.parse(row.runtime)),
    createdAt: row.created_at,
    updatedAt: row.updated_at,
  }
}
