// What a bench case is and what it reports.
import type { Stats } from './stats.ts'

/** What every case gets from the runner. */
export interface CaseContext {
  /** Repetitions of each measured operation (--reps). */
  reps: number
  /** --quick: fewer iterations, smaller waits (a smoke run; numbers are less stable). */
  quick: boolean
  /** A fresh temporary directory for this case, removed by the runner afterwards. */
  work: string
  /** pino level for the in-process daemon (--log); 'silent' unless asked. */
  logLevel: string
  /** Where a case writes the daemon's debug log when --log is not silent. */
  logFile: string
  /** --profile: cases may CPU-profile their qmpd measurements into `work` (kept) and log the top frames. */
  profile: boolean
  /** --probe: cases may time qmpd's synchronous SQLite and fs calls during their measurements (slows them a little). */
  probe: boolean
  /** Names of the cases selected in this run (a case that reports several rows may skip some). */
  selected: ReadonlySet<string>
  /** Progress line on stderr. */
  log(msg: string): void
}

/** A measured sample with the side it belongs to. */
export interface Measured {
  /** What was measured, e.g. "raw QMP transaction" or "dd conv=fsync". */
  name: string
  stats: Stats
}

/** One line of the results table. */
export interface Row {
  /** The case name (as given to --cases). */
  case: string
  /** The QEMU version it ran on (set by the runner: a run may measure several QEMUs). */
  qemu?: string
  /** What this line measures. */
  metric: string
  unit: 'ms' | 'MiB/s' | 'MB' | '% of a core'
  qmpd?: Measured
  baseline?: Measured
  /** qmpd median / baseline median, when both exist. */
  ratio?: number
  /** The target in words, e.g. "<= 1.5x raw". */
  target?: string
  /** true PASS, false MISS, undefined: informational. */
  pass?: boolean
  /** Extra numbers (throughput floors, guest pauses, RSS…) for the JSON and the notes column. */
  extra?: Record<string, number | string>
  note?: string
  /** Diagnostics for the JSON only (--probe, --profile). */
  diagnostics?: unknown
  /** Set when the case failed: no number is reported for it. */
  error?: string
}

/** A bench case: `names` are the rows it can produce (selectable with --cases). */
export interface Case {
  name: string
  /** Other names this case answers to (a case may report several selectable rows). */
  provides?: string[]
  title: string
  run(ctx: CaseContext): Promise<Row[]>
}

/** Builds a row comparing qmpd with a baseline on medians, checking `maxRatio` (and `maxAbs` on qmpd's median). */
export function compare(
  base: Omit<Row, 'ratio' | 'pass' | 'target'>,
  opts: { maxRatio?: number; maxAbs?: number; targetText?: string },
): Row {
  const q = base.qmpd?.stats.median
  const b = base.baseline?.stats.median
  const ratio = q !== undefined && b !== undefined && b > 0 ? q / b : undefined
  let pass: boolean | undefined
  const parts: string[] = []
  if (opts.maxAbs !== undefined) {
    parts.push(`median <= ${opts.maxAbs} ${base.unit}`)
    if (q !== undefined) pass = q <= opts.maxAbs
  }
  if (opts.maxRatio !== undefined) {
    parts.push(`<= ${opts.maxRatio}x`)
    if (ratio !== undefined) pass = (pass ?? true) && ratio <= opts.maxRatio
  }
  const target = opts.targetText ?? (parts.length > 0 ? parts.join(', ') : undefined)
  return { ...base, ...(ratio !== undefined ? { ratio } : {}), ...(target !== undefined ? { target } : {}), ...(pass !== undefined ? { pass } : {}) }
}

/**
 * Runs the two sides of one repetition, qmpd first on even repetitions and the baseline first on
 * odd ones, so that neither side always inherits the other's after-effects (page-cache writeback,
 * a QEMU still exiting).
 */
export async function bothSides(i: number, qmpdSide: () => Promise<void>, baselineSide: () => Promise<void>): Promise<void> {
  if (i % 2 === 0) {
    await qmpdSide()
    await baselineSide()
  } else {
    await baselineSide()
    await qmpdSide()
  }
}

/**
 * Records a failed qmpd repetition: the error's message (qmpd's own `message` when the error
 * carries an API answer) goes to `failures` for withFailures, and the whole of it to the log.
 */
export function noteFailure(ctx: CaseContext, failures: string[], rep: number, what: string, err: unknown): void {
  const msg = (err as Error).message.replace(/\s+/g, ' ')
  failures.push(/"message":"([^"]*)"/.exec(msg)?.[1] ?? msg.slice(0, 200))
  ctx.log(`rep ${rep}: qmpd ${what} FAILED: ${msg.slice(0, 300)}`)
}

/**
 * Marks a row MISS when some repetitions of qmpd's operation failed: the timings are of the
 * successful ones only, and the note says how many failed and why.
 */
export function withFailures(row: Row, failures: string[], total: number): Row {
  if (failures.length === 0) return row
  const uniq = [...new Set(failures)]
  return {
    ...row,
    pass: false,
    target: `${row.target ?? ''}; every repetition succeeds`.replace(/^; /, ''),
    note: `${failures.length} of ${total} qmpd repetitions FAILED (timings are of the others): ${uniq.join(' | ').slice(0, 400)}${row.note ? `; ${row.note}` : ''}`,
    extra: { ...row.extra, failedReps: failures.length },
  }
}
