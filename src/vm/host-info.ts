// The host fingerprint of GET /v1/host: QEMU's version and capabilities (probed once per binary,
// cached in ./qemu-caps.ts), the accelerators, free space, VM counts; starts no QEMU besides that probe's.
import { statfsSync } from 'node:fs'
import type { Logger } from 'pino'
import type { Config } from '../config.ts'
import { QmpdError } from '../errors.ts'
import { probeAccel, type AccelProbe } from './accel-probe.ts'
import type { VmState } from './definition.ts'
import { capsSummary, qemuCaps } from './qemu-caps.ts'
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
  /** The capabilities qmpd chooses by (capsSummary of ./qemu-caps.ts). */
  capabilities: Record<string, boolean>
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

/**
 * The binary's version line and what its capability probe (./qemu-caps.ts, run once per binary)
 * found: the commands of interest, the migration capabilities, capsSummary's few.
 * @throws QmpdError QEMU_NOT_FOUND when the binary cannot be run; QEMU_START_FAILED when the probe's QMP never answers.
 */
export async function probeQemu(binary: string, log: Logger): Promise<QemuProbe> {
  const { version, line } = await qemuVersion(binary)
  const caps = await qemuCaps(binary, { log })
  return {
    binary,
    version,
    versionLine: line,
    qmpVersion: caps.qmpVersion,
    commands: Object.fromEntries(COMMANDS_OF_INTEREST.map((c) => [c, caps.hasCommand(c)])),
    migrationCapabilities: [...caps.migrateCapabilities],
    capabilities: capsSummary(caps),
    probedAt: new Date().toISOString(),
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
