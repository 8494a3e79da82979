import t, { type Test } from 'tap'
import { execFile } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import {
  GUEST_COUNTER_ADDR,
  GUEST_PAGE,
  GUEST_STAMP_BASE,
  SECTOR,
  STAMP_MIB_OFFSET,
  bootSector,
  checkDiskAgainstCounter,
  checkStampsAgainstCounter,
  embeddedBootSector,
  expectedSlots,
  makeGuestDisk,
  parseCounters,
  parseStamps,
  readDiskSlots,
  type DiskSlot,
  type GuestCounters,
} from '../helpers/guest.ts'
import { launchRawQemu, onPath, requireQemu, type RawQemuDisk } from '../helpers/qemu.ts'
import type { RawQmp } from '../helpers/rawqmp.ts'

const execFileP = promisify(execFile)
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

let dumps = 0
async function pmem(qmp: RawQmp, dir: string, addr: number, size: number): Promise<Buffer> {
  // pmemsave writes on the QEMU side, so the file name must be absolute.
  const file = join(dir, `pmem-${dumps++}.bin`)
  await qmp.cmd('pmemsave', { val: addr, size, filename: file })
  return readFile(file)
}

async function counters(qmp: RawQmp, dir: string): Promise<GuestCounters> {
  return parseCounters(await pmem(qmp, dir, GUEST_COUNTER_ADDR, 16))
}

/** Polls until the guest has completed at least one iteration (SeaBIOS takes a while under TCG). */
async function firstIteration(qmp: RawQmp, dir: string): Promise<GuestCounters> {
  const deadline = Date.now() + 60_000
  for (;;) {
    const c = await counters(qmp, dir)
    if (c.counter > 0) return c
    if (Date.now() > deadline) throw new Error(`guest made no progress in 60 s: ${JSON.stringify(c)}`)
    await sleep(100)
  }
}

interface BootCase {
  machine: 'q35' | 'pc'
  format: 'qcow2' | 'raw'
  bus: 'virtio' | 'ide'
  stampMiB: number
}

async function bootAndCheck(t: Test, c: BootCase): Promise<void> {
  if (!requireQemu(t)) return
  const dir = t.testdir()
  const ext = c.format === 'qcow2' ? 'qcow2' : 'raw'
  const disks: RawQemuDisk[] = [
    { file: join(dir, `boot.${ext}`), format: c.format, bus: c.bus },
    { file: join(dir, `data.${ext}`), format: c.format, bus: c.bus },
  ]
  await makeGuestDisk(disks[0]!.file, { format: c.format, sizeMiB: 4, boot: true, stampMiB: c.stampMiB })
  await makeGuestDisk(disks[1]!.file, { format: c.format, sizeMiB: 4, boot: false })

  const vm = await launchRawQemu({ dir, disks, memoryMiB: 32, machine: c.machine })
  t.teardown(() => vm.kill())
  await vm.qmp.cmd('cont')

  const first = await firstIteration(vm.qmp, dir)
  const t0 = Date.now()
  await sleep(1000)
  const second = await counters(vm.qmp, dir)
  const rate = ((second.counter - first.counter) * 1000) / (Date.now() - t0)
  t.comment(`${c.machine}/${c.bus}/${c.format}: ${rate.toFixed(0)} iterations/s under TCG`)
  t.ok(second.counter > first.counter, `COUNTER advances (${first.counter} -> ${second.counter})`)
  t.equal(second.errors, 0, 'no INT 13h write failed')
  t.equal(second.disks, 2, 'the guest sees both disks')

  // Stop at a few arbitrary points so some checks land in the middle of an iteration.
  for (let round = 0; round < 3; round++) {
    await vm.qmp.cmd('stop')
    const at = await counters(vm.qmp, dir)
    t.equal(at.errors, 0, `round ${round}: ERRORS is 0`)
    for (const [i, d] of disks.entries()) {
      const slots = await readDiskSlots(d.file, { format: d.format, forceShare: true })
      t.same(checkDiskAgainstCounter(slots, at.counter, at.pending, i), [], `round ${round}: disk ${i} slots match COUNTER ${at.counter} / PENDING ${at.pending}`)
    }
    if (c.stampMiB > 0) {
      const stamps = parseStamps(await pmem(vm.qmp, dir, GUEST_STAMP_BASE, c.stampMiB * 1024 * 1024))
      t.equal(stamps.length, (c.stampMiB * 1024 * 1024) / GUEST_PAGE, `round ${round}: one stamp per page`)
      t.same(checkStampsAgainstCounter(stamps, at.counter, at.pending), [], `round ${round}: stamped pages carry COUNTER or PENDING`)
    }
    await vm.qmp.cmd('cont')
    await sleep(50 + Math.floor(Math.random() * 200))
  }
  await vm.kill()
}

t.test('guest counts, writes every virtio disk and stamps RAM on q35 (qcow2)', async (t) => {
  await bootAndCheck(t, { machine: 'q35', format: 'qcow2', bus: 'virtio', stampMiB: 1 })
})

t.test('guest counts and writes every IDE disk on pc (raw)', async (t) => {
  await bootAndCheck(t, { machine: 'pc', format: 'raw', bus: 'ide', stampMiB: 1 })
})

t.test('consistency checks accept the guest rule and flag stale, torn and foreign data', async (t) => {
  t.same(expectedSlots(0), new Array(64).fill(0), 'nothing written before iteration 1')
  const e = expectedSlots(130)
  t.same([e[0], e[1], e[2], e[3], e[63]], [128, 129, 130, 67, 127], 'each slot holds its newest iteration')

  const slotsFor = (counter: number, disk: number): Array<DiskSlot | null> =>
    expectedSlots(counter).map((v) => (v === 0 ? null : { magicOk: true, value: v, diskIndex: disk, fillOk: true }))
  t.same(checkDiskAgainstCounter(slotsFor(130, 1), 130, 131, 1), [], 'COUNTER 130, PENDING slot not yet written')
  const ahead = slotsFor(130, 1)
  ahead[131 % 64] = { magicOk: true, value: 131, diskIndex: 1, fillOk: true }
  t.same(checkDiskAgainstCounter(ahead, 130, 131, 1), [], 'PENDING slot already written')
  t.equal(checkDiskAgainstCounter(ahead, 130, 130, 1).length, 1, 'a value beyond COUNTER when nothing is pending')
  t.equal(checkDiskAgainstCounter(slotsFor(129, 1), 130, 131, 1).length, 1, 'a stale slot (the disk lost iteration 130)')
  t.equal(checkDiskAgainstCounter(slotsFor(130, 0), 130, 131, 1).length, 64, 'sectors written for another disk')
  const torn = slotsFor(130, 1)
  torn[5] = { magicOk: false, value: 69, diskIndex: 1, fillOk: false }
  t.equal(checkDiskAgainstCounter(torn, 130, 131, 1).length, 2, 'bad magic and torn fill')
  t.equal(checkDiskAgainstCounter(slotsFor(130, 1), 130, 140, 1).length, 1, 'PENDING out of range')

  t.same(checkStampsAgainstCounter([131, 131, 130, 130], 130, 131), [], 'stamps: a PENDING prefix, then COUNTER')
  t.equal(checkStampsAgainstCounter([130, 131], 130, 131).length, 1, 'stamps: PENDING after COUNTER')
  t.equal(checkStampsAgainstCounter([130, 129], 130, 131).length, 1, 'stamps: a stale page')
})

t.test('embedded boot sector matches guest.asm', async (t) => {
  const embedded = embeddedBootSector()
  t.equal(embedded.length, SECTOR, 'is one sector')
  t.same([...embedded.subarray(510)], [0x55, 0xaa], 'ends in the 55 AA boot signature')
  t.equal(embedded[STAMP_MIB_OFFSET], 0, 'stampMiB defaults to 0')
  const patched = bootSector({ stampMiB: 48 })
  t.equal(patched[STAMP_MIB_OFFSET], 48, 'bootSector patches stampMiB')
  t.same(Buffer.concat([patched.subarray(0, STAMP_MIB_OFFSET), patched.subarray(STAMP_MIB_OFFSET + 1)]),
    Buffer.concat([embedded.subarray(0, STAMP_MIB_OFFSET), embedded.subarray(STAMP_MIB_OFFSET + 1)]),
    'and nothing else')
  t.throws(() => bootSector({ stampMiB: 256 }), RangeError, 'stampMiB must fit a byte')

  // nasm is a developer tool, not a test dependency: without it the checks above still hold.
  if (!onPath('nasm')) {
    t.comment('nasm not on PATH: guest.asm not reassembled')
    return
  }
  const dir = t.testdir()
  const out = join(dir, 'guest.bin')
  const asm = new URL('../helpers/guest.asm', import.meta.url).pathname
  await execFileP('nasm', ['-f', 'bin', '-o', out, asm])
  const built = await readFile(out)
  t.equal(built.toString('hex'), embedded.toString('hex'), 'nasm output equals the embedded bytes (regenerate GUEST_HEX if not)')
})
