// Chooses the accelerator and CPU model a VM launches with, from its definition, the daemon's
// --accel and the host probe (./accel-probe.ts); launches nothing itself.
import type { Logger } from 'pino'
import type { Config } from '../config.ts'
import { QmpdError } from '../errors.ts'
import { probeAccel, type AccelProbe } from './accel-probe.ts'

/** The accelerator a VM's QEMU runs under, its CPU model and why (GET /v1/vms/{vm} shows it). */
export interface MachineChoice {
  accel: 'kvm' | 'tcg'
  cpuModel: string
  reason: string
  qemuVersion?: string
}

/** The model TCG gets by default: QEMU's own default x86-64 model, which a Linux guest boots on. */
export const TCG_DEFAULT_MODEL = 'qemu64'

/**
 * The accelerator and CPU model for a definition's `accel` and `cpu.model` (accel defaults to the
 * daemon's --accel). `auto` takes KVM only when the probe ran its long-mode guest under it, and
 * TCG otherwise, saying why.
 * @throws QmpdError NOT_SUPPORTED when KVM is asked for explicitly and the probe says it cannot run
 * the guest (the probe's reason in the message), or when `-cpu host` would run under TCG.
 */
export async function chooseMachine(
  def: { accel?: 'auto' | 'kvm' | 'tcg' | undefined; cpu?: { model?: string | undefined } | undefined },
  config: Pick<Config, 'accel' | 'qemuBinary'>,
  probe: (binary: string) => Promise<AccelProbe> = probeAccel,
): Promise<MachineChoice> {
  const want = def.accel ?? config.accel
  const from = def.accel ? 'the definition asks for' : 'the daemon runs with --accel'
  const model = def.cpu?.model
  if (want === 'tcg') return tcg(model, `${from} tcg`)
  const p = await probe(config.qemuBinary)
  const version = p.qemuVersion ? { qemuVersion: p.qemuVersion } : {}
  if (p.kvm.usable) {
    const notes = p.kvm.notes.length ? ` (${p.kvm.notes.join('; ')})` : ''
    return { accel: 'kvm', cpuModel: model ?? p.kvm.cpuModel, reason: `${from} ${want}; the probe ran its long-mode guest under KVM with -cpu ${p.kvm.cpuModel}${notes}`, ...version }
  }
  if (want === 'kvm') {
    throw new QmpdError('NOT_SUPPORTED', `KVM cannot run this guest on this host (${from} kvm): ${p.kvm.reason}`, { accel: 'kvm', reason: p.kvm.reason })
  }
  return { ...tcg(model, `${from} auto; KVM cannot run a Linux guest here: ${p.kvm.reason}`), ...version }
}

function tcg(model: string | undefined, reason: string): MachineChoice {
  if (model === 'host') {
    throw new QmpdError('NOT_SUPPORTED', `cpu.model host needs KVM, and this VM runs under TCG (${reason})`, { accel: 'tcg', cpuModel: 'host' })
  }
  return { accel: 'tcg', cpuModel: model ?? TCG_DEFAULT_MODEL, reason }
}

/**
 * Runs the host probe in the background at daemon start (VMs that need it wait for the same run)
 * and logs what `--accel auto` will choose, why, and the QEMU version.
 */
export function logAccelProbe(config: Pick<Config, 'accel' | 'qemuBinary'>, log: Logger): void {
  void probeAccel(config.qemuBinary).then(
    (p) => {
      const facts = { component: 'accel', binary: p.binary, qemuVersion: p.qemuVersion, probeMs: p.ms, daemonAccel: config.accel }
      if (p.kvm.usable) log.info({ ...facts, accel: 'kvm', cpuModel: p.kvm.cpuModel, notes: p.kvm.notes }, 'accelerator probe: KVM runs a long-mode guest')
      else log.warn({ ...facts, accel: 'tcg', cpuModel: TCG_DEFAULT_MODEL, reason: p.kvm.reason }, 'accelerator probe: KVM unusable, auto falls back to TCG')
    },
    (err: unknown) => log.error({ err, component: 'accel' }, 'accelerator probe failed'),
  )
}
