// SnapshotRepo: the snapshots and images tables, rows validated when read; SQL only.
import { z } from 'zod'
import { Snapshot } from './snapshot-record.ts'
import { QmpdError } from '../errors.ts'
import type { Db } from './db.ts'
import { describeIssue, Quarantine } from './integrity.ts'
import { transaction } from './tx.ts'

/** An image file qmpd knows of, with the file it is layered on. */
export interface ImageRow {
  vm: string
  disk: string
  file: string
  format: 'qcow2' | 'raw'
  backing: string | null
  createdByQmpd: boolean
}

/** An images row as SQLite holds it (migration 2's columns). */
const ImageDbRow = z.strictObject({
  vm: z.string(),
  disk: z.string(),
  file: z.string(),
  format: z.enum(['qcow2', 'raw']),
  backing: z.string().nullable(),
  created_by_qmpd: z.union([z.literal(0), z.literal(1)]),
})

/** A snapshots row as SQLite holds it (migration 2's columns). */
const SnapshotDbRow = z.strictObject({ vm: z.string(), name: z.string(), body: z.string(), created_at: z.string() })

/** Repository of the snapshot tree and the image graph behind it (the journal is store/journal.ts). */
export class SnapshotRepo {
  /**
   * Parsed snapshot lists per VM, as read from SQLite. Every write through this repository drops
   * the VM's entry, and a transaction that rolls back drops them all, so a cached list is always
   * what the database holds; reads no longer parse every row of the VM on every call.
   */
  private readonly lists = new Map<string, readonly Snapshot[]>()
  /** Per VM: bumped by every write to its snapshots (see version()). */
  private readonly versions = new Map<string, number>()

  /** @param quarantine VMs with a row that fails its schema: their snapshots and images are refused (STORE_ROW_INVALID). */
  constructor(
    readonly db: Db,
    readonly quarantine: Quarantine = new Quarantine(),
  ) {}

  /** Runs fn in one SQLite transaction: metadata changes commit together or not at all. */
  tx<T>(fn: () => T): T {
    try {
      return transaction(this.db, fn)
    } catch (err) {
      this.lists.clear()
      for (const vm of this.versions.keys()) this.touch(vm)
      throw err
    }
  }

  /** A number that changes whenever the VM's snapshots may have changed (a write, or a rollback). */
  version(vm: string): number {
    return this.versions.get(vm) ?? 0
  }

  private touch(vm: string): void {
    this.versions.set(vm, this.version(vm) + 1)
  }

  /**
   * The VM's snapshots, oldest first. The objects are shared: callers must not modify them.
   * @throws QmpdError STORE_ROW_INVALID when a stored row of the VM fails its schema.
   */
  list(vm: string): Snapshot[] {
    let cached = this.lists.get(vm)
    if (!cached) {
      this.quarantine.assertUsable(vm)
      cached = this.db
        .prepare('SELECT * FROM snapshots WHERE vm = ? ORDER BY created_at, rowid')
        .all(vm)
        .map((r) => Object.freeze(parseSnapshotRow(r)))
      this.lists.set(vm, cached)
    }
    return [...cached]
  }

  get(vm: string, name: string): Snapshot | undefined {
    return this.list(vm).find((s) => s.name === name)
  }

  /**
   * Stores a snapshot (insert or update).
   * @throws QmpdError INTERNAL when it does not fit the schema the read path applies (never written).
   */
  put(s: Snapshot): void {
    const checked = Snapshot.safeParse(s)
    if (!checked.success) throw new QmpdError('INTERNAL', `snapshot ${s.vm}/${s.name} as it would be stored is invalid: ${describeIssue(checked.error)}`, { vm: s.vm, snapshot: s.name })
    const parsed = Object.freeze(checked.data)
    const cached = this.lists.get(s.vm)
    this.lists.delete(s.vm)
    this.touch(s.vm)
    this.db
      .prepare('INSERT INTO snapshots (vm, name, body, created_at) VALUES (?, ?, ?, ?) ON CONFLICT(vm, name) DO UPDATE SET body = excluded.body')
      .run(s.vm, s.name, JSON.stringify(parsed), s.createdAt)
    // Keep the VM's list when the new row's place in it is certain (an update in place, or a
    // newest row appended); otherwise the next read loads it again.
    if (!cached) return
    const at = cached.findIndex((x) => x.name === s.name)
    const last = cached[cached.length - 1]
    if (at >= 0) this.lists.set(s.vm, cached.map((x, i) => (i === at ? parsed : x)))
    else if (!last || last.createdAt < s.createdAt) this.lists.set(s.vm, [...cached, parsed])
  }

  delete(vm: string, name: string): void {
    this.lists.delete(vm)
    this.touch(vm)
    this.db.prepare('DELETE FROM snapshots WHERE vm = ? AND name = ?').run(vm, name)
  }

  deleteAllFor(vm: string): void {
    this.lists.delete(vm)
    this.touch(vm)
    this.db.prepare('DELETE FROM snapshots WHERE vm = ?').run(vm)
    this.db.prepare('DELETE FROM images WHERE vm = ?').run(vm)
  }

  /**
   * The VM's image rows, validated (CONVENTIONS #10).
   * @throws QmpdError STORE_ROW_INVALID when a stored row of the VM fails its schema (the start-up scan
   *   quarantined it); ZodError when a row written since does not fit (a store written by something else).
   */
  images(vm: string): ImageRow[] {
    this.quarantine.assertUsable(vm)
    return this.db.prepare('SELECT * FROM images WHERE vm = ?').all(vm).map(parseImageRow)
  }

  /**
   * True when the VM has an image row for `file` (one indexed lookup: no parse of the VM's rows).
   * @throws QmpdError STORE_ROW_INVALID when a stored row of the VM fails its schema.
   */
  hasImage(vm: string, file: string): boolean {
    this.quarantine.assertUsable(vm)
    return this.db.prepare('SELECT 1 FROM images WHERE vm = ? AND file = ?').get(vm, file) !== undefined
  }

  /**
   * Stores an image row (insert, or update of its backing and format).
   * @throws QmpdError INTERNAL when the row does not fit the schema the read path applies (never written).
   */
  putImage(img: ImageRow): void {
    const row = { vm: img.vm, disk: img.disk, file: img.file, format: img.format, backing: img.backing, created_by_qmpd: img.createdByQmpd ? 1 : 0 }
    const checked = ImageDbRow.safeParse(row)
    if (!checked.success) throw new QmpdError('INTERNAL', `image row ${img.vm}:${img.file} as it would be stored is invalid: ${describeIssue(checked.error)}`, { vm: img.vm, file: img.file })
    this.db
      .prepare(
        `INSERT INTO images (vm, disk, file, format, backing, created_by_qmpd) VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT(vm, file) DO UPDATE SET backing = excluded.backing, format = excluded.format`,
      )
      .run(img.vm, img.disk, img.file, img.format, img.backing, img.createdByQmpd ? 1 : 0)
  }

  deleteImage(vm: string, file: string): void {
    this.db.prepare('DELETE FROM images WHERE vm = ? AND file = ?').run(vm, file)
  }
}

/**
 * A snapshots row (vm, name, body, created_at) parsed as the read path does: the body must be a
 * Snapshot of that VM under that name.
 * @throws ZodError or SyntaxError when it does not fit; Error when the body names another snapshot.
 */
export function parseSnapshotRow(raw: unknown): Snapshot {
  const r = SnapshotDbRow.parse(raw)
  const s = Snapshot.parse(JSON.parse(r.body))
  if (s.vm !== r.vm || s.name !== r.name) throw new Error(`the body is snapshot ${s.vm}/${s.name}, not ${r.vm}/${r.name}`)
  return s
}

/**
 * An images row parsed as the read path does.
 * @throws ZodError when it does not fit.
 */
export function parseImageRow(raw: unknown): ImageRow {
  const r = ImageDbRow.parse(raw)
  return { vm: r.vm, disk: r.disk, file: r.file, format: r.format, backing: r.backing, createdByQmpd: r.created_by_qmpd === 1 }
}
