// The host fingerprint of GET /v1/host: QEMU's version and capabilities (probed once per binary,
// cached), the accelerators, free space, VM counts; starts only a short-lived probe QEMU of its own.
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync, statfsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Logger } from 'pino'
import type { Config } from '../config.ts'
import { QmpdError } from '../errors.ts'
import { QmpClient } from '../qmp/index.ts'
import { sleep } from '../util.ts'
import { probeAccel, type AccelProbe } from './accel-probe.ts'
import { SANDBOX } from './argv.ts'
import type { VmState } from './definition.ts'
import { isAlive, waitForExit } from './proc.ts'
import { qemuVersion as readQemuVersion } from './qemu-version.ts'

/** QMP commands whose presence a scheduler or an operator may care about (what qmpd uses, and what newer QEMUs add). */
export const COMMANDS_OF_INTEREST = [
  'blockdev-snapshot',
  'blockdev-snapshot-sync',
  'blockdev-snapshot-internal-sync',
  'snapshot-save',
  'snapshot-load',
  'snapshot-delete',
  'block-commit',
  'block-stream',
  'blockdev-mirror',
  'blockdev-backup',
  'blockdev-reopen',
  'block-dirty-bitmap-add',
  'query-blockstats',
  'query-stats',
  'migrate',
  'migrate-incoming',
  'calc-dirty-rate',
  'guest-agent-ping',
] as const

/** What probing the QEMU binary found. */
export interface QemuProbe {
  binary: string
  /** "7.2.x" from `qemu-system-x86_64 --version`. */
  version: string
  /** The whole first line of `--version` (distribution package suffix included). */
  versionLine: string
  /** query-version of a probe QEMU. */
  qmpVersion: { major: number; minor: number; micro: number; package: string }
  /** Of COMMANDS_OF_INTEREST, which the probe's query-qmp-schema lists. */
  commands: Record<string, boolean>
  /** Every migration capability the probe's query-migrate-capabilities names. */
  migrationCapabilities: string[]
  probedAt: string
}

/** What GET /v1/host says about accelerators. */
export interface AccelInfo {
  configured: string
  /** What a VM without its own `accel` runs under. */
  resolved: 'kvm' | 'tcg'
  usable: Array<'kvm' | 'tcg'>
  /** The host probe's verdict on KVM (src/vm/accel-probe.ts); not run under --accel tcg. */
  kvm: { probed: false; reason: string } | { probed: true; usable: true; cpuModel: string } | { probed: true; usable: false; reason: string }
}

/**
 * Accelerators: the ones usable here and the one qmpd's `auto` resolves to, from the same host
 * probe VM launches use (run once per binary; under --accel tcg it is not run, and KVM is not
 * claimed usable).
 */
export async function accelInfo(config: Pick<Config, 'accel' | 'qemuBinary'>, probe: (binary: string) => Promise<AccelProbe> = probeAccel): Promise<AccelInfo> {
  if (config.accel === 'tcg') {
    return { configured: 'tcg', resolved: 'tcg', usable: ['tcg'], kvm: { probed: false, reason: 'the daemon runs with --accel tcg: the KVM probe is not run' } }
  }
  const p = await probe(config.qemuBinary)
  const kvm: AccelInfo['kvm'] = p.kvm.usable ? { probed: true, usable: true, cpuModel: p.kvm.cpuModel } : { probed: true, usable: false, reason: p.kvm.reason }
  const usable: Array<'kvm' | 'tcg'> = p.kvm.usable ? ['kvm', 'tcg'] : ['tcg']
  return { configured: config.accel, resolved: config.accel === 'auto' ? usable[0]! : 'kvm', usable, kvm }
}

/** Free and total bytes of the filesystem holding `path` (statfs: f_bavail, what an unprivileged writer gets). */
export function diskSpace(path: string): { path: string; freeBytes: number; totalBytes: number } | { path: string; error: string } {
  try {
    const s = statfsSync(path)
    return { path, freeBytes: s.bavail * s.bsize, totalBytes: s.blocks * s.bsize }
  } catch (err) {
    return { path, error: (err as Error).message }
  }
}

/**
 * `binary --version`'s first line and its version number.
 * @throws QmpdError QEMU_NOT_FOUND when the binary cannot be run.
 */
export async function qemuVersion(binary: string): Promise<{ version: string; line: string }> {
  const v = await readQemuVersion(binary)
  if (v.error !== undefined) throw new QmpdError('QEMU_NOT_FOUND', `cannot run ${binary} --version: ${v.error}`, { binary })
  return { version: v.version, line: v.line }
}

/** How long the probe QEMU's QMP socket gets to answer, retries included. */
const PROBE_CONNECT_MS = 10_000

/**
 * Starts a QEMU with no machine (-machine none, paused, no devices) on a QMP socket of its own,
 * reads its version, command names and migration capabilities, and ends it (quit, then SIGKILL
 * by PID). Takes well under a second under TCG.
 * @throws QmpdError QEMU_NOT_FOUND when the binary cannot be run; QEMU_START_FAILED when the probe's QMP never answers.
 */
export async function probeQemu(binary: string, log: Logger): Promise<QemuProbe> {
  const { version, line } = await qemuVersion(binary)
  const dir = mkdtempSync(join(tmpdir(), 'qmpd-probe-'))
  const socket = join(dir, 'qmp.sock')
  const child = spawn(binary, ['-machine', 'none', '-nodefaults', '-no-user-config', '-display', 'none', '-sandbox', SANDBOX, '-S', '-qmp', `unix:${socket},server=on,wait=off`], { stdio: 'ignore' })
  const failed = new Promise<never>((_, reject) => {
    child.once('error', (err) => reject(new QmpdError('QEMU_NOT_FOUND', `cannot start ${binary}: ${err.message}`, { binary }, { cause: err })))
    child.once('exit', (code, signal) => reject(new QmpdError('QEMU_START_FAILED', `probe QEMU exited (${signal ?? code})`, { binary })))
  })
  failed.catch(() => {})
  const qmp = new QmpClient({ logger: log.child({ component: 'host-probe' }) })
  try {
    const connect = async (): Promise<void> => {
      const deadline = Date.now() + PROBE_CONNECT_MS
      for (;;) {
        try {
          await qmp.connect({ path: socket }, { timeoutMs: 2_000 })
          return
        } catch (err) {
          if (Date.now() >= deadline) throw new QmpdError('QEMU_START_FAILED', `probe QEMU's QMP did not answer: ${(err as Error).message}`, { binary }, { cause: err })
          await sleep(50)
        }
      }
    }
    await Promise.race([connect(), failed])
    const v = await qmp.execute('query-version')
    const schema = await qmp.execute('query-qmp-schema')
    const names = new Set(schema.filter((s) => s['meta-type'] === 'command').map((s) => s.name))
    const caps = await qmp.execute('query-migrate-capabilities')
    return {
      binary,
      version,
      versionLine: line,
      qmpVersion: { ...v.qemu, package: v.package },
      commands: Object.fromEntries(COMMANDS_OF_INTEREST.map((c) => [c, names.has(c)])),
      migrationCapabilities: caps.map((c) => c.capability).sort(),
      probedAt: new Date().toISOString(),
    }
  } finally {
    await qmp.execute('quit').catch(() => {})
    await qmp.disconnect().catch(() => {})
    if (child.pid !== undefined && !(await waitForExit(child.pid, 2_000)) && isAlive(child.pid)) child.kill('SIGKILL')
    if (child.pid !== undefined) await waitForExit(child.pid, 5_000)
    rmSync(dir, { recursive: true, force: true })
  }
}

/** GET /v1/host's answer. */
export interface HostFingerprint {
  qmpd: { version: string; pid: number; startedAt: string; uptimeSec: number }
  qemu: QemuProbe
  accel: AccelInfo
  storage: { stateDir: ReturnType<typeof diskSpace>; allowedDirs: Array<ReturnType<typeof diskSpace>> }
  vmCounts: { total: number; byState: Record<string, number> }
}

/** What the fingerprint reads besides the probe. */
export interface HostInfoDeps {
  config: Config
  log: Logger
  version: string
  startedAt: Date
  /** The state of every VM (quarantined ones as 'quarantined'). */
  vmStates: () => Array<VmState | 'quarantined'>
}

/** GET /v1/host: the probe (cached per binary; a failed probe is tried again next time) and the live facts. */
export class HostInfo {
  private readonly probes = new Map<string, Promise<QemuProbe>>()

  constructor(private readonly d: HostInfoDeps) {}

  /** The probe of a binary, once. */
  probe(binary = this.d.config.qemuBinary): Promise<QemuProbe> {
    let p = this.probes.get(binary)
    if (!p) {
      p = probeQemu(binary, this.d.log)
      this.probes.set(binary, p)
      p.catch(() => this.probes.delete(binary))
    }
    return p
  }

  /**
   * The fingerprint now.
   * @throws QmpdError QEMU_NOT_FOUND or QEMU_START_FAILED when the QEMU binary cannot be probed.
   */
  async fingerprint(): Promise<HostFingerprint> {
    const qemu = await this.probe()
    const counts: Record<string, number> = {}
    const states = this.d.vmStates()
    for (const s of states) counts[s] = (counts[s] ?? 0) + 1
    return {
      qmpd: { version: this.d.version, pid: process.pid, startedAt: this.d.startedAt.toISOString(), uptimeSec: Math.round((Date.now() - this.d.startedAt.getTime()) / 1000) },
      qemu,
      accel: await accelInfo(this.d.config),
      storage: { stateDir: diskSpace(this.d.config.stateDir), allowedDirs: this.d.config.allowedDirs.map(diskSpace) },
      vmCounts: { total: states.length, byState: counts },
    }
  }
}
