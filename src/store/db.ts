// Opens the SQLite store, applies its numbered migrations (the only schema definition) and turns
// a full or failing disk into DISK_FULL / IO_ERROR; no repository logic.
import Database from 'better-sqlite3'
import { mkdirSync } from 'node:fs'
import { dirname } from 'node:path'
import { QmpdError } from '../errors.ts'

/** The open SQLite handle. Only src/store touches SQL. */
export type Db = Database.Database

/**
 * Numbered schema migrations. Never edit a shipped one: append a new entry. The index + 1 is the
 * schema version kept in PRAGMA user_version.
 */
const MIGRATIONS: string[] = [
  // 1: VMs and jobs
  `CREATE TABLE vms (
     name TEXT PRIMARY KEY,
     definition TEXT NOT NULL,
     runtime TEXT NOT NULL,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );
   CREATE TABLE jobs (
     id TEXT PRIMARY KEY,
     vm TEXT NOT NULL,
     op TEXT NOT NULL,
     state TEXT NOT NULL,
     params TEXT NOT NULL,
     progress TEXT,
     result TEXT,
     error TEXT,
     created_at TEXT NOT NULL,
     started_at TEXT,
     finished_at TEXT,
     seq INTEGER NOT NULL
   );
   CREATE INDEX jobs_vm ON jobs(vm, seq);
   CREATE INDEX jobs_state ON jobs(state);`,
  // 2: snapshot tree, the image files behind external snapshots, and the operation journal
  `CREATE TABLE snapshots (
     vm TEXT NOT NULL,
     name TEXT NOT NULL,
     body TEXT NOT NULL,
     created_at TEXT NOT NULL,
     PRIMARY KEY (vm, name)
   );
   CREATE TABLE images (
     vm TEXT NOT NULL,
     disk TEXT NOT NULL,
     file TEXT NOT NULL,
     format TEXT NOT NULL,
     backing TEXT,
     created_by_qmpd INTEGER NOT NULL,
     PRIMARY KEY (vm, file)
   );
   CREATE TABLE journal (
     id TEXT PRIMARY KEY,
     vm TEXT NOT NULL,
     op TEXT NOT NULL,
     body TEXT NOT NULL,
     created_at TEXT NOT NULL
   );`,
  // 3: the journal records each operation's job and the step it reached
  `ALTER TABLE journal ADD COLUMN job TEXT;
   ALTER TABLE journal ADD COLUMN step TEXT;
   ALTER TABLE journal ADD COLUMN updated_at TEXT;`,
  // 4: Idempotency-Key of POSTs that create a VM or a job (src/store/idempotency.ts); a key is
  // written in the same transaction as the row it answers with
  `CREATE TABLE idempotency_keys (
     key TEXT PRIMARY KEY,
     route TEXT NOT NULL,
     body_hash TEXT NOT NULL,
     kind TEXT NOT NULL,
     target TEXT NOT NULL,
     status INTEGER NOT NULL,
     created_at TEXT NOT NULL
   );
   CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);`,
  // 5: snapshot schedules and their slots (src/store/schedules.ts); a slot is recorded before its
  // job is queued, and the primary key makes a second record of one slot impossible
  `CREATE TABLE schedules (
     vm TEXT NOT NULL,
     id TEXT NOT NULL,
     body TEXT NOT NULL,
     PRIMARY KEY (vm, id)
   );
   CREATE TABLE schedule_runs (
     vm TEXT NOT NULL,
     schedule TEXT NOT NULL,
     slot TEXT NOT NULL,
     body TEXT NOT NULL,
     PRIMARY KEY (vm, schedule, slot)
   );`,
]

/** Opens (creating when missing) the store at `file` in WAL mode and brings its schema up to date. */
export function openDb(file: string): Db {
  if (file !== ':memory:') mkdirSync(dirname(file), { recursive: true })
  const db = new Database(file)
  db.pragma('journal_mode = WAL')
  // NORMAL is durable across a process crash in WAL mode; only a power loss can drop the last commits.
  db.pragma('synchronous = NORMAL')
  // No foreign keys, on purpose: jobs stay as history after their VM is deleted, and a VM
  // delete's journal entry must outlive the VM's row until its files are gone. The rows that do
  // belong to a VM (snapshots, images) go in the same transaction as the VM row (VmManager.forget
  // and its delete hooks). better-sqlite3 turns enforcement on by default: say it is off.
  db.pragma('foreign_keys = OFF')
  db.pragma('busy_timeout = 5000')
  migrate(db)
  cacheStatements(db)
  return db
}

/** Applies every migration newer than the database's user_version, each in its own transaction. */
export function migrate(db: Db): number {
  const current = db.pragma('user_version', { simple: true }) as number
  if (current > MIGRATIONS.length) {
    throw new Error(`store schema version ${current} is newer than this qmpd knows (${MIGRATIONS.length})`)
  }
  for (let v = current; v < MIGRATIONS.length; v++) {
    db.transaction(() => {
      db.exec(MIGRATIONS[v]!)
      db.pragma(`user_version = ${v + 1}`)
    })()
  }
  return MIGRATIONS.length
}

/**
 * Makes db.prepare return one compiled statement per SQL text: the repositories prepare their
 * SQL on every call, and compiling it again each time was a measurable share of a snapshot's
 * synchronous work (15 prepares per snapshot). Calls with extra arguments (better-sqlite3's own
 * pragma wrapper) bypass the cache.
 */
function cacheStatements(db: Db): void {
  const compile = db.prepare.bind(db)
  const cache = new Map<string, Database.Statement>()
  db.prepare = ((sql: string, ...rest: unknown[]) => {
    if (rest.length > 0) return (compile as (...a: unknown[]) => Database.Statement)(sql, ...rest)
    let stmt = cache.get(sql)
    if (!stmt) cache.set(sql, (stmt = translateWriteErrors(compile(sql))))
    return stmt
  }) as Db['prepare']
}

/** Makes a statement's run() throw storeWriteError's QmpdError for a full or failing disk. */
function translateWriteErrors(stmt: Database.Statement): Database.Statement {
  const run = stmt.run.bind(stmt)
  stmt.run = (...args) => {
    try {
      return run(...args)
    } catch (err) {
      throw storeWriteError(err) ?? err
    }
  }
  return stmt
}

/**
 * The QmpdError for an SQLite error that says the host could not write the store: SQLITE_FULL
 * (ENOSPC, or the filesystem's quota) is DISK_FULL, any SQLITE_IOERR is IO_ERROR; both are 507.
 * Undefined for every other error (a constraint, a bug), which stays what it was.
 */
export function storeWriteError(err: unknown): QmpdError | undefined {
  if (err instanceof QmpdError) return undefined
  const code = (err as { code?: unknown } | null)?.code
  if (typeof code !== 'string' || !code.startsWith('SQLITE_')) return undefined
  const message = err instanceof Error ? err.message : String(err)
  if (code === 'SQLITE_FULL') {
    return new QmpdError('DISK_FULL', `the state directory's disk is full: qmpd cannot write its store (${message})`, { sqlite: code }, { cause: err })
  }
  if (code.startsWith('SQLITE_IOERR')) {
    return new QmpdError('IO_ERROR', `qmpd cannot write its store: ${code} (${message})`, { sqlite: code }, { cause: err })
  }
  return undefined
}

/** Whether err is a store write that failed for want of disk (DISK_FULL or IO_ERROR from storeWriteError). */
export function isStoreWriteFailure(err: unknown): boolean {
  return err instanceof QmpdError && (err.code === 'DISK_FULL' || err.code === 'IO_ERROR') && typeof err.data['sqlite'] === 'string'
}
