// Reading a test guest's state from outside: RAM through pmemsave, disks through qemu-img.
import { execFile, spawn } from 'node:child_process'
import type { Test } from 'tap'
import { isAlive, waitForExit } from '../../src/vm/proc.ts'
import { shortSocketPath } from '../../src/vm/sockpath.ts'
import { RawQmp } from './rawqmp.ts'
import { checkStateFile } from '../../src/state/ramfile.ts'
import type { RamFormat } from '../../src/state/ramformat.ts'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import type { TestDaemon } from './daemon.ts'
import { GUEST_COUNTER_ADDR, GUEST_STAMP_BASE, parseCounters, parseDiskSlots, parseStamps, SECTOR, SLOT_FIRST_LBA, GUEST_SLOTS, type GuestCounters, type DiskSlot } from './guest.ts'

const run = promisify(execFile)

/** The guest's RAM that matters: its counters and the first `stampMiB` MiB of stamped pages. */
export interface RamImage {
  counters: GuestCounters
  stamps: Buffer
}

/** Dumps the counters and stamped pages with pmemsave (through the QMP escape hatch). */
export async function dumpRam(td: TestDaemon, vm: string, stampMiB = 1): Promise<RamImage> {
  const dir = join(td.stateDir, 'vms', vm)
  const a = join(dir, `ram-c-${process.hrtime.bigint()}.bin`)
  const b = join(dir, `ram-s-${process.hrtime.bigint()}.bin`)
  for (const [file, val, size] of [[a, GUEST_COUNTER_ADDR, 16], [b, GUEST_STAMP_BASE, stampMiB * 1024 * 1024]] as const) {
    const res = await td.api('POST', `/v1/vms/${vm}/qmp`, { execute: 'pmemsave', arguments: { val, size, filename: file } })
    if (res.status !== 200) throw new Error(`pmemsave: ${JSON.stringify(res.body)}`)
  }
  const out = { counters: parseCounters(await readFile(a)), stamps: await readFile(b) }
  await rm(a)
  await rm(b)
  return out
}

/** Stamps of a RAM image, one per page. */
export function stampsOf(img: RamImage): number[] {
  return parseStamps(img.stamps)
}

/**
 * The guest-visible bytes of LBA 0..64 of an image (or of an internal snapshot in it), through the
 * whole backing chain. -U: the image may be open in a paused QEMU (stop flushed it).
 */
export async function diskBytes(file: string, opts: { internal?: string } = {}): Promise<Buffer> {
  const dir = await mkdtemp(join(tmpdir(), 'qmpd-disk-'))
  try {
    const out = join(dir, 'out.raw')
    const args = ['convert', '-U', '-O', 'raw']
    if (opts.internal) args.push('-l', `snapshot.name=${opts.internal}`)
    args.push(file, out)
    await run('qemu-img', args)
    const buf = await readFile(out)
    return buf.subarray(0, (SLOT_FIRST_LBA + GUEST_SLOTS) * SECTOR)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

/** Slots of a disk image's bytes (from diskBytes). */
export function slotsOf(bytes: Buffer): Array<DiskSlot | null> {
  return parseDiskSlots(bytes.subarray(SLOT_FIRST_LBA * SECTOR))
}

/** The highest counter value any slot holds. */
export function maxSlot(slots: Array<DiskSlot | null>): number {
  return Math.max(0, ...slots.map((s) => s?.value ?? 0))
}

/**
 * The guest-visible bytes of LBA 0..64 of a disk as the running QEMU itself sees them, read over
 * an NBD export of the disk's top node: coherent even right after a block job, when the image's
 * metadata may still sit in QEMU's cache (a plain -U read could be stale then).
 */
export async function liveDiskBytes(td: TestDaemon, vm: string, disk: string): Promise<Buffer> {
  const node = ((await td.api('GET', `/v1/vms/${vm}`)).body.disks as Array<{ id: string; node: string }>).find((d) => d.id === disk)!.node
  const dir = await mkdtemp(join(tmpdir(), 'qmpd-nbd-'))
  const sock = join(dir, 'nbd.sock')
  const qmp = async (execute: string, args?: unknown) => {
    const r = await td.api('POST', `/v1/vms/${vm}/qmp`, { execute, ...(args ? { arguments: args } : {}) })
    if (r.status !== 200) throw new Error(`${execute}: ${JSON.stringify(r.body)}`)
  }
  try {
    await qmp('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } })
    await qmp('block-export-add', { type: 'nbd', id: 'qmpd-test-read', 'node-name': node, name: 'disk', writable: false })
    const out = join(dir, 'out.raw')
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd+unix:///disk?socket=${sock}`, out])
    const buf = await readFile(out)
    return buf.subarray(0, (SLOT_FIRST_LBA + GUEST_SLOTS) * SECTOR)
  } finally {
    await qmp('block-export-del', { id: 'qmpd-test-read' }).catch(() => {})
    await qmp('nbd-server-stop').catch(() => {})
    await rm(dir, { recursive: true, force: true })
  }
}

/** Takes a snapshot with ?wait=true and returns the job's result (throws on a non-200 answer). */
export async function snap(td: TestDaemon, vm: string, body: Record<string, unknown>): Promise<any> {
  const res = await td.api('POST', `/v1/vms/${vm}/snapshots?wait=true&timeoutSec=120`, body)
  if (res.status !== 200) throw new Error(`snapshot ${JSON.stringify(body)}: ${res.status} ${JSON.stringify(res.body)}`)
  return res.body.result
}

/** Reverts to a snapshot with ?wait=true and returns the job's result (throws on a non-200 answer). */
export async function revert(td: TestDaemon, vm: string, name: string, body: Record<string, unknown> = {}): Promise<any> {
  const res = await td.api('POST', `/v1/vms/${vm}/snapshots/${name}/revert?wait=true&timeoutSec=120`, body)
  if (res.status !== 200) throw new Error(`revert ${name}: ${res.status} ${JSON.stringify(res.body)}`)
  return res.body.result
}

/**
 * Starts plain qemu-system-x86_64 (no qmpd) in `dir` with `argv` and loads `stateFile` the way
 * docs/snapshots.md tells a user to, by the file's format: a stream with -incoming "exec:cat FILE",
 * a mapped-ram file with -incoming defer, the mapped-ram and multifd capabilities, and
 * migrate-incoming file:FILE. Waits until the load completed and returns its QMP client (and
 * the format it loaded); the test reaps it.
 */
export async function restoreWithPlainQemu(t: Test, dir: string, argv: string[], stateFile: string): Promise<RawQmp & { format?: RamFormat }> {
  const { format } = await checkStateFile(stateFile)
  // Without qmpd's -sandbox: it forbids the fork and exec that `exec:cat` needs.
  const i = argv.indexOf('-sandbox')
  const plain = i >= 0 ? [...argv.slice(0, i), ...argv.slice(i + 2)] : argv
  const incoming = format === 'mapped-ram' ? 'defer' : `exec:cat ${stateFile}`
  const child = spawn('qemu-system-x86_64', [...plain, '-incoming', incoming], { cwd: dir, stdio: 'ignore' })
  t.teardown(async () => {
    if (child.pid && isAlive(child.pid)) child.kill('SIGKILL')
    if (child.pid) await waitForExit(child.pid, 5000)
  })
  const short = shortSocketPath(join(dir, 'qmp.sock'))
  let qmp: RawQmp | undefined
  try {
    const deadline = Date.now() + 10_000
    while (!(qmp = await RawQmp.connect(short.path).catch(() => undefined))) {
      if (Date.now() > deadline) throw new Error('plain QEMU did not open its QMP socket')
      await new Promise((r) => setTimeout(r, 50))
    }
  } finally {
    short.release()
  }
  t.teardown(() => qmp.close())
  if (format === 'mapped-ram') {
    await qmp.cmd('migrate-set-capabilities', { capabilities: [{ capability: 'mapped-ram', state: true }, { capability: 'multifd', state: true }] })
    await qmp.cmd('migrate-incoming', { uri: `file:${stateFile}` })
  }
  for (const deadline = Date.now() + 20_000; (await qmp.cmd('query-migrate')).status !== 'completed'; ) {
    if (Date.now() > deadline) throw new Error('plain QEMU did not finish loading the state')
    await new Promise((r) => setTimeout(r, 50))
  }
  return Object.assign(qmp, { format })
}
