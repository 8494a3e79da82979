// Which QEMU the bench measures (both sides: qmpd and the raw baselines) and on which accelerator;
// chosen once by bench/run.ts, read by the daemon and raw launchers. Changes no QEMU installation.
import { chmodSync, existsSync, mkdirSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { probeAccel } from '../../src/vm/accel-probe.ts'
import { qemuVersion } from '../../src/vm/qemu-version.ts'

/** The QEMU under measurement. */
export interface BenchQemu {
  /** qemu-system-x86_64 to run (a path, or the name on PATH). */
  binary: string
  qemuImg: string
  /** First line of `binary --version`. */
  version: string
  /** What both sides run with: KVM when the daemon's probe says it works for this binary, else TCG. */
  accel: 'kvm' | 'tcg'
  /** Why (the probe's reason when KVM was not usable). */
  accelNote: string
  /** The machine type both sides use (buildArgv's default q35), recorded with the table. */
  machineType: string
}

let chosen: BenchQemu = { binary: 'qemu-system-x86_64', qemuImg: 'qemu-img', version: 'unknown', accel: 'tcg', accelNote: 'not probed', machineType: 'q35' }

/** The QEMU the bench runs (defaults until chooseQemu() ran). */
export function benchQemu(): BenchQemu {
  return chosen
}

/** Quotes a path for the wrapper script's sh (single quotes; the path is the bench user's own flag). */
function sq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`
}

/**
 * Wrapper scripts for an unpacked (not installed) QEMU tree such as /tmp/q10/root: its firmware
 * directory (-L) and module directory (QEMU_MODULE_DIR) are not the compiled-in ones. Written into
 * `binDir`, which the bench puts first on PATH, so helpers that run `qemu-img`/`qemu-io` by name
 * use the same QEMU too.
 */
export function unpackedQemuWrappers(root: string, binDir: string): { binary: string; qemuImg: string } {
  const bin = join(root, 'usr', 'bin')
  if (!existsSync(join(bin, 'qemu-system-x86_64'))) throw new Error(`no ${join(bin, 'qemu-system-x86_64')}`)
  mkdirSync(binDir, { recursive: true })
  const env = `QEMU_MODULE_DIR=${sq(join(root, 'usr', 'lib', 'x86_64-linux-gnu', 'qemu'))}; export QEMU_MODULE_DIR\n`
  const write = (name: string, extra: string): string => {
    const file = join(binDir, name)
    writeFileSync(file, `#!/bin/sh\n${env}exec ${sq(join(bin, name))}${extra} "$@"\n`)
    chmodSync(file, 0o755)
    return file
  }
  const binary = write('qemu-system-x86_64', ` -L ${sq(join(root, 'usr', 'share', 'qemu'))}`)
  const qemuImg = write('qemu-img', '')
  for (const n of ['qemu-io', 'qemu-nbd']) if (existsSync(join(bin, n))) write(n, '')
  return { binary, qemuImg }
}

/**
 * Chooses the QEMU (flags, else QMPD_QEMU / QMPD_QEMU_IMG, else PATH), reads its version and runs
 * the daemon's KVM probe on it. A qemu-img next to an explicit binary is taken with it.
 */
export async function chooseQemu(opts: { binary?: string; qemuImg?: string; forceAccel?: 'kvm' | 'tcg' }): Promise<BenchQemu> {
  const binary = opts.binary ?? process.env['QMPD_QEMU'] ?? 'qemu-system-x86_64'
  const sibling = binary.includes('/') ? join(dirname(binary), 'qemu-img') : undefined
  const qemuImg = opts.qemuImg ?? process.env['QMPD_QEMU_IMG'] ?? (sibling && existsSync(sibling) ? sibling : 'qemu-img')
  const v = await qemuVersion(binary)
  if (v.error !== undefined) throw new Error(`${binary} --version: ${v.error}`)
  const iv = await qemuVersion(qemuImg)
  if (iv.error !== undefined) throw new Error(`${qemuImg} --version: ${iv.error}`)
  let accel: 'kvm' | 'tcg' = 'tcg'
  let accelNote: string
  if (opts.forceAccel) {
    accel = opts.forceAccel
    accelNote = `forced with --accel ${accel}`
  } else {
    const probe = await probeAccel(binary)
    if (probe.kvm.usable) {
      accel = 'kvm'
      accelNote = `KVM probe passed (cpu ${probe.kvm.cpuModel})`
    } else accelNote = `KVM probe failed: ${probe.kvm.reason.slice(0, 200)}`
  }
  chosen = { binary, qemuImg, version: v.line, accel, accelNote, machineType: 'q35' }
  return chosen
}
