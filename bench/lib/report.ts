// The results table (terminal and Markdown), the machine description and the JSON document.
import { execFileSync } from 'node:child_process'
import { cpus, loadavg, totalmem } from 'node:os'
import { readdirSync, readFileSync } from 'node:fs'
import type { Row } from './case.ts'
import { benchQemu } from './qemu-choice.ts'
import { round, rounded } from './stats.ts'

/** What the numbers were measured on. */
export interface Machine {
  nproc: number
  cpuModel: string
  memGiB: number
  qemu: string
  node: string
  kernel: string
  accel: string
  date: string
  loadavgBefore: number[]
  loadavgAfter?: number[]
  /** QEMU processes already running when the bench started (not the bench's: other users' load). */
  otherQemusAtStart: number
  /** The code measured: git HEAD and the files under src/ that differ from it (others edit concurrently). */
  git: { head: string; dirtySrc: string[] }
}

/** git HEAD and the uncommitted changes under src/ (the code the in-process daemon runs). */
export function gitState(): Machine['git'] {
  try {
    const head = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { encoding: 'utf8' }).trim()
    const dirty = execFileSync('git', ['status', '--porcelain', '--', 'src'], { encoding: 'utf8' })
      .split('\n')
      .filter(Boolean)
      .map((l) => l.slice(3))
    return { head, dirtySrc: dirty }
  } catch {
    return { head: 'unknown', dirtySrc: [] }
  }
}

/** How many qemu-system processes run right now. */
export function countQemus(): number {
  let n = 0
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue
    try {
      if (readFileSync(`/proc/${e}/cmdline`, 'latin1').startsWith('qemu-system')) n++
    } catch {
      /* gone */
    }
  }
  return n
}

/** Describes this machine (nproc, CPU model from /proc/cpuinfo, QEMU and Node versions, date). */
export function machine(): Machine {
  let cpuModel = 'unknown'
  try {
    cpuModel = /^model name\s*:\s*(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1]?.trim() ?? 'unknown'
  } catch {
    /* not Linux */
  }
  const q = benchQemu()
  let kernel = 'unknown'
  try {
    kernel = readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim()
  } catch {
    /* not Linux */
  }
  let nproc = cpus().length
  try {
    nproc = Number(execFileSync('nproc', { encoding: 'utf8' }).trim()) || nproc
  } catch {
    /* keep os.cpus() */
  }
  return {
    nproc,
    cpuModel,
    memGiB: Math.round(totalmem() / 2 ** 30),
    qemu: `${q.version} (${q.binary}; machine ${q.machineType})`,
    node: process.version,
    kernel,
    accel: `${q.accel} (${q.accelNote})`,
    date: new Date().toISOString(),
    loadavgBefore: loadavg().map((x) => Math.round(x * 100) / 100),
    otherQemusAtStart: countQemus(),
    git: gitState(),
  }
}

function fmt(v: number | undefined): string {
  if (v === undefined || !Number.isFinite(v)) return '–'
  return String(round(v))
}

function triple(m: Row['qmpd']): string {
  if (!m) return '–'
  return `${fmt(m.stats.min)} / ${fmt(m.stats.median)} / ${fmt(m.stats.p95)}`
}

function result(r: Row): string {
  if (r.error) return 'ERROR'
  if (r.pass === undefined) return 'info'
  return r.pass ? 'PASS' : 'MISS'
}

/** The table's columns for one row. */
function cells(r: Row): string[] {
  return [
    r.qemu ?? '–',
    r.case,
    r.metric,
    r.unit,
    r.qmpd ? String(r.qmpd.stats.n) : r.baseline ? String(r.baseline.stats.n) : '–',
    r.error ? `error: ${r.error}` : triple(r.qmpd),
    r.baseline ? `${triple(r.baseline)} (${r.baseline.name})` : '–',
    r.ratio !== undefined ? `${r.ratio.toFixed(2)}x` : '–',
    r.target ?? '–',
    result(r),
  ]
}

const HEAD = ['QEMU', 'case', 'metric', 'unit', 'n', 'qmpd min / median / p95', 'baseline min / median / p95', 'ratio', 'target', 'result']

/** A plain-text table for the terminal. */
export function textTable(rows: Row[]): string {
  const all = [HEAD, ...rows.map(cells)]
  const widths = HEAD.map((_, i) => Math.min(70, Math.max(...all.map((r) => r[i]!.length))))
  const line = (r: string[]): string => r.map((c, i) => (c.length > widths[i]! ? c.slice(0, widths[i]! - 1) + '…' : c.padEnd(widths[i]!))).join(' | ')
  return [line(HEAD), widths.map((w) => '-'.repeat(w)).join('-+-'), ...all.slice(1).map(line)].join('\n')
}

const md = (s: string): string => s.replace(/\|/g, '\\|')

/** The same table in Markdown. */
export function markdownTable(rows: Row[]): string {
  return [`| ${HEAD.join(' | ')} |`, `| ${HEAD.map(() => '---').join(' | ')} |`, ...rows.map((r) => `| ${cells(r).map(md).join(' | ')} |`)].join('\n')
}

/** Notes and extra numbers per row, as a Markdown list. */
export function markdownNotes(rows: Row[]): string {
  const out: string[] = []
  for (const r of rows) {
    const extra = r.extra ? Object.entries(r.extra).map(([k, v]) => `${k}=${typeof v === 'number' ? round(v) : v}`) : []
    if (!r.note && extra.length === 0) continue
    out.push(`- **${r.case} / ${md(r.metric)}**: ${[r.note, extra.length ? extra.join(', ') : ''].filter(Boolean).join('; ')}`)
  }
  return out.join('\n')
}

/** A one-line description of the machine. */
export function machineLine(m: Machine): string {
  return `${m.date} — ${m.nproc} × ${m.cpuModel}, ${m.memGiB} GiB RAM, ${m.qemu}, accel ${m.accel}, Node ${m.node}, Linux ${m.kernel}, load average before ${m.loadavgBefore.join(' ')}${m.loadavgAfter ? `, after ${m.loadavgAfter.join(' ')}` : ''}, ${m.otherQemusAtStart} other QEMU process(es) running at start, code at ${m.git.head}${m.git.dirtySrc.length ? ` with uncommitted changes to ${m.git.dirtySrc.join(', ')}` : ''}`
}

/** Rows with rounded numbers, for the JSON document. */
export function jsonRows(rows: Row[]): unknown[] {
  return rows.map((r) => ({
    ...r,
    ...(r.qmpd ? { qmpd: { ...r.qmpd, stats: rounded(r.qmpd.stats) } } : {}),
    ...(r.baseline ? { baseline: { ...r.baseline, stats: rounded(r.baseline.stats) } } : {}),
    ...(r.ratio !== undefined ? { ratio: Math.round(r.ratio * 1000) / 1000 } : {}),
    result: result(r),
  }))
}
