// Host probe: can KVM run a guest that needs what a Linux kernel needs? Runs QEMU on qmpd's own
// boot-sector guest in a temporary directory it removes; touches no VM and no store.
import { spawn } from 'node:child_process'
import { constants as fsc } from 'node:fs'
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { SANDBOX } from './argv.ts'
import { PROBE_GUEST_EXIT, PROBE_STAGES, probeGuestSector } from './probe-guest.ts'
import { qemuVersion as readQemuVersion } from './qemu-version.ts'

/** What the probe found out about one QEMU binary on this host. */
export interface AccelProbe {
  binary: string
  /** First line of `qemu --version`, when it answered. */
  qemuVersion?: string
  kvm:
    | { usable: true; cpuModel: 'host' | 'qemu64'; notes: string[] }
    | { usable: false; reason: string }
  ms: number
}

/** Knobs of one probe run; tests use them, the daemon takes the defaults. */
export interface ProbeOptions {
  binary: string
  /** The KVM device to open (default /dev/kvm). */
  kvmDevice?: string
  /** How long the guest gets under each CPU model (default PROBE_TIMEOUT_MS). */
  timeoutMs?: number
}

/**
 * Time the probe guest gets per CPU model. The whole run takes about 0.4 s under TCG (SeaBIOS
 * included) and less under a working KVM. Under the nested kvm-pvm this was measured on, SeaBIOS
 * alone took 12 s to reach the boot sector on a loaded machine, and the 64 MiB write with paging
 * on over 25 s (32 MiB: 14.6 s): a Linux kernel there never gets out of its decompressor.
 */
export const PROBE_TIMEOUT_MS = 5000

/** The outcome of one QEMU run of the probe guest. */
export interface GuestRun {
  ok: boolean
  /** Stage letters the guest printed (PROBE_STAGES, in order). */
  stages: string
  code: number | null
  /** The signal QEMU died of (SIGABRT for a failed assertion, SIGKILL after the timeout). */
  signal: string | null
  timedOut: boolean
  /** Last line QEMU wrote on stderr (an abort's reason). */
  stderr: string
  ms: number
}

/**
 * Boots the probe guest once under `accel` with `-cpu model` in `dir` and waits for it to finish,
 * for QEMU to exit, or for `timeoutMs` (then QEMU, which this function started, is killed by PID).
 */
export async function runProbeGuest(binary: string, accel: 'kvm' | 'tcg', model: string, dir: string, timeoutMs: number): Promise<GuestRun> {
  const image = join(dir, `probe-${accel}-${model}.img`)
  const serial = join(dir, `probe-${accel}-${model}.serial`)
  await writeFile(image, probeGuestSector())
  // prettier-ignore
  const argv = [
    '-accel', accel, '-cpu', model, '-machine', 'pc', '-m', '128',
    '-nodefaults', '-no-user-config', '-display', 'none', '-sandbox', SANDBOX,
    '-serial', `file:${serial}`,
    '-device', 'isa-debug-exit,iobase=0xf4,iosize=4',
    '-drive', `file=${image},format=raw,if=ide`,
  ]
  const t0 = performance.now()
  const child = spawn(binary, argv, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.setEncoding('utf8')
  child.stderr.on('data', (s: string) => {
    stderr = (stderr + s).slice(-4096)
  })
  let timedOut = false
  const timer = setTimeout(() => {
    timedOut = true
    child.kill('SIGKILL')
  }, timeoutMs)
  const [code, signal] = await new Promise<[number | null, string | null]>((resolve) => {
    child.once('error', (err) => {
      stderr = err.message
      resolve([null, null])
    })
    child.once('close', (c, sig) => resolve([c, sig]))
  })
  clearTimeout(timer)
  const stages = await readFile(serial, 'latin1').catch(() => '')
  const lines = stderr.split('\n').map((l) => l.trim()).filter(Boolean)
  return {
    ok: !timedOut && code === PROBE_GUEST_EXIT && stages === PROBE_STAGES,
    stages,
    code,
    signal,
    timedOut,
    // QEMU's own "error:" line says more than the assertion that follows it.
    stderr: lines.find((l) => /error:/.test(l)) ?? [...lines].reverse().find((l) => !/warning:/.test(l)) ?? lines.at(-1) ?? '',
    ms: Math.round(performance.now() - t0),
  }
}

/** Why one run of the probe guest failed, in words. */
export function describeFailure(model: string, run: GuestRun, timeoutMs: number): string {
  const reached = run.stages.includes('L')
    ? 'reached long mode but did not finish a 64 MiB write with paging on'
    : run.stages.includes('P')
      ? `reached protected mode (stages ${run.stages}) but not long mode`
      : run.stages
        ? `stopped in real mode (stages ${run.stages})`
        : 'did not even reach its boot sector'
  if (run.timedOut) return `-cpu ${model}: the probe guest ${reached} within ${timeoutMs / 1000} s (a Linux kernel would hang at boot)`
  const how = run.signal ? `was killed by ${run.signal}` : `exited with status ${run.code ?? 'unknown'}`
  return `-cpu ${model}: QEMU ${how}${run.stderr ? `: ${run.stderr}` : ''}`
}

/**
 * Runs the probe: /dev/kvm must open read-write, then the probe guest must finish under KVM with
 * `-cpu host` (the model a working KVM gets) or, failing that, with `-cpu qemu64`.
 */
export async function runAccelProbe(opts: ProbeOptions): Promise<AccelProbe> {
  const t0 = performance.now()
  const timeoutMs = opts.timeoutMs ?? PROBE_TIMEOUT_MS
  const qemuVersion = (await readQemuVersion(opts.binary)).line
  const done = (kvm: AccelProbe['kvm']): AccelProbe => ({
    binary: opts.binary,
    ...(qemuVersion ? { qemuVersion } : {}),
    kvm,
    ms: Math.round(performance.now() - t0),
  })
  const device = opts.kvmDevice ?? '/dev/kvm'
  try {
    await (await open(device, fsc.O_RDWR)).close()
  } catch (err) {
    return done({ usable: false, reason: `cannot open ${device}: ${(err as NodeJS.ErrnoException).code ?? String(err)}` })
  }
  const dir = await mkdtemp(join(tmpdir(), 'qmpd-accel-probe-'))
  try {
    const host = await runProbeGuest(opts.binary, 'kvm', 'host', dir, timeoutMs)
    if (host.ok) return done({ usable: true, cpuModel: 'host', notes: [] })
    const hostWhy = describeFailure('host', host, timeoutMs)
    const named = await runProbeGuest(opts.binary, 'kvm', 'qemu64', dir, timeoutMs)
    if (named.ok) return done({ usable: true, cpuModel: 'qemu64', notes: [hostWhy] })
    return done({ usable: false, reason: `${hostWhy}; ${describeFailure('qemu64', named, timeoutMs)}` })
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

const probes = new Map<string, Promise<AccelProbe>>()

/** The probe of `binary`, run once per process (the daemon's start) and kept in memory. */
export function probeAccel(binary: string): Promise<AccelProbe> {
  let p = probes.get(binary)
  if (!p) {
    p = runAccelProbe({ binary })
    probes.set(binary, p)
  }
  return p
}
