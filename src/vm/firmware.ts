// UEFI firmware of a VM: finding OVMF through QEMU's firmware descriptors, its argv, and creating the VM's NVRAM; no snapshot logic.
import { existsSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { QmpdError } from '../errors.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import { nodeNames, type ActiveDisk } from './argv.ts'

/**
 * The disk id of a UEFI VM's variable store. The NVRAM is one more disk to the snapshot engine
 * (runtime.disks): internal snapshots and checkpoints include it, external ones overlay it with
 * the disks, reverts bring it back. It is no guest -device: QEMU attaches it as pflash1.
 */
export const NVRAM_DISK_ID = 'nvram'

/** The NVRAM's file in the VM directory: a qcow2 copy of OVMF's variable template. */
export const NVRAM_FILE = 'nvram.qcow2'

/** The runtime disk of a UEFI VM's NVRAM before its first start: nvram.qcow2 in the VM directory. */
export function nvramDisk(vmDir: string): ActiveDisk {
  return { id: NVRAM_DISK_ID, file: join(vmDir, NVRAM_FILE), format: 'qcow2', gen: 0 }
}

/** Node name of the read-only firmware code (pflash0). */
export const FW_CODE_NODE = 'fw-code'

/** Where Debian's qemu-system-data and ovmf put the firmware descriptors (docs/interop/firmware.json). */
export const FIRMWARE_DESCRIPTOR_DIR = '/usr/share/qemu/firmware'

/** OVMF's code and variable template, as a descriptor names them. */
export interface Ovmf {
  code: string
  varsTemplate: string
  descriptor: string
}

interface Descriptor {
  'interface-types'?: string[]
  mapping?: { device?: string; executable?: { filename?: string; format?: string }; 'nvram-template'?: { filename?: string; format?: string } }
  targets?: Array<{ architecture?: string; machines?: string[] }>
  features?: string[]
}

/**
 * The UEFI build qmpd uses: the first descriptor (in name order, as QEMU's firmware.json says to
 * read them) for x86_64 flash firmware that needs no SMM and has no secure boot, with raw code and
 * template files that exist (Debian: 60-edk2-x86_64.json, OVMF_CODE_4M.fd + OVMF_VARS_4M.fd).
 * SMM is not needed by that build, so q35 and pc both run it, also under TCG.
 * @throws QmpdError HOST_RESOURCE_MISSING when there is none (install the ovmf package).
 */
export function findOvmf(dir = FIRMWARE_DESCRIPTOR_DIR): Ovmf {
  let names: string[] = []
  try {
    names = readdirSync(dir).filter((n) => n.endsWith('.json')).sort()
  } catch {
    /* no directory: no firmware */
  }
  for (const name of names) {
    let d: Descriptor
    try {
      d = JSON.parse(readFileSync(join(dir, name), 'utf8')) as Descriptor
    } catch {
      continue
    }
    const m = d.mapping
    const code = m?.executable?.filename
    const vars = m?.['nvram-template']?.filename
    if (!d['interface-types']?.includes('uefi') || m?.device !== 'flash' || !code || !vars) continue
    if ((m.executable?.format ?? 'raw') !== 'raw' || (m['nvram-template']?.format ?? 'raw') !== 'raw') continue
    if (!d.targets?.some((t) => t.architecture === 'x86_64')) continue
    if (d.features?.some((f) => f === 'requires-smm' || f === 'secure-boot' || f === 'enrolled-keys')) continue
    if (!existsSync(code) || !existsSync(vars)) continue
    return { code, varsTemplate: vars, descriptor: join(dir, name) }
  }
  throw new QmpdError('HOST_RESOURCE_MISSING', `firmware uefi: no OVMF build without SMM and secure boot is described in ${dir} (install the ovmf package)`, { dir })
}

/**
 * -blockdev for the read-only code, and the -machine properties that attach code and NVRAM as
 * pflash0/pflash1. The NVRAM's own -blockdev comes with the other disks (its current layer and
 * generation, which external snapshots move).
 */
export function firmwareArgv(ovmf: Ovmf, disks: ActiveDisk[]): { blockdev: string; machineProps: string } {
  const nvram = disks.find((d) => d.id === NVRAM_DISK_ID)
  if (!nvram) throw new Error('a UEFI VM has an nvram disk in its runtime record (added at define)')
  return {
    blockdev: JSON.stringify({
      driver: 'raw',
      'node-name': FW_CODE_NODE,
      'read-only': true,
      file: { driver: 'file', filename: ovmf.code, 'read-only': true },
    }),
    machineProps: `pflash0=${FW_CODE_NODE},pflash1=${nodeNames(NVRAM_DISK_ID, nvram.gen).format}`,
  }
}

/**
 * Creates the VM's NVRAM from OVMF's template as qcow2 (so that internal snapshots can live in
 * it), under a temporary name renamed into place: a crash leaves either no NVRAM or a whole one,
 * and a leftover temporary file is removed by the next attempt.
 * @throws QmpdError QEMU_IMG_FAILED or QEMU_NOT_FOUND from qemu-img.
 */
export async function createNvram(qemuImg: QemuImg, file: string, template: string): Promise<void> {
  const tmp = `${file}.creating`
  rmSync(tmp, { force: true })
  try {
    await qemuImg.run(['convert', '-q', '-f', 'raw', '-O', 'qcow2', template, tmp])
    renameSync(tmp, file)
  } catch (err) {
    rmSync(tmp, { force: true })
    throw err
  }
}

/**
 * Creates the NVRAM at a UEFI VM's launch when its base file does not exist yet (the first
 * start, or after it was deleted by hand before any snapshot); an overlay that is missing is an
 * error for the caller's disk checks, never silently replaced by a blank store.
 * @throws QmpdError QEMU_IMG_FAILED or QEMU_NOT_FOUND from qemu-img.
 */
export async function ensureNvram(qemuImg: QemuImg, disks: ActiveDisk[], base: string, ovmf: Ovmf): Promise<boolean> {
  const nvram = disks.find((d) => d.id === NVRAM_DISK_ID)
  if (!nvram || nvram.file !== base || existsSync(base)) return false
  await createNvram(qemuImg, base, ovmf.varsTemplate)
  return true
}
