// The standard bench guest (128 MiB RAM, 48 MiB of it dirtied continuously by the boot-sector
// guest, two 256 MiB qcow2 disks, the first booting) started either through qmpd or raw.
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import type { ActiveDisk } from '../../src/vm/argv.ts'
import { bootDisk, qcow2 } from './images.ts'
import type { CaseContext } from './case.ts'
import { benchLogger, startBenchDaemon, vmDir, type BenchDaemon } from './qmpd.ts'
import { launchRaw, rawCont, vmDef, type RawVm } from './raw.ts'

/** The configuration every single-VM case uses. */
export const GUEST = { memoryMiB: 128, stampMiB: 48, diskMiB: 256 } as const

/** Lets the guest run its loop long enough to have stamped (dirtied) all its pages at least once. */
export const WARMUP_MS = 1500

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

/** Disk images of the standard guest in `dir`: vda boots (boot sector + stamps), vdb is empty. */
export async function standardDisks(dir: string): Promise<Array<{ id: string; file: string }>> {
  mkdirSync(dir, { recursive: true })
  const vda = join(dir, 'vda.qcow2')
  const vdb = join(dir, 'vdb.qcow2')
  await bootDisk(vda, GUEST.diskMiB, GUEST.stampMiB)
  await qcow2(vdb, GUEST.diskMiB)
  return [
    { id: 'vda', file: vda },
    { id: 'vdb', file: vdb },
  ]
}

/** Defines a VM in qmpd on the given disks (default: the standard ones) and starts it (running). */
export async function qmpdGuest(bd: BenchDaemon, name: string, disks?: Array<{ id: string; file: string }>, memoryMiB: number = GUEST.memoryMiB): Promise<void> {
  const d = disks ?? (await standardDisks(vmDir(bd, name)))
  const res = await bd.api('POST', '/v1/vms', {
    name,
    memoryMiB,
    machine: 'q35',
    disks: d.map((x) => ({ id: x.id, file: x.file, format: 'qcow2', bus: 'virtio' })),
  })
  if (res.status !== 201) throw new Error(`define ${name}: ${res.status} ${JSON.stringify(res.body)}`)
  await bd.op(`/v1/vms/${name}/start`)
}

/** A raw QEMU with the same argv (buildArgv) on the given disks (default: the standard ones), running. */
export async function rawGuest(dir: string, name: string, disks?: Array<{ id: string; file: string }>, memoryMiB: number = GUEST.memoryMiB): Promise<RawVm> {
  const d = disks ?? (await standardDisks(join(dir, 'disks')))
  const def = vmDef(name, memoryMiB, d)
  const active: ActiveDisk[] = d.map((x) => ({ id: x.id, file: x.file, format: 'qcow2', gen: 0 }))
  const vm = await launchRaw(join(dir, 'run'), def, active)
  await rawCont(vm.qmp)
  return vm
}

/**
 * Keeps exactly one guest on the CPUs: the machine has two cores and a TCG vCPU takes one whole,
 * so the side not being measured is paused (qmpd through its API, raw with QMP stop).
 */
export class Alternator {
  constructor(
    private readonly bd: BenchDaemon | undefined,
    private readonly qmpdVm: string | undefined,
    private raw: RawVm | undefined,
  ) {}

  private qmpdRunning = true
  private rawRunning = true

  /** qmpd's guest runs, the raw one is paused. */
  async qmpdSide(settleMs = 0): Promise<void> {
    if (this.raw && this.rawRunning) {
      await this.raw.qmp.cmd('stop')
      this.rawRunning = false
    }
    if (this.bd && this.qmpdVm && !this.qmpdRunning) {
      await this.bd.op(`/v1/vms/${this.qmpdVm}/resume`)
      this.qmpdRunning = true
    }
    if (settleMs) await sleep(settleMs)
  }

  /** The raw guest runs, qmpd's is paused. */
  async rawSide(settleMs = 0): Promise<void> {
    if (this.bd && this.qmpdVm && this.qmpdRunning) {
      await this.bd.op(`/v1/vms/${this.qmpdVm}/pause`)
      this.qmpdRunning = false
    }
    if (this.raw && !this.rawRunning) {
      await rawCont(this.raw.qmp)
      this.rawRunning = true
    }
    if (settleMs) await sleep(settleMs)
  }

  /** Tells the alternator the raw side was replaced (new QEMU, running). */
  setRaw(raw: RawVm): void {
    this.raw = raw
    this.rawRunning = true
  }
}

/** What a one-guest case works with: see withGuestPair. */
export interface GuestPair {
  bd: BenchDaemon
  /** The raw QEMU now (cases that replace it call setRaw). */
  raw: RawVm
  /** <work>/raw: the raw side's files; its disks are in rawDisks (under rawDir/disks). */
  rawDir: string
  rawDisks: Array<{ id: string; file: string }>
  alt: Alternator
  /** The raw side was replaced (a restore in a new QEMU, running): it is the one quit at the end. */
  setRaw(raw: RawVm): void
}

/**
 * The frame of the one-guest cases: a bench daemon with the standard guest `vm` running, a raw
 * QEMU (`raw<vm>`) on its own standard disks beside it, and an Alternator over both. Both QEMUs
 * and the daemon are stopped afterwards, also when `fn` fails.
 */
export async function withGuestPair<T>(ctx: CaseContext, vm: string, fn: (pair: GuestPair) => Promise<T>): Promise<T> {
  let bd: BenchDaemon | undefined
  let raw: RawVm | undefined
  try {
    bd = await startBenchDaemon(join(ctx.work, 'state'), benchLogger(ctx.logLevel, ctx.logFile))
    await qmpdGuest(bd, vm)
    const rawDir = join(ctx.work, 'raw')
    const rawDisks = await standardDisks(join(rawDir, 'disks'))
    raw = await rawGuest(rawDir, `raw${vm}`, rawDisks)
    const alt = new Alternator(bd, vm, raw)
    const pair: GuestPair = {
      bd,
      raw,
      rawDir,
      rawDisks,
      alt,
      setRaw(next) {
        raw = next
        pair.raw = next
        alt.setRaw(next)
      },
    }
    return await fn(pair)
  } finally {
    await raw?.quit()
    await bd?.close()
  }
}

