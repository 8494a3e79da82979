import { Snapshot } from '../snapshot/model.ts'
import type { Db } from './db.ts'

/** An image file qmpd knows of, with the file it is layered on. */
export interface ImageRow {
  vm: string
  disk: string
  file: string
  format: 'qcow2' | 'raw'
  backing: string | null
  createdByQmpd: boolean
}

/** Repository of the snapshot tree, the image graph behind it and the operation journal. */
export class SnapshotRepo {
  constructor(readonly db: Db) {}

  /** Runs fn in one SQLite transaction: metadata changes commit together or not at all. */
  tx<T>(fn: () => T): T {
    return this.db.transaction(fn)()
  }

  list(vm: string): Snapshot[] {
    return this.db
      .prepare('SELECT body FROM snapshots WHERE vm = ? ORDER BY created_at, rowid')
      .all(vm)
      .map((r) => Snapshot.parse(JSON.parse((r as { body: string }).body)))
  }

  get(vm: string, name: string): Snapshot | undefined {
    const r = this.db.prepare('SELECT body FROM snapshots WHERE vm = ? AND name = ?').get(vm, name) as { body: string } | undefined
    return r ? Snapshot.parse(JSON.parse(r.body)) : undefined
  }

  put(s: Snapshot): void {
    this.db
      .prepare('INSERT INTO snapshots (vm, name, body, created_at) VALUES (?, ?, ?, ?) ON CONFLICT(vm, name) DO UPDATE SET body = excluded.body')
      .run(s.vm, s.name, JSON.stringify(Snapshot.parse(s)), s.createdAt)
  }

  delete(vm: string, name: string): void {
    this.db.prepare('DELETE FROM snapshots WHERE vm = ? AND name = ?').run(vm, name)
  }

  deleteAllFor(vm: string): void {
    this.db.prepare('DELETE FROM snapshots WHERE vm = ?').run(vm)
    this.db.prepare('DELETE FROM images WHERE vm = ?').run(vm)
    this.db.prepare('DELETE FROM journal WHERE vm = ?').run(vm)
  }

  images(vm: string): ImageRow[] {
    return (this.db.prepare('SELECT * FROM images WHERE vm = ?').all(vm) as Array<Record<string, unknown>>).map((r) => ({
      vm: String(r['vm']),
      disk: String(r['disk']),
      file: String(r['file']),
      format: r['format'] === 'raw' ? 'raw' : 'qcow2',
      backing: r['backing'] === null ? null : String(r['backing']),
      createdByQmpd: r['created_by_qmpd'] === 1,
    }))
  }

  putImage(img: ImageRow): void {
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

  /** Records the intent of a multi-step operation before it touches QEMU or files. */
  journalAdd(id: string, vm: string, op: string, body: unknown): void {
    this.db.prepare('INSERT INTO journal (id, vm, op, body, created_at) VALUES (?, ?, ?, ?, ?)').run(id, vm, op, JSON.stringify(body), new Date().toISOString())
  }

  journalDone(id: string): void {
    this.db.prepare('DELETE FROM journal WHERE id = ?').run(id)
  }

  journalPending(): Array<{ id: string; vm: string; op: string; body: unknown }> {
    return (this.db.prepare('SELECT id, vm, op, body FROM journal ORDER BY created_at').all() as Array<{ id: string; vm: string; op: string; body: string }>).map(
      (r) => ({ ...r, body: JSON.parse(r.body) }),
    )
  }
}
