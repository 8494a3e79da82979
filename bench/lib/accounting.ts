// Where qmpd's time in one operation goes (bench diagnostics): QMP commands by name, journal steps,
// synchronous SQLite and fs calls (SyncProbe), the rest; wraps prototypes from outside, changes no src.
import { Operation } from '../../src/ops/journal.ts'
import { QmpClient } from '../../src/qmp/client.ts'
import type { Db } from '../../src/store/db.ts'
import { SyncProbe } from './syncprobe.ts'

/** Per operation: ms by bucket; the buckets do not overlap (see split()). */
export type Split = Record<string, number>

/**
 * Times what one qmpd operation spends, by bucket: `qmp <command>` (call to reply, QEMU's work and
 * the socket), `step <name>` (a journal step's own time: the step minus the QMP commands in it),
 * `sqlite (sync)`/`fs (sync)` (outermost synchronous calls, SyncProbe), and `rest` (HTTP, validation, job queue,
 * plan, events: the total minus all of the above). Only meaningful while nothing else runs.
 */
export class Accounting {
  private readonly probe = new SyncProbe()
  private readonly qmp = new Map<string, number>()
  private readonly steps = new Map<string, number>()
  private qmpInStep = 0
  private depth = 0
  private readonly undo: Array<() => void> = []
  /** SQLite commits of the operation split() last closed (autocommitted statements + transactions). */
  lastCommits = 0

  constructor(db: Db) {
    this.probe.wrapDb(db)
    this.probe.wrapFs()
    // eslint-disable-next-line @typescript-eslint/no-this-alias -- the wrappers need the wrapped object's `this`
    const acc = this
    // eslint-disable-next-line @typescript-eslint/unbound-method -- re-bound with apply below
    const execute = QmpClient.prototype.execute
    QmpClient.prototype.execute = async function (this: QmpClient, ...args: unknown[]) {
      const t0 = performance.now()
      try {
        return await (execute as (...a: unknown[]) => Promise<unknown>).apply(this, args)
      } finally {
        const ms = performance.now() - t0
        const name = `qmp ${String(args[0])}`
        acc.qmp.set(name, (acc.qmp.get(name) ?? 0) + ms)
        if (acc.depth > 0) acc.qmpInStep += ms
      }
    } as typeof execute
    // eslint-disable-next-line @typescript-eslint/unbound-method -- re-bound with call below
    const step = Operation.prototype.step
    Operation.prototype.step = async function (this: Operation, name: string, ...rest: unknown[]) {
      const t0 = performance.now()
      const qmpBefore = acc.qmpInStep
      const syncBefore = acc.probe.outer.sqlite + acc.probe.outer.fs
      acc.depth++
      try {
        return await (step as (...a: unknown[]) => Promise<unknown>).call(this, name, ...rest)
      } finally {
        acc.depth--
        const own = performance.now() - t0 - (acc.qmpInStep - qmpBefore) - (acc.probe.outer.sqlite + acc.probe.outer.fs - syncBefore)
        const key = `step ${name}`
        acc.steps.set(key, (acc.steps.get(key) ?? 0) + own)
      }
    } as typeof step
    this.undo.push(() => {
      QmpClient.prototype.execute = execute
      Operation.prototype.step = step
    })
  }

  /** Clears the counters and starts counting (call just before the operation). */
  start(): void {
    this.qmp.clear()
    this.steps.clear()
    this.qmpInStep = 0
    this.probe.acc.clear()
    this.probe.outer.sqlite = 0
    this.probe.outer.fs = 0
    this.probe.commits = 0
    this.probe.on = true
  }

  /**
   * Stops counting and splits `totalMs` (the operation's wall time): QMP, steps (without their
   * QMP and their synchronous calls), sqlite, fs, rest. QMP commands sent outside a step are
   * assumed not to overlap a synchronous call (the event loop is single-threaded: they cannot run
   * during one, but a reply may wait behind one; that wait is counted in the QMP bucket).
   */
  split(totalMs: number): Split {
    this.probe.on = false
    this.lastCommits = this.probe.commits
    const out: Split = {}
    for (const [k, v] of this.qmp) out[k] = v
    for (const [k, v] of this.steps) out[k] = v
    // Outermost calls only: a transaction with its statements, BEGIN and COMMIT is counted once.
    out['sqlite (sync)'] = this.probe.outer.sqlite
    out['fs (sync)'] = this.probe.outer.fs
    const counted = Object.values(out).reduce((a, b) => a + b, 0)
    out['rest'] = totalMs - counted
    return out
  }

  /** Restores every wrapped function. */
  restore(): void {
    for (const u of this.undo.reverse()) u()
    this.undo.length = 0
    this.probe.restore()
  }
}

/** Medians per bucket over the operations, largest first. */
export function medianSplit(splits: Split[]): Array<[string, number]> {
  const keys = [...new Set(splits.flatMap((s) => Object.keys(s)))]
  const med = (xs: number[]): number => {
    const s = [...xs].sort((a, b) => a - b)
    return s.length ? (s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2) : 0
  }
  return keys.map((k) => [k, med(splits.map((s) => s[k] ?? 0))] as [string, number]).sort((a, b) => b[1] - a[1])
}
