// Diagnostics (--probe): times every synchronous call qmpd makes on its event-loop thread that can
// block — better-sqlite3 statements and node:fs *Sync functions — by wrapping them in this process.
// qmpd's code is not changed: the store handle is wrapped from outside, and node:fs's ESM named
// exports are re-synced (module.syncBuiltinESMExports) after the CommonJS object is patched.
import { createRequire, syncBuiltinESMExports } from 'node:module'
import type { Db } from '../../src/store/db.ts'

const require = createRequire(import.meta.url)

interface Acc {
  count: number
  totalMs: number
  maxMs: number
}

/** Per call kind: how often, how long in total, the longest single call. */
export class SyncProbe {
  readonly acc = new Map<string, Acc>()
  private readonly undo: Array<() => void> = []
  on = false
  /** Nesting of wrapped calls now (a statement inside a transaction is at depth 2). */
  private depth = 0
  /** ms of outermost calls only, by kind (sqlite / fs): no call is counted twice. */
  readonly outer = { sqlite: 0, fs: 0 }
  /** SQLite commits while on: outermost statement runs (each an autocommit) and whole transactions. */
  commits = 0

  record(name: string, ms: number): void {
    if (!this.on) return
    let a = this.acc.get(name)
    if (!a) this.acc.set(name, (a = { count: 0, totalMs: 0, maxMs: 0 }))
    a.count++
    a.totalMs += ms
    a.maxMs = Math.max(a.maxMs, ms)
  }

  private timed<F extends (...args: any[]) => any>(name: string, fn: F, self: unknown): F {
    // eslint-disable-next-line @typescript-eslint/no-this-alias -- the wrapper needs its own `this` (the wrapped object's)
    const probe = this
    return function (this: unknown, ...args: any[]) {
      const t0 = performance.now()
      probe.depth++
      try {
        return fn.apply(self ?? this, args)
      } finally {
        probe.depth--
        const ms = performance.now() - t0
        probe.record(name, ms)
        if (probe.on && probe.depth === 0) probe.outer[name.startsWith('fs.') ? 'fs' : 'sqlite'] += ms
        if (probe.on && probe.depth === 0 && (name === 'sqlite run' || name === 'sqlite transaction (whole)')) probe.commits++
      }
    } as F
  }

  /** Wraps db.prepare (and run/get/all/iterate of every statement it returns) and db.transaction. */
  wrapDb(db: Db): void {
    const anyDb = db as any
    const prepare = anyDb.prepare
    const transaction = anyDb.transaction
    // eslint-disable-next-line @typescript-eslint/no-this-alias -- as in timed()
    const probe = this
    const wrapped = new WeakSet<object>()
    anyDb.prepare = function (sql: string) {
      const t0 = performance.now()
      const st = prepare.call(db, sql)
      probe.record('sqlite prepare', performance.now() - t0)
      if (probe.on && probe.depth === 0) probe.outer.sqlite += performance.now() - t0
      // db.prepare hands out one cached statement per SQL text (src/store/db.ts): wrap it once.
      if (wrapped.has(st)) return st
      wrapped.add(st)
      for (const m of ['run', 'get', 'all', 'iterate']) {
        if (typeof st[m] === 'function') st[m] = probe.timed(`sqlite ${m}`, st[m], st)
      }
      return st
    }
    anyDb.transaction = function (fn: (...a: any[]) => any) {
      return probe.timed('sqlite transaction (whole)', transaction.call(db, fn), undefined)
    }
    this.undo.push(() => {
      anyDb.prepare = prepare
      anyDb.transaction = transaction
    })
  }

  /** Wraps the node:fs *Sync functions qmpd calls, for ESM importers too. */
  wrapFs(): void {
    const fs = require('node:fs') as Record<string, any>
    for (const name of ['existsSync', 'realpathSync', 'statSync', 'lstatSync', 'openSync', 'closeSync', 'rmSync', 'readFileSync', 'writeFileSync', 'fsyncSync', 'renameSync', 'mkdirSync', 'readdirSync', 'unlinkSync']) {
      const orig = fs[name]
      if (typeof orig !== 'function') continue
      const wrapped = this.timed(`fs.${name}`, orig, fs)
      // realpathSync.native is a property of the function; keep it reachable.
      if (orig.native) (wrapped).native = orig.native
      fs[name] = wrapped
      this.undo.push(() => {
        fs[name] = orig
      })
    }
    syncBuiltinESMExports()
  }

  /** Restores everything it wrapped. */
  restore(): void {
    for (const u of this.undo.reverse()) u()
    this.undo.length = 0
    syncBuiltinESMExports()
  }

  /** The call kinds by total time, as lines. */
  report(top = 12): string[] {
    return [...this.acc.entries()]
      .sort((a, b) => b[1].totalMs - a[1].totalMs)
      .slice(0, top)
      .map(([k, a]) => `${k}: ${a.count} calls, total ${a.totalMs.toFixed(1)} ms, max ${a.maxMs.toFixed(1)} ms`)
  }

  /** A plain object for the JSON. */
  toJSON(): Record<string, Acc> {
    return Object.fromEntries([...this.acc.entries()].map(([k, a]) => [k, { count: a.count, totalMs: Math.round(a.totalMs * 10) / 10, maxMs: Math.round(a.maxMs * 10) / 10 }]))
  }
}
