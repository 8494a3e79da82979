// RAM state at 2 GiB (issue 13 parts 3 and 4), a guest whose RAM is random, through qmpd's API, in
// one run: on the bench's QEMU managed save + restore (POST start), save + restore of a state file,
// a paused and a live external checkpoint; on the other QEMU (Debian's 7.2 on PATH / QEMU 10 from
// .qemu/10) managed save + restore; dd conv=fsync of the same random bytes beside each. Reaps its QEMUs.
import { execFile } from 'node:child_process'
import { randomFillSync } from 'node:crypto'
import { existsSync, realpathSync, rmSync } from 'node:fs'
import { open } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import type { ActiveDisk } from '../../src/vm/argv.ts'
import type { Case, CaseContext, Row } from '../lib/case.ts'
import { sleep, standardDisks } from '../lib/guestvm.ts'
import { run } from '../lib/images.ts'
import { benchQemu, unpackedQemuWrappers } from '../lib/qemu-choice.ts'
import { benchLogger, startBenchDaemon, vmDir, type BenchDaemon } from '../lib/qmpd.ts'
import { launchRaw, migrationEnd, rawCont, serveToFile, vmDef } from '../lib/raw.ts'
import { summarize, type Stats } from '../lib/stats.ts'
import { qemuVersion } from '../../src/vm/qemu-version.ts'

const execFileP = promisify(execFile)
const MEM_MIB = 2048
/** The loader puts the random file at 1 MiB (below it: the BIOS areas), so it is 1 MiB short of RAM. */
const RAND_MIB = MEM_MIB - 1
const LOADER_ADDR = 0x100000

/** One QEMU's measurements. */
interface Side {
  label: string
  binary: string
  saveFormat: string
  msSave: number[]
  msRestore: number[]
  fileSave: number[]
  fileRestore: number[]
  paused: number[]
  pausedDown: number[]
  live: number[]
  liveDown: number[]
  liveMethod: string
  dd: number[]
  saveBytes: number
}

/** The QEMU that is not the bench's: QEMU 10 when the bench runs the system one, else the system one. */
function otherQemu(work: string): { binary: string; qemuImg: string } | undefined {
  const sys = '/usr/bin/qemu-system-x86_64'
  const given = benchQemu().binary
  let givenIsSystem = false
  try {
    givenIsSystem = realpathSync(given.includes('/') ? given : sys) === realpathSync(sys)
  } catch {
    /* keep false */
  }
  if (!givenIsSystem) return existsSync(sys) ? { binary: sys, qemuImg: '/usr/bin/qemu-img' } : undefined
  const installed = join(process.cwd(), '.qemu', '10', 'bin')
  if (existsSync(join(installed, 'qemu-system-x86_64'))) return { binary: join(installed, 'qemu-system-x86_64'), qemuImg: join(installed, 'qemu-img') }
  const root = process.env['QMPD_QEMU10_ROOT'] ?? '/tmp/q10/root'
  if (existsSync(join(root, 'usr', 'bin', 'qemu-system-x86_64'))) return unpackedQemuWrappers(root, join(work, 'q10-bin'))
  return undefined
}

/** `mib` MiB of random bytes (node's CSPRNG: about twice as fast here as reading /dev/urandom). */
async function randomFile(file: string, mib: number): Promise<void> {
  const fh = await open(file, 'w', 0o600)
  try {
    const chunk = Buffer.alloc(16 * 2 ** 20)
    for (let done = 0; done < mib; done += 16) {
      const n = Math.min(16, mib - done) * 2 ** 20
      randomFillSync(chunk, 0, n)
      await fh.write(chunk, 0, n)
    }
  } finally {
    await fh.close()
  }
}

/** dd conv=fsync of the random file (the same bytes the guest holds); ms. */
async function ddOnce(src: string, dst: string): Promise<number> {
  rmSync(dst, { force: true })
  const t0 = performance.now()
  await run('dd', [`if=${src}`, `of=${dst}`, 'bs=4M', 'conv=fsync', 'status=none'])
  const ms = performance.now() - t0
  rmSync(dst, { force: true })
  return ms
}

/**
 * Gives qmpd's VM `vm` (defined, shut off) random RAM: a raw QEMU with the same argv plus QEMU's
 * generic loader (`-device loader,file=…,force-raw=on` copies the file into guest RAM at reset; it
 * has no migration state) runs the test guest for a moment and is saved as a plain migration
 * stream, which qmpd's POST restore loads into an ordinary QEMU of its own: anonymous RAM, random.
 */
async function seedRandomRam(bd: BenchDaemon, vm: string, disks: Array<{ id: string; file: string }>, rand: string, binary: string, ctx: CaseContext): Promise<void> {
  const dir = join(vmDir(bd, vm), 'seed')
  const def = vmDef(vm, MEM_MIB, disks)
  const active: ActiveDisk[] = disks.map((x) => ({ id: x.id, file: x.file, format: 'qcow2', gen: 0 }))
  const raw = await launchRaw(dir, def, active, { binary, extraArgs: ['-device', `loader,file=${rand},addr=0x${LOADER_ADDR.toString(16)},force-raw=on`] })
  const file = join(vmDir(bd, vm), 'seed.state')
  try {
    await rawCont(raw.qmp)
    await sleep(1500)
    await raw.qmp.cmd('stop')
    await raw.qmp.cmd('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] })
    await raw.qmp.cmd('migrate-set-parameters', { 'max-bandwidth': 2 ** 40 })
    // Not fsynced: the seed is read back at once and deleted.
    const server = await serveToFile(join(dir, 'seed.sock'), file, { fsync: false })
    try {
      const done = migrationEnd(raw.qmp)
      await raw.qmp.cmd('migrate', { uri: 'unix:seed.sock' })
      if ((await done) !== 'completed') throw new Error('seeding: migration did not complete')
      const bytes = await server.done()
      // A stream sends a zero page as a few bytes: a file of about RAM's size shows the RAM is full.
      if (bytes < 0.95 * MEM_MIB * 2 ** 20) throw new Error(`seeding: stream of ${bytes} bytes for ${MEM_MIB} MiB of RAM: guest RAM is not random`)
      ctx.log(`seeded ${vm}: ${(bytes / 2 ** 20).toFixed(0)} MiB stream`)
    } finally {
      server.close()
    }
  } finally {
    await raw.quit()
  }
  await bd.op(`/v1/vms/${vm}/restore`, { file })
  rmSync(file, { force: true })
  rmSync(dir, { recursive: true, force: true })
}

const mibps = (ms: number, bytes: number): number => bytes / 2 ** 20 / (ms / 1000)

/**
 * The measurements on one QEMU (a daemon of its own, removed afterwards): all of them when `full`,
 * else only the managed save and its restore (the other QEMU's side of the restore speed-up).
 */
async function measure(ctx: CaseContext, qemu: { binary: string; qemuImg: string }, rand: string, tag: string, full: boolean): Promise<Side> {
  const v = await qemuVersion(qemu.binary)
  const label = /version (\S+)/.exec(v.line ?? '')?.[1] ?? qemu.binary
  const side: Side = { label: `QEMU ${label}`, binary: qemu.binary, saveFormat: '', msSave: [], msRestore: [], fileSave: [], fileRestore: [], paused: [], pausedDown: [], live: [], liveDown: [], liveMethod: '', dd: [], saveBytes: 0 }
  const stateDir = join(ctx.work, `state-${tag}`)
  const bd = await startBenchDaemon(stateDir, benchLogger(ctx.logLevel, ctx.logFile), qemu)
  const vm = 'rs'
  try {
    const disks = await standardDisks(vmDir(bd, vm))
    const res = await bd.api('POST', '/v1/vms', { name: vm, memoryMiB: MEM_MIB, machine: 'q35', disks: disks.map((x) => ({ id: x.id, file: x.file, format: 'qcow2', bus: 'virtio' })) })
    if (res.status !== 201) throw new Error(`define ${vm}: ${res.status} ${JSON.stringify(res.body)}`)
    await seedRandomRam(bd, vm, disks, rand, qemu.binary, ctx)
    bd.trackVms(vm)
    const ddOut = join(ctx.work, 'dd.out')
    for (let i = 0; i < ctx.reps; i++) {
      side.dd.push(await ddOnce(rand, ddOut))
      let t0 = performance.now()
      const saved = await bd.op(`/v1/vms/${vm}/managedsave`)
      side.msSave.push(performance.now() - t0)
      side.saveFormat = String(saved.result.format)
      side.saveBytes = Number(saved.result.bytes)
      if (side.saveBytes < 0.95 * MEM_MIB * 2 ** 20) throw new Error(`managed save of ${side.saveBytes} bytes: RAM not random any more`)
      t0 = performance.now()
      const started = await bd.op(`/v1/vms/${vm}/start`)
      side.msRestore.push(performance.now() - t0)
      if (!started.result.restoredFromManagedSave) throw new Error(`start did not restore: ${JSON.stringify(started.result)}`)
      bd.trackVms(vm)
      if (!full) {
        ctx.log(`${side.label} rep ${i}: dd ${side.dd.at(-1)!.toFixed(0)}; managed save ${side.msSave.at(-1)!.toFixed(0)} (${side.saveFormat}) / restore ${side.msRestore.at(-1)!.toFixed(0)} ms`)
        continue
      }
      const file = `s${i}.state`
      t0 = performance.now()
      await bd.op(`/v1/vms/${vm}/save`, { file })
      side.fileSave.push(performance.now() - t0)
      t0 = performance.now()
      await bd.op(`/v1/vms/${vm}/restore`, { file })
      side.fileRestore.push(performance.now() - t0)
      bd.trackVms(vm)
      rmSync(join(vmDir(bd, vm), file), { force: true })
      await sleep(300)
      t0 = performance.now()
      const p = await bd.op(`/v1/vms/${vm}/snapshots`, { name: `p${i}`, kind: 'external', memory: true, live: false })
      side.paused.push(performance.now() - t0)
      side.pausedDown.push(Number(p.result.downtimeMs))
      await sleep(300)
      t0 = performance.now()
      const l = await bd.op(`/v1/vms/${vm}/snapshots`, { name: `l${i}`, kind: 'external', memory: true, live: true })
      side.live.push(performance.now() - t0)
      side.liveDown.push(Number(l.result.downtimeMs))
      side.liveMethod = String(l.result.snapshot.ramMethod)
      ctx.log(
        `${side.label} rep ${i}: dd ${side.dd.at(-1)!.toFixed(0)}; managed save ${side.msSave.at(-1)!.toFixed(0)} (${side.saveFormat}) / restore ${side.msRestore.at(-1)!.toFixed(0)}; ` +
          `save ${side.fileSave.at(-1)!.toFixed(0)} / restore ${side.fileRestore.at(-1)!.toFixed(0)}; paused ckpt ${side.paused.at(-1)!.toFixed(0)} (pause ${side.pausedDown.at(-1)}); ` +
          `live ckpt ${side.live.at(-1)!.toFixed(0)} (pause ${side.liveDown.at(-1)}, ${side.liveMethod}) ms`,
      )
    }
  } finally {
    await bd.close()
    await execFileP('rm', ['-rf', stateDir]).catch(() => {})
  }
  return side
}

/** A throughput row: qmpd's MiB/s of `bytes` against dd's MiB/s of the random file, target >= `min`x. */
function throughputRow(metric: string, s: Side, ms: number[], name: string, randBytes: number, min: number | undefined): Row {
  const q = summarize(ms.map((x) => mibps(x, MEM_MIB * 2 ** 20)))
  const b = summarize(s.dd.map((x) => mibps(x, randBytes)))
  const ratio = q.median / b.median
  return {
    case: 'ramstate2g',
    metric: `${s.label}: ${metric}`,
    unit: 'MiB/s',
    qmpd: { name, stats: q },
    baseline: { name: 'dd bs=4M conv=fsync', stats: b },
    ratio,
    ...(min !== undefined ? { target: `>= ${min}x dd`, pass: ratio >= min } : {}),
    extra: { format: s.saveFormat, medianMs: summarize(ms).median, fileBytes: s.saveBytes },
    note: `${MEM_MIB} MiB of guest RAM per operation; dd writes ${RAND_MIB} MiB of the same random bytes; higher is better`,
  }
}

function timeRow(metric: string, q: Stats, qName: string, b: Stats, bName: string, extra: Row['extra'], target?: { maxRatio?: number; maxAbs?: number; minRatio?: number }): Row {
  const ratio = q.median / b.median
  let pass: boolean | undefined
  let text: string | undefined
  if (target?.maxRatio !== undefined) [pass, text] = [ratio <= target.maxRatio, `<= ${target.maxRatio}x`]
  if (target?.minRatio !== undefined) [pass, text] = [ratio >= target.minRatio, `>= ${target.minRatio}x`]
  if (target?.maxAbs !== undefined) [pass, text] = [q.median <= target.maxAbs, `median <= ${target.maxAbs} ms`]
  return { case: 'ramstate2g', metric, unit: 'ms', qmpd: { name: qName, stats: q }, baseline: { name: bName, stats: b }, ratio, ...(text ? { target: text, pass } : {}), ...(extra ? { extra } : {}) }
}

/** The rows: targets on the QEMU that writes mapped-ram (found by what qmpd wrote), information for the other. */
function rows(sides: Side[], randBytes: number): Row[] {
  const out: Row[] = []
  const fast = sides.find((s) => s.saveFormat === 'mapped-ram')
  const stream = sides.find((s) => s.saveFormat === 'stream')
  for (const s of sides) {
    const t = s === fast ? 1.5 : undefined
    out.push(throughputRow('managed save (POST managedsave)', s, s.msSave, 'qmpd managed save', randBytes, t))
    out.push(throughputRow('restore of the managed save (POST start)', s, s.msRestore, 'qmpd start (restore)', randBytes, t))
    if (s.fileSave.length === 0) continue
    out.push(throughputRow('save to a file (POST save)', s, s.fileSave, 'qmpd save', randBytes, undefined))
    out.push(throughputRow('restore of the file (POST restore)', s, s.fileRestore, 'qmpd restore', randBytes, undefined))
    out.push(
      timeRow(`${s.label}: live checkpoint guest pause (downtimeMs)`, summarize(s.liveDown), `qmpd live (${s.liveMethod})`, summarize(s.pausedDown), 'paused checkpoint downtimeMs', undefined, s === fast ? { maxAbs: 25 } : undefined),
    )
    out.push(
      timeRow(`${s.label}: live checkpoint total vs paused checkpoint total`, summarize(s.live), `qmpd live (${s.liveMethod})`, summarize(s.paused), 'qmpd paused checkpoint', { liveMethod: s.liveMethod }, s === fast ? { maxRatio: 1.5 } : undefined),
    )
  }
  if (fast && stream) {
    // Speed-up: the stream QEMU's restore time over the mapped-ram QEMU's (>= 3x asked).
    const r = timeRow(`restore speed-up: ${stream.label} restore time / ${fast.label} restore time (POST start)`, summarize(stream.msRestore), `${stream.label} restore`, summarize(fast.msRestore), `${fast.label} restore`, undefined, { minRatio: 3 })
    out.push({ ...r, note: 'ratio = stream restore median / mapped-ram restore median; higher is better' })
  } else {
    out.push({ case: 'ramstate2g', metric: 'restore speed-up over the 7.2 path', unit: 'ms', error: `needs one QEMU writing mapped-ram and one writing a stream; got ${sides.map((s) => `${s.label}: ${s.saveFormat}`).join(', ')}` })
  }
  return out
}

export const ramStateCase: Case = {
  name: 'ramstate2g',
  title: 'RAM state of a 2 GiB random-RAM guest on both QEMUs: managed save/restore, save/restore, paused and live checkpoint vs dd',
  async run(ctx) {
    const rand = join(ctx.work, 'rand.bin')
    const t0 = performance.now()
    await randomFile(rand, RAND_MIB)
    ctx.log(`random file of ${RAND_MIB} MiB in ${((performance.now() - t0) / 1000).toFixed(1)} s`)
    const randBytes = RAND_MIB * 2 ** 20
    const given = { binary: benchQemu().binary, qemuImg: benchQemu().qemuImg }
    const other = otherQemu(ctx.work)
    if (!other) throw new Error('the other QEMU was not found (system /usr/bin/qemu-system-x86_64, or QEMU 10 in .qemu/10 or QMPD_QEMU10_ROOT)')
    // One 2 GiB guest at a time: each side's daemon and files are gone before the next starts.
    const sides = [await measure(ctx, given, rand, 'a', true), await measure(ctx, other, rand, 'b', false)]
    return rows(sides, randBytes)
  },
}
