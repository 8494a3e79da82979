// The test guest: a 512-byte boot sector (source: test/helpers/guest.asm) that counts iterations
// in RAM, writes each iteration's number to a slot sector on every BIOS disk and stamps it into
// a range of RAM pages. Tests compare RAM (QMP pmemsave) with the disks (qemu-img) to prove what
// a snapshot brought back. Rule, for COUNTER c and PENDING p (p is c or c+1):
//   - disk slot s (LBA 1+s) holds the newest v <= c with v mod 64 == s (0: never written),
//     except slot p mod 64, which may already hold p;
//   - every stamped page holds c or p, the pages holding p forming a prefix.
import { execFile } from 'node:child_process'
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'

const execFileP = promisify(execFile)

/** Guest-physical address of COUNTER: the last fully completed iteration (dword). */
export const GUEST_COUNTER_ADDR = 0x8000
/** Guest-physical address of PENDING: the iteration in progress, COUNTER or COUNTER+1 (dword). */
export const GUEST_PENDING_ADDR = 0x8004
/** Guest-physical address of ERRORS: INT 13h writes that returned CF=1 (dword). */
export const GUEST_ERRORS_ADDR = 0x8008
/** Guest-physical address of DISKS: disks written per iteration, BIOS count capped at 4 (dword). */
export const GUEST_DISKS_ADDR = 0x800c
/** Guest-physical address of the first stamped page; pages are 4 KiB, the stamp is their first dword. */
export const GUEST_STAMP_BASE = 0x100000
/** Size of a stamped page. */
export const GUEST_PAGE = 4096
/** Number of slot sectors per disk; iteration v goes to slot v mod GUEST_SLOTS. */
export const GUEST_SLOTS = 64
/** Sector size used by the guest and by the slot layout. */
export const SECTOR = 512
/** LBA of slot 0; slot s is at LBA SLOT_FIRST_LBA + s (LBA 0 is the boot sector). */
export const SLOT_FIRST_LBA = 1
/** Offset in the boot sector of the stampMiB byte that bootSector() patches. */
export const STAMP_MIB_OFFSET = 0x1fd
/** First dword of every slot sector: the bytes "QMPD". */
export const SLOT_MAGIC = 0x44504d51

// Assembled guest.asm, stampMiB 0. To regenerate after editing guest.asm:
//   nasm -f bin -o /tmp/guest.bin test/helpers/guest.asm
//   node -e "console.log(require('fs').readFileSync('/tmp/guest.bin').toString('hex').match(/.{64}/g).join('\n'))"
// and paste the lines below. test/integration/guest.test.ts checks the two agree when nasm exists.
const GUEST_HEX = `
fa31c08ed88ec08ed0bc007cea117c0000fbfce492a80275060c0224fee69266
31c066a3008066a3048066a3088066a30c8066a10080664066a30480bf0090b9
8000f366ab66c7060090514d50446683e03f664066a3127d0fb60e750483f904
7603b90400890e0c80b28085c974285152660fb6c22c8066a30890c7060c7d01
00be0a7db80043cd13730566ff0608805a59fec249ebd4e82d0066a10480660f
b60efd7d66c1e108741666be0000100064666789066681c600100000664975f0
66a30080e96bff9cfa0f0116047d0f20c00c010f22c0eb00bb08008edb8ec38e
e38eeb24fe0f22c031db8edb8ec38ee38eeb9dc30000000000000000ffff0000
0092cf000f00f47c000010000100009000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
00000000000000000000000000000000000000000000000000000000000055aa
`

/** The embedded boot sector exactly as assembled (stampMiB 0); for the nasm comparison test. */
export function embeddedBootSector(): Buffer {
  return Buffer.from(GUEST_HEX.replace(/\s+/g, ''), 'hex')
}

/**
 * The guest's 512-byte boot sector with stampMiB patched in. The VM needs at least
 * 1 + stampMiB MiB of RAM for the stamps to land (the guest does not probe RAM).
 */
export function bootSector(opts: { stampMiB?: number } = {}): Buffer {
  const stampMiB = opts.stampMiB ?? 0
  if (!Number.isInteger(stampMiB) || stampMiB < 0 || stampMiB > 255) {
    throw new RangeError(`stampMiB must be an integer in 0..255, got ${stampMiB}`)
  }
  const buf = embeddedBootSector()
  buf[STAMP_MIB_OFFSET] = stampMiB
  return buf
}

async function run(file: string, args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileP(file, args, { maxBuffer: 16 * 1024 * 1024 })
    return stdout
  } catch (err) {
    const e = err as Error & { stderr?: string }
    throw new Error(`${file} ${args.join(' ')} failed: ${(e.stderr ?? '').trim() || e.message}`, { cause: err })
  }
}

async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'qmpd-guest-'))
  try {
    return await fn(dir)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

/**
 * Creates a disk image with qemu-img; when `boot`, LBA 0 holds the guest's boot sector.
 * Any disk of at least 1 MiB can serve as a slot disk (slots use LBAs 1..64).
 */
export async function makeGuestDisk(
  path: string,
  opts: { format: 'qcow2' | 'raw'; sizeMiB: number; boot: boolean; stampMiB?: number },
): Promise<void> {
  if (!Number.isInteger(opts.sizeMiB) || opts.sizeMiB < 1) {
    throw new RangeError(`sizeMiB must be a positive integer, got ${opts.sizeMiB}`)
  }
  await run('qemu-img', ['create', '-q', '-f', opts.format, path, `${opts.sizeMiB}M`])
  if (!opts.boot) return
  const sector = bootSector({ stampMiB: opts.stampMiB ?? 0 })
  if (opts.format === 'raw') {
    const fh = await open(path, 'r+')
    try {
      await fh.write(sector, 0, SECTOR, 0)
    } finally {
      await fh.close()
    }
    return
  }
  // convert -n writes the 512-byte source over the start of the existing, larger image and
  // leaves the rest unallocated; no file name has to go through qemu-io's -c word splitting.
  await withTempDir(async (dir) => {
    const src = join(dir, 'boot.bin')
    await writeFile(src, sector)
    await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'qcow2', src, path])
  })
}

/** One decoded slot sector. fillOk is false when dwords 3..127 are not all `value` (a torn or foreign sector). */
export interface DiskSlot {
  magicOk: boolean
  value: number
  diskIndex: number
  fillOk: boolean
}

/** Decodes the 64 slot sectors from the bytes of LBAs 1..64; null for an all-zero (never written) slot. */
export function parseDiskSlots(buf: Buffer): Array<DiskSlot | null> {
  if (buf.length < GUEST_SLOTS * SECTOR) {
    throw new RangeError(`need ${GUEST_SLOTS * SECTOR} bytes of slots, got ${buf.length}`)
  }
  const slots: Array<DiskSlot | null> = []
  for (let s = 0; s < GUEST_SLOTS; s++) {
    const sec = buf.subarray(s * SECTOR, (s + 1) * SECTOR)
    if (sec.every((b) => b === 0)) {
      slots.push(null)
      continue
    }
    const value = sec.readUInt32LE(4)
    let fillOk = true
    for (let off = 12; off < SECTOR; off += 4) {
      if (sec.readUInt32LE(off) !== value) {
        fillOk = false
        break
      }
    }
    slots.push({ magicOk: sec.readUInt32LE(0) === SLOT_MAGIC, value, diskIndex: sec.readUInt32LE(8), fillOk })
  }
  return slots
}

/**
 * Reads slots 0..63 (LBAs 1..64) of a disk image. qcow2 goes through `qemu-img dd`; raw files are
 * read directly. forceShare (-U) allows reading an image that a running or paused QEMU holds
 * open; the image is only consistent once QEMU has stopped (vm_stop drains and flushes).
 */
export async function readDiskSlots(
  path: string,
  opts: { format: 'qcow2' | 'raw'; forceShare?: boolean },
): Promise<Array<DiskSlot | null>> {
  const first = SLOT_FIRST_LBA * SECTOR
  const len = GUEST_SLOTS * SECTOR
  if (opts.format === 'raw') {
    const fh = await open(path, 'r')
    try {
      const buf = Buffer.alloc(len)
      const { bytesRead } = await fh.read(buf, 0, len, first)
      if (bytesRead < len) throw new Error(`${path}: short read of slots (${bytesRead} of ${len} bytes)`)
      return parseDiskSlots(buf)
    } finally {
      await fh.close()
    }
  }
  return withTempDir(async (dir) => {
    const out = join(dir, 'slots.raw')
    const args = ['dd', ...(opts.forceShare ? ['-U'] : []), '-f', opts.format, '-O', 'raw']
    args.push(`bs=${SECTOR}`, `count=${SLOT_FIRST_LBA + GUEST_SLOTS}`, `if=${path}`, `of=${out}`)
    await run('qemu-img', args)
    const buf = await readFile(out)
    return parseDiskSlots(buf.subarray(first, first + len))
  })
}

/** What each slot must hold once iteration `counter` has completed (0 for never written). */
export function expectedSlots(counter: number): number[] {
  const out: number[] = []
  for (let s = 0; s < GUEST_SLOTS; s++) {
    // Newest v <= counter with v mod 64 == s; iterations start at 1, so slot 0 first gets 64.
    const v = counter < s ? 0 : counter - ((counter - s) % GUEST_SLOTS)
    out.push(v >= 1 ? v : 0)
  }
  return out
}

/**
 * Checks one disk's slots against COUNTER and PENDING read from the same paused instant.
 * Returns human-readable mismatches; empty means consistent.
 */
export function checkDiskAgainstCounter(
  slots: ReadonlyArray<DiskSlot | null>,
  counter: number,
  pending: number,
  diskIndex: number,
): string[] {
  const problems: string[] = []
  if (slots.length !== GUEST_SLOTS) problems.push(`disk ${diskIndex}: ${slots.length} slots, expected ${GUEST_SLOTS}`)
  if (pending !== counter && pending !== counter + 1) {
    problems.push(`PENDING ${pending} is neither COUNTER ${counter} nor COUNTER+1`)
  }
  const expected = expectedSlots(counter)
  const pendingSlot = pending === counter + 1 ? pending % GUEST_SLOTS : -1
  for (let s = 0; s < GUEST_SLOTS; s++) {
    const slot = slots[s] ?? null
    const want = expected[s] ?? 0
    const where = `disk ${diskIndex} slot ${s} (LBA ${SLOT_FIRST_LBA + s})`
    const got = slot === null ? 0 : slot.value
    if (slot !== null) {
      if (!slot.magicOk) problems.push(`${where}: bad magic`)
      if (!slot.fillOk) problems.push(`${where}: fill is not the value ${slot.value} repeated`)
      if (slot.diskIndex !== diskIndex) problems.push(`${where}: written for disk ${slot.diskIndex}`)
    }
    if (got === want || (s === pendingSlot && got === pending)) continue
    const also = s === pendingSlot ? ` or PENDING ${pending}` : ''
    problems.push(`${where}: holds ${got}, expected ${want}${also} (COUNTER ${counter})`)
  }
  return problems
}

/** COUNTER, PENDING, ERRORS and DISKS as the guest left them. */
export interface GuestCounters {
  counter: number
  pending: number
  errors: number
  disks: number
}

/**
 * Decodes the counters from a pmemsave dump that starts at guest-physical `baseAddr` and covers
 * GUEST_COUNTER_ADDR..GUEST_DISKS_ADDR+4 (e.g. pmemsave val=0x8000 size=16).
 */
export function parseCounters(buf: Buffer, baseAddr: number = GUEST_COUNTER_ADDR): GuestCounters {
  const word = (addr: number): number => {
    const off = addr - baseAddr
    if (off < 0 || off + 4 > buf.length) {
      throw new RangeError(`address 0x${addr.toString(16)} is outside the dump at 0x${baseAddr.toString(16)}`)
    }
    return buf.readUInt32LE(off)
  }
  return {
    counter: word(GUEST_COUNTER_ADDR),
    pending: word(GUEST_PENDING_ADDR),
    errors: word(GUEST_ERRORS_ADDR),
    disks: word(GUEST_DISKS_ADDR),
  }
}

/** Reads the little-endian dword at guest-physical `addr` from a pmemsave dump starting at `baseAddr`. */
export async function readGuestWord(dumpFile: string, addr: number, baseAddr: number = GUEST_COUNTER_ADDR): Promise<number> {
  const buf = await readFile(dumpFile)
  const off = addr - baseAddr
  if (off < 0 || off + 4 > buf.length) {
    throw new RangeError(`address 0x${addr.toString(16)} is outside ${dumpFile} (base 0x${baseAddr.toString(16)})`)
  }
  return buf.readUInt32LE(off)
}

/** The stamp (first dword) of every whole 4 KiB page in a pmemsave dump starting at page-aligned `baseAddr`. */
export function parseStamps(buf: Buffer, baseAddr: number = GUEST_STAMP_BASE): number[] {
  if (baseAddr % GUEST_PAGE !== 0) throw new RangeError(`baseAddr 0x${baseAddr.toString(16)} is not page-aligned`)
  const out: number[] = []
  for (let off = 0; off + GUEST_PAGE <= buf.length; off += GUEST_PAGE) out.push(buf.readUInt32LE(off))
  return out
}

/**
 * Checks stamps (from parseStamps over the whole stamp range) against COUNTER and PENDING: every
 * page holds one of them, and the pages holding PENDING come first. Returns mismatches; empty = consistent.
 */
export function checkStampsAgainstCounter(stamps: readonly number[], counter: number, pending: number): string[] {
  const problems: string[] = []
  let seenCounter = false
  stamps.forEach((v, i) => {
    const addr = `0x${(GUEST_STAMP_BASE + i * GUEST_PAGE).toString(16)}`
    if (v === counter) {
      seenCounter = true
    } else if (v === pending) {
      if (seenCounter) problems.push(`page ${addr}: holds PENDING ${pending} after a page holding COUNTER ${counter}`)
    } else {
      problems.push(`page ${addr}: holds ${v}, expected COUNTER ${counter} or PENDING ${pending}`)
    }
  })
  return problems
}
