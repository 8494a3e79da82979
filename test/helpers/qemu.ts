// A tiny launcher for tests that need a QEMU without qmpd: fixed command line, the raw QMP
// client, and a kill() that always leaves no process behind.
import { spawn } from 'node:child_process'
import { accessSync, constants } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { delimiter, join } from 'node:path'
import type { Test } from 'tap'
import { RawQmp } from './rawqmp.ts'

/** A disk for launchRawQemu; disks are attached in order with bootindex 1, 2, … (BIOS 0x80, 0x81, …). */
export interface RawQemuDisk {
  file: string
  format: 'qcow2' | 'raw'
  /** virtio-blk-pci (default) or ide-hd on the machine's built-in IDE/AHCI controller. */
  bus?: 'virtio' | 'ide'
}

/** Options for launchRawQemu. */
export interface RawQemuOptions {
  /** Directory for qmp.sock and serial.log (use t.testdir()). */
  dir: string
  disks: RawQemuDisk[]
  memoryMiB?: number
  machine?: 'q35' | 'pc'
  extraArgs?: string[]
  /** How long to wait for the QMP socket; default 10 s. */
  connectTimeoutMs?: number
}

/** A running QEMU started by launchRawQemu. */
export interface RawQemu {
  pid: number
  /** The QMP socket path (a short temporary directory when <dir>/qmp.sock would be too long). */
  socket: string
  qmp: RawQmp
  /** Quits QEMU (SIGKILL after a timeout) and resolves once the process has exited. Idempotent. */
  kill(): Promise<void>
}

/** Whether an executable called `name` is on PATH. */
export function onPath(name: string): boolean {
  for (const dir of (process.env['PATH'] ?? '').split(delimiter)) {
    if (!dir) continue
    try {
      accessSync(join(dir, name), constants.X_OK)
      return true
    } catch {
      // not in this directory
    }
  }
  return false
}

/**
 * Asserts that qemu-system-x86_64 is on PATH. Tests never skip for a missing QEMU: they fail with
 * this message, in CI and locally alike. Returns whether QEMU was found.
 */
export function requireQemu(t: Pick<Test, 'ok'>): boolean {
  const found = onPath('qemu-system-x86_64')
  const where = process.env['CI'] === 'true' ? 'the CI image must provide it' : 'install it (Debian: apt-get install qemu-system-x86 qemu-utils)'
  t.ok(found, `qemu-system-x86_64 is on PATH (needed by this test; ${where})`)
  return found
}

/**
 * Starts qemu-system-x86_64 paused (-S) under TCG with the given disks and a QMP socket, and
 * connects RawQmp. The caller must register kill() with t.teardown.
 */
export async function launchRawQemu(opts: RawQemuOptions): Promise<RawQemu> {
  const machine = opts.machine ?? 'q35'
  // sun_path holds 107 bytes; tap's testdir names grow with the subtest names, so fall back to a
  // short private directory when <dir>/qmp.sock would not fit.
  let sockDir: string | undefined
  let sock = join(opts.dir, 'qmp.sock')
  if (Buffer.byteLength(sock) > 100) {
    sockDir = await mkdtemp(join(tmpdir(), 'qmp-'))
    sock = join(sockDir, 'qmp.sock')
  }
  const cleanupSock = async (): Promise<void> => {
    if (sockDir) await rm(sockDir, { recursive: true, force: true })
  }
  const args = [
    '-accel', 'tcg',
    '-nodefaults',
    '-display', 'none',
    '-machine', machine,
    '-m', String(opts.memoryMiB ?? 32),
    '-qmp', `unix:${sock},server=on,wait=off`,
    '-serial', `file:${join(opts.dir, 'serial.log')}`,
    '-S',
  ]
  opts.disks.forEach((d, i) => {
    const node = `disk${i}`
    args.push('-blockdev', JSON.stringify({ 'node-name': `${node}-file`, driver: 'file', filename: d.file }))
    args.push('-blockdev', JSON.stringify({ 'node-name': node, driver: d.format, file: `${node}-file` }))
    const dev = (d.bus ?? 'virtio') === 'virtio' ? 'virtio-blk-pci' : 'ide-hd'
    args.push('-device', `${dev},drive=${node},id=${node}-dev,bootindex=${i + 1}`)
  })
  args.push(...(opts.extraArgs ?? []))

  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.setEncoding('utf8')
  child.stderr.on('data', (s: string) => {
    if (stderr.length < 64 * 1024) stderr += s
  })
  let exited = false
  const exit = new Promise<void>((resolve) => {
    child.once('exit', () => {
      exited = true
      resolve()
    })
    // spawn errors (ENOENT) are followed by 'close' but not always by 'exit'.
    child.on('error', () => {
      exited = true
      resolve()
    })
  })

  const killNow = async (): Promise<void> => {
    if (!exited) child.kill('SIGKILL')
    await exit
    await cleanupSock()
  }

  let qmp: RawQmp | undefined
  const deadline = Date.now() + (opts.connectTimeoutMs ?? 10_000)
  // wait=off makes QEMU create the socket during startup; connect fails until it exists.
  while (!qmp) {
    if (exited) {
      await cleanupSock()
      throw new Error(`qemu-system-x86_64 exited during startup: ${stderr.trim()}`)
    }
    try {
      qmp = await RawQmp.connect(sock)
    } catch (err) {
      if (Date.now() > deadline) {
        await killNow()
        throw new Error(`no QMP on ${sock} after ${opts.connectTimeoutMs ?? 10_000} ms: ${stderr.trim()}`, { cause: err })
      }
      await new Promise((r) => setTimeout(r, 50))
    }
  }
  const connected = qmp

  let killing: Promise<void> | undefined
  const kill = (): Promise<void> => {
    killing ??= (async () => {
      if (!exited) {
        // quit gets a clean exit (images closed, locks released); the reply may race the EOF.
        connected.cmd('quit').catch(() => {})
        const timer = setTimeout(() => {
          if (!exited) child.kill('SIGKILL')
        }, 5_000)
        await exit
        clearTimeout(timer)
      }
      connected.close()
      await cleanupSock()
    })()
    return killing
  }

  if (child.pid === undefined) {
    await kill()
    throw new Error('qemu-system-x86_64 has no pid')
  }
  return { pid: child.pid, qmp: connected, socket: sock, kill }
}
