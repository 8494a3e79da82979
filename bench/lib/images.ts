// Disk images for the bench, and the data-movement floors (dd conv=fsync, qemu-img convert).
import { execFile } from 'node:child_process'
import { rm, writeFile } from 'node:fs/promises'
import { promisify } from 'node:util'
import { makeGuestDisk } from '../../test/helpers/guest.ts'

const execFileP = promisify(execFile)

/** Runs a program (no shell); rejects with its stderr. */
export async function run(file: string, args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileP(file, args, { maxBuffer: 16 * 1024 * 1024 })
    return stdout
  } catch (err) {
    const e = err as Error & { stderr?: string }
    throw new Error(`${file} ${args.join(' ')}: ${(e.stderr ?? '').trim() || e.message}`, { cause: err })
  }
}

/** The boot disk of the test guest: qcow2 of `sizeMiB` with the boot sector that dirties `stampMiB` MiB of RAM. */
export async function bootDisk(file: string, sizeMiB: number, stampMiB: number): Promise<void> {
  await makeGuestDisk(file, { format: 'qcow2', sizeMiB, boot: true, stampMiB })
}

/**
 * A boot disk whose guest idles like an idle OS: `sti; hlt; jmp $-1` (woken only by the BIOS
 * timer tick, ~18 times a second), for fleets of running guests that do not spin a vCPU each.
 */
export async function idleBootDisk(file: string, sizeMiB: number): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', file, `${sizeMiB}M`])
  const sector = Buffer.alloc(512)
  Buffer.from([0xfb, 0xf4, 0xeb, 0xfd]).copy(sector)
  sector[510] = 0x55
  sector[511] = 0xaa
  const src = `${file}.boot.bin`
  await writeFile(src, sector)
  try {
    await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'qcow2', src, file])
  } finally {
    await rm(src, { force: true })
  }
}

/** An empty qcow2 (optionally on a backing file). */
export async function qcow2(file: string, sizeMiB: number, backing?: string): Promise<void> {
  const args = ['create', '-q', '-f', 'qcow2']
  if (backing) args.push('-b', backing, '-F', 'qcow2')
  args.push(file)
  if (!backing) args.push(`${sizeMiB}M`)
  await run('qemu-img', args)
}

/** Writes `mib` MiB of the byte `pattern` at `offsetMiB` into a qcow2 (qemu-io write -P), allocating it. */
export async function fill(file: string, offsetMiB: number, mib: number, pattern = 0xab): Promise<void> {
  await run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${pattern.toString(16)} ${offsetMiB}M ${mib}M`, file])
}

/** Wall time of one process run, in ms. */
export async function timed(file: string, args: string[]): Promise<number> {
  const t0 = performance.now()
  await run(file, args)
  return performance.now() - t0
}

/** dd of `mib` MiB from /dev/zero into a new file with conv=fsync: the disk's durable write floor. */
export async function ddFsync(target: string, mib: number): Promise<number> {
  await rm(target, { force: true })
  const ms = await timed('dd', ['if=/dev/zero', `of=${target}`, 'bs=1M', `count=${mib}`, 'conv=fsync', 'status=none'])
  await rm(target, { force: true })
  return ms
}

/** qemu-img convert of `src` (qcow2) into a new qcow2: reading and writing the same data offline. */
export async function convert(src: string, target: string): Promise<number> {
  await rm(target, { force: true })
  const ms = await timed('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', src, target])
  await rm(target, { force: true })
  return ms
}

/** Allocated bytes of a qcow2's top layer (qemu-img info actual-size is the file's blocks). */
export async function allocatedMiB(file: string): Promise<number> {
  const out = await run('qemu-img', ['map', '-f', 'qcow2', '--output=json', file])
  const map = JSON.parse(out) as Array<{ length: number; data: boolean; depth: number }>
  return map.filter((m) => m.data && m.depth === 0).reduce((a, m) => a + m.length, 0) / 1048576
}
