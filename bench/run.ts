// qmpd benchmark: every case measures qmpd (HTTP call to the finished job, metadata persisted)
// beside a baseline measured in the same run on the same QEMU configuration.
//
//   npm run bench                              all cases, 5 repetitions, on the system's QEMU and (when found) QEMU 10
//   npm run bench -- --cases get,extsnap --reps 10
//   npm run bench -- --quick                   fewer iterations (smoke run)
//   npm run bench -- --log debug               daemon debug log (QMP send/recv ms) per case in the work dir, kept
//   npm run bench -- --profile --cases burst50   CPU profile of the bursts (work dir kept)
//   npm run bench -- --probe --cases burst50     time qmpd's synchronous SQLite and fs calls in the bursts
//   npm run bench -- --list
//   npm run bench -- --qemu10                   QEMU 10 only (.qemu/10 of the checkout, else the tree unpacked at QMPD_QEMU10_ROOT or /tmp/q10/root)
//   npm run bench -- --system-qemu              the QEMU on PATH only (default: that one, then QEMU 10 when found; --both insists on both)
//   npm run bench -- --qemu-binary PATH [--qemu-img PATH]   any QEMU (also QMPD_QEMU / QMPD_QEMU_IMG); both sides run it
//   npm run bench -- --accel tcg                skip the KVM probe (default: KVM when the daemon's probe passes, else TCG)
//
// Writes bench/results/latest.json, appends a line to bench/results/history.jsonl and, for a full
// run of every case (or with --doc), the table between the markers in docs/performance.md.
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { rm } from 'node:fs/promises'
import { loadavg } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import type { Case, Row } from './lib/case.ts'
import { aliveCount, installExitHandlers, onExitSync, reapAll } from './lib/reaper.ts'
import { jsonRows, machine, machineLine, markdownNotes, markdownTable, textTable, type Machine } from './lib/report.ts'
import { round } from './lib/stats.ts'
import { chooseQemu, unpackedQemuWrappers } from './lib/qemu-choice.ts'
import { getCase } from './cases/get.ts'
import { extSnapCase } from './cases/extsnap.ts'
import { internalCheckpointCase } from './cases/internal.ts'
import { liveCheckpointCase } from './cases/live.ts'
import { revertExternalCase } from './cases/revert-external.ts'
import { revertInternalCase } from './cases/revert-internal.ts'
import { dataCases } from './cases/data.ts'
import { managedSaveCase } from './cases/managedsave.ts'
import { fleetCase } from './cases/fleet.ts'
import { backupCase } from './cases/backup.ts'
import { deepChainCase, listStoppedCase } from './cases/control.ts'
import { ramStateCase } from './cases/ramstate.ts'

const CASES: Case[] = [
  getCase,
  extSnapCase,
  internalCheckpointCase,
  liveCheckpointCase,
  revertExternalCase,
  revertInternalCase,
  ...dataCases,
  managedSaveCase,
  backupCase,
  fleetCase,
  listStoppedCase,
  deepChainCase,
  ramStateCase,
]

const root = join(dirname(fileURLToPath(import.meta.url)), '..')

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      cases: { type: 'string' },
      reps: { type: 'string' },
      quick: { type: 'boolean', default: false },
      log: { type: 'string', default: 'silent' },
      profile: { type: 'boolean', default: false },
      probe: { type: 'boolean', default: false },
      list: { type: 'boolean', default: false },
      doc: { type: 'boolean' },
      'no-doc': { type: 'boolean' },
      'qemu-binary': { type: 'string' },
      'qemu-img': { type: 'string' },
      qemu10: { type: 'boolean', default: false },
      'system-qemu': { type: 'boolean', default: false },
      both: { type: 'boolean', default: false },
      accel: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    allowPositionals: false,
  })
  const names = (c: Case): string[] => [c.name, ...(c.provides ?? [])]
  if (values.help || values.list) {
    console.log('cases (--cases a,b,c):')
    for (const c of CASES) console.log(`  ${names(c).join(', ').padEnd(34)} ${c.title}`)
    if (values.help) console.log('\noptions: --reps N (default 5; --quick: 3), --quick, --log LEVEL (daemon log to the work dir, kept), --profile (CPU profiles of some qmpd measurements, kept), --probe (time qmpd synchronous SQLite/fs calls), --doc / --no-doc, --both (system QEMU, then QEMU 10: the default when QEMU 10 is found), --system-qemu, --qemu10, --qemu-binary PATH, --qemu-img PATH (or QMPD_QEMU / QMPD_QEMU_IMG), --accel tcg|kvm (default: the KVM probe decides)')
    return 0
  }
  const reps = values.reps !== undefined ? Number(values.reps) : values.quick ? 3 : 5
  if (!Number.isInteger(reps) || reps < 1 || reps > 1000) throw new Error(`--reps must be a positive integer, got ${values.reps}`)
  const known = new Set(CASES.flatMap(names))
  const wanted = values.cases ? values.cases.split(',').map((s) => s.trim()).filter(Boolean) : [...known]
  for (const w of wanted) if (!known.has(w)) throw new Error(`unknown case ${w}; known: ${[...known].join(', ')}`)
  const selected = new Set(wanted)
  const chosen = CASES.filter((c) => names(c).some((n) => selected.has(n)))
  const full = chosen.length === CASES.length && !values.quick && names(fleetCase).every((n) => selected.has(n))
  const writeDoc = values['no-doc'] ? false : (values.doc ?? full)

  installExitHandlers()
  const tmpBase = process.env['QMPD_BENCH_TMP'] ?? '/var/tmp'
  const workRoot = mkdtempSync(join(existsSync(tmpBase) ? tmpBase : '/tmp', 'qb-'))
  const keepWork = values.log !== 'silent' || values.profile
  if (!keepWork) onExitSync(() => rmSync(workRoot, { recursive: true, force: true }))
  if (values.accel !== undefined && values.accel !== 'tcg' && values.accel !== 'kvm') throw new Error(`--accel must be tcg or kvm, got ${values.accel}`)
  const t0 = performance.now()
  const rows: Row[] = []
  const machines: Machine[] = []
  const log = (msg: string): void => {
    process.stderr.write(`[${((performance.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${msg}\n`)
  }
  const pathBefore = process.env['PATH'] ?? ''
  const passes = qemuPasses(values, workRoot)
  log(`bench: ${chosen.map((c) => c.name).join(', ')}; reps ${reps}${values.quick ? ' (quick)' : ''}; ${passes.length} QEMU(s); work dir ${workRoot}`)
  try {
    for (const [p, pick] of passes.entries()) {
      process.env['PATH'] = pathBefore
      const q = await chooseQemu({ ...pick, ...(values.accel ? { forceAccel: values.accel } : {}) })
      // Helpers that run qemu-img / qemu-io / qemu-system-x86_64 by name (disk images, fills) get the same QEMU.
      const binDir = join(workRoot, `bin${p}`)
      mkdirSync(binDir, { recursive: true })
      for (const [name, target] of [['qemu-system-x86_64', q.binary], ['qemu-img', q.qemuImg]] as const) {
        if (target.includes('/') && !existsSync(join(binDir, name))) symlinkSync(target, join(binDir, name))
      }
      const io = join(dirname(q.qemuImg), 'qemu-io')
      if (q.qemuImg.includes('/') && existsSync(io) && !existsSync(join(binDir, 'qemu-io'))) symlinkSync(io, join(binDir, 'qemu-io'))
      process.env['PATH'] = `${binDir}:${pathBefore}`
      const m = machine()
      machines.push(m)
      const label = qemuLabel(q.version)
      log(`QEMU ${label}: ${q.version} (${q.binary}), accel ${q.accel}`)
      rows.push(...(await runCases(chosen, reps, values, selected, workRoot, keepWork, log)).map((r) => ({ ...r, qemu: label })))
      m.loadavgAfter = loadavg().map((x) => Math.round(x * 100) / 100)
    }
  } finally {
    await reapAll()
    if (!keepWork) await rm(workRoot, { recursive: true, force: true }).catch(() => {})
    else log(`work dir kept (with daemon logs): ${workRoot}`)
  }
  const totalSec = (performance.now() - t0) / 1000
  const thr = throughputTable(rows)
  for (const m of machines) console.log(`\nqmpd bench — ${machineLine(m)}`)
  console.log(`reps ${reps}${values.quick ? ' (quick)' : ''}; total ${totalSec.toFixed(1)} s\n`)
  console.log(textTable(rows))
  if (thr.text) console.log(`\nThroughput (MiB/s, median):\n${thr.text}`)
  console.log(`\n${rows.filter((r) => r.pass === true).length} PASS, ${rows.filter((r) => r.pass === false).length} MISS, ${rows.filter((r) => r.error).length} ERROR`)

  const doc = {
    machine: machines[0],
    machines,
    reps,
    quick: values.quick,
    cases: chosen.map((c) => c.name),
    totalSeconds: round(totalSec),
    rows: jsonRows(rows),
    throughput: thr.rows,
  }
  const outDir = join(root, 'bench', 'results')
  mkdirSync(outDir, { recursive: true })
  writeFileSync(join(outDir, 'latest.json'), JSON.stringify(doc, null, 2) + '\n')
  // One line per run: medians and verdicts only, to see which results are stable from run to run.
  const line = {
    date: machines[0]?.date,
    reps,
    quick: values.quick,
    qemus: machines.map((m) => m.qemu),
    loadavgBefore: machines[0]?.loadavgBefore,
    otherQemusAtStart: machines[0]?.otherQemusAtStart,
    totalSeconds: round(totalSec),
    rows: rows.map((r) => ({
      case: r.case,
      qemu: r.qemu,
      metric: r.metric,
      qmpd: r.qmpd ? round(r.qmpd.stats.median) : null,
      baseline: r.baseline ? round(r.baseline.stats.median) : null,
      ratio: r.ratio !== undefined ? Math.round(r.ratio * 100) / 100 : null,
      result: r.error ? 'ERROR' : r.pass === undefined ? 'info' : r.pass ? 'PASS' : 'MISS',
    })),
  }
  appendFileSync(join(outDir, 'history.jsonl'), JSON.stringify(line) + '\n')
  log(`wrote bench/results/latest.json, appended to bench/results/history.jsonl`)
  if (writeDoc) {
    updateDoc(join(root, 'docs', 'performance.md'), [
      ...machines.map((m) => `Measured ${machineLine(m)}.\n`),
      `Command: \`npm run bench${process.argv.slice(2).length ? ' -- ' + process.argv.slice(2).join(' ') : ''}\` — reps ${reps}, total ${totalSec.toFixed(1)} s.`,
      ``,
      markdownTable(rows),
      ``,
      thr.md ? `Throughput of the data-movement cases (MiB/s, from median times; the same data and size on every line):\n\n${thr.md}\n` : '',
      `Notes per row:\n\n${markdownNotes(rows)}`,
    ].join('\n'))
    log('updated docs/performance.md')
  }
  if (aliveCount() > 0) log(`WARNING: ${aliveCount()} tracked QEMU process(es) still alive`)
  // A MISS is a finding, not a failure of the bench; a case that could not measure is.
  return rows.some((r) => r.error) ? 1 : 0
}

/** Runs the chosen cases once on the QEMU chooseQemu() picked; a case that throws gives ERROR rows. */
async function runCases(
  chosen: Case[],
  reps: number,
  values: { quick: boolean; log: string; profile: boolean; probe: boolean },
  selected: ReadonlySet<string>,
  workRoot: string,
  keepWork: boolean,
  log: (msg: string) => void,
): Promise<Row[]> {
  const names = (c: Case): string[] => [c.name, ...(c.provides ?? [])]
  const rows: Row[] = []
  for (const c of chosen) {
    const work = mkdtempSync(join(workRoot, `${c.name}-`))
    const started = performance.now()
    log(`case ${c.name}: ${c.title}`)
    try {
      const got = await c.run({
        reps,
        quick: values.quick,
        work,
        logLevel: values.log,
        logFile: join(work, 'qmpd.log'),
        profile: values.profile,
        probe: values.probe,
        selected,
        log: (msg) => log(`  ${c.name}: ${msg}`),
      })
      rows.push(...got.filter((r) => selected.has(r.case)))
    } catch (err) {
      const msg = (err as Error).message ?? String(err)
      log(`case ${c.name} FAILED: ${(err as Error).stack ?? msg}`)
      for (const n of names(c)) if (selected.has(n)) rows.push({ case: n, metric: c.title, unit: 'ms', error: msg.split('\n')[0]!.slice(0, 300) })
    } finally {
      const killed = await reapAll()
      if (killed) log(`  reaped ${killed} QEMU process(es) left by ${c.name}`)
      if (!keepWork) await rm(work, { recursive: true, force: true }).catch(() => {})
    }
    log(`case ${c.name} done in ${((performance.now() - started) / 1000).toFixed(1)} s`)
  }
  return rows
}

/** "7.2.22" from `QEMU emulator version 7.2.22 (Debian …)`: the label of a row's QEMU. */
function qemuLabel(versionLine: string): string {
  return /version (\S+)/.exec(versionLine)?.[1] ?? versionLine
}

type QemuFlags = { 'qemu-binary'?: string; 'qemu-img'?: string; qemu10?: boolean; 'system-qemu'?: boolean; both?: boolean }

/**
 * The QEMUs to measure, in order. An explicit choice (--qemu10, --qemu-binary, --system-qemu,
 * QMPD_QEMU) is the only one; otherwise the system's QEMU (PATH), then QEMU 10 when a tree of it
 * is found (--both: it must be).
 */
function qemuPasses(values: QemuFlags, workRoot: string): Array<{ binary?: string; qemuImg?: string }> {
  const explicit = [values.qemu10, values['qemu-binary'] !== undefined, values['system-qemu']].filter(Boolean).length
  if (explicit > 1) throw new Error('--qemu10, --qemu-binary and --system-qemu exclude each other')
  if (values.both && explicit > 0) throw new Error('--both measures the system QEMU and QEMU 10; it excludes --qemu10, --qemu-binary, --system-qemu')
  if (explicit > 0 || (!values.both && process.env['QMPD_QEMU'] !== undefined)) return [pickQemu(values, workRoot)]
  const system = { binary: 'qemu-system-x86_64', qemuImg: 'qemu-img' }
  try {
    return [system, pickQemu({ qemu10: true }, workRoot)]
  } catch (err) {
    if (values.both) throw err
    process.stderr.write(`bench: no QEMU 10 found (${(err as Error).message}): the system QEMU only\n`)
    return [system]
  }
}

/** --qemu10 / --qemu-binary / --qemu-img as paths (undefined: chooseQemu reads QMPD_QEMU*, then PATH). */
function pickQemu(values: { 'qemu-binary'?: string; 'qemu-img'?: string; qemu10?: boolean }, workRoot: string): { binary?: string; qemuImg?: string } {
  if (values.qemu10 && values['qemu-binary']) throw new Error('--qemu10 and --qemu-binary exclude each other')
  if (values.qemu10) {
    const installed = join(root, '.qemu', '10', 'bin')
    if (existsSync(join(installed, 'qemu-system-x86_64'))) return { binary: join(installed, 'qemu-system-x86_64'), qemuImg: join(installed, 'qemu-img') }
    return unpackedQemuWrappers(process.env['QMPD_QEMU10_ROOT'] ?? '/tmp/q10/root', join(workRoot, 'q10-bin'))
  }
  return { ...(values['qemu-binary'] ? { binary: values['qemu-binary'] } : {}), ...(values['qemu-img'] ? { qemuImg: values['qemu-img'] } : {}) }
}

/** The data-movement rows as MiB/s next to raw QMP, dd conv=fsync and qemu-img convert of the same size. */
function throughputTable(rows: Row[]): { text: string; md: string; rows: unknown[] } {
  const t = rows.filter((r) => r.extra?.['qmpdMiBps'] !== undefined)
  if (t.length === 0) return { text: '', md: '', rows: [] }
  const head = ['QEMU', 'operation', 'MiB', 'qmpd', 'raw QMP', 'dd conv=fsync', 'qemu-img convert']
  const body = t.map((r) => [
    r.qemu ?? '–',
    r.metric,
    String(r.extra!['mib']),
    String(round(Number(r.extra!['qmpdMiBps']))),
    String(round(Number(r.extra!['rawMiBps']))),
    String(round(Number(r.extra!['ddMiBps']))),
    String(round(Number(r.extra!['convertMiBps']))),
  ])
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)))
  const line = (c: string[]): string => c.map((x, i) => x.padEnd(widths[i]!)).join(' | ')
  return {
    text: [line(head), widths.map((w) => '-'.repeat(w)).join('-+-'), ...body.map(line)].join('\n'),
    md: [`| ${head.join(' | ')} |`, `| ${head.map(() => '---').join(' | ')} |`, ...body.map((b) => `| ${b.join(' | ')} |`)].join('\n'),
    rows: t.map((r) => ({ qemu: r.qemu, operation: r.metric, ...r.extra })),
  }
}

const BEGIN = '<!-- bench:begin (generated by npm run bench; edits between the markers are overwritten) -->'
const END = '<!-- bench:end -->'

/** Replaces the generated part of docs/performance.md, keeping everything written around it. */
function updateDoc(file: string, generated: string): void {
  const block = `${BEGIN}\n${generated.trim()}\n${END}`
  let text = existsSync(file) ? readFileSync(file, 'utf8') : `# Performance\n\n## Latest results\n\n${BEGIN}\n${END}\n`
  const a = text.indexOf(BEGIN.slice(0, 20))
  const b = text.indexOf(END)
  if (a >= 0 && b > a) text = text.slice(0, a) + block + text.slice(b + END.length)
  else text = `${text.trimEnd()}\n\n## Latest results\n\n${block}\n`
  mkdirSync(dirname(file), { recursive: true })
  writeFileSync(file, text)
}

main().then(
  (code) => {
    process.exitCode = code
  },
  async (err) => {
    console.error(err)
    await reapAll()
    process.exitCode = 2
  },
)
