// Builds QEMU's command line from a VM definition; pure, launches nothing.
import { needsSpawn, nicArgv } from './argv-net.ts'
import { smpArg } from './cpu.ts'
import type { VmDefinition } from './definition.ts'
import { blockdevProps, writeCacheProp } from './disk-options.ts'
import { firmwareArgv, NVRAM_DISK_ID, type Ovmf } from './firmware.ts'
import { cdromArgv, vncArg } from './media.ts'

/** Fixed names of the files QEMU creates in its VM directory (it runs with that directory as cwd). */
export const VM_FILES = {
  qmpSocket: 'qmp.sock',
  qgaSocket: 'qga.sock',
  pidfile: 'qemu.pid',
  serialLog: 'serial.log',
  /** The first serial port as a unix socket (definition serialSocket). */
  consoleSocket: 'console.sock',
  qemuLog: 'qemu.log',
  /** RAM and device state of a managed save; the next start restores from it. */
  managedSave: 'managed.save',
  /** A restored managed save on its way out: renamed at once after the restore, deleted in the background. */
  restoredSave: 'managed.save.restored',
} as const

/** The image a disk currently runs on (its active layer), which external snapshots move. */
export interface ActiveDisk {
  id: string
  file: string
  format: 'qcow2' | 'raw'
  /** Generation of the disk's node names; bumped whenever a new top node is added. */
  gen: number
}

/** Stable node names: `<disk>-f<gen>` for the format node, `<disk>-p<gen>` for its protocol node. */
export function nodeNames(disk: string, gen: number): { format: string; protocol: string } {
  return { format: `${disk}-f${gen}`, protocol: `${disk}-p${gen}` }
}

/**
 * QEMU's seccomp sandbox, on for every QEMU qmpd launches: no obsolete system calls, no set*uid
 * (QEMU never regains privileges), no fork or exec (a `migrate` to `exec:` gets QEMU killed by
 * SIGSYS instead of running a command), no changes to scheduling or CPU affinity. qmpd needs
 * none of them: RAM state goes to and from a unix socket (src/state/ramfile.ts), block jobs and
 * internal snapshots run inside QEMU, the guest agent is a chardev socket.
 */
export const SANDBOX = 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny'

/** The sandbox of a VM with a bridge NIC: QEMU forks qemu-bridge-helper, so spawn is allowed for it alone (docs/security.md). */
export const SANDBOX_SPAWN = 'on,obsolete=deny,elevateprivileges=deny,spawn=allow,resourcecontrol=deny'

/** Options of one launch that are not part of the definition. */
export interface LaunchOptions {
  accel: 'kvm' | 'tcg'
  /** -cpu model, chosen with the accelerator (src/vm/accel.ts); QEMU's default (qemu64) when absent. */
  cpuModel?: string
  disks: ActiveDisk[]
  /** The OVMF build of a `firmware: uefi` VM (src/vm/firmware.ts findOvmf). */
  ovmf?: Ovmf
  /** Start with -incoming defer (restore of saved RAM state follows over QMP). */
  incoming?: boolean
}

/**
 * The argument vector for qemu-system-x86_64. Paths QEMU creates are relative because QEMU runs
 * with the VM directory as cwd: unix socket paths are limited to 108 bytes and state dirs can be long.
 * -blockdev and -device take JSON (QEMU >= 6.2), so file names need no comma escaping.
 */
export function buildArgv(def: VmDefinition, opts: LaunchOptions): string[] {
  if (def.firmware === 'uefi' && !opts.ovmf) throw new Error('a UEFI VM needs opts.ovmf')
  const fw = def.firmware === 'uefi' && opts.ovmf ? firmwareArgv(opts.ovmf, opts.disks) : undefined
  const argv = [
    '-name', `guest=${def.name},debug-threads=on`,
    '-machine', fw ? `${def.machine},${fw.machineProps}` : def.machine,
    '-accel', opts.accel,
    ...(opts.cpuModel ? ['-cpu', opts.cpuModel] : []),
    '-smp', smpArg(def.cpus, def.cpu),
    '-m', `${def.memoryMiB}M`,
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-msg', 'timestamp=on',
    '-sandbox', needsSpawn(def.nics ?? []) ? SANDBOX_SPAWN : SANDBOX,
    '-qmp', `unix:${VM_FILES.qmpSocket},server=on,wait=off`,
    '-pidfile', VM_FILES.pidfile,
    // -S: no guest code runs before qmpd is connected and has subscribed to events.
    '-S',
  ]
  if (def.serialSocket) {
    // One chardev gives both: the socket for a console client, logfile= for serial.log.
    const log = def.serialLog ? `,logfile=${VM_FILES.serialLog}` : ''
    argv.push('-chardev', `socket,id=serial0,path=${VM_FILES.consoleSocket},server=on,wait=off${log}`, '-serial', 'chardev:serial0')
  } else {
    argv.push('-serial', def.serialLog ? `file:${VM_FILES.serialLog}` : 'null')
  }
  if (def.kernel) argv.push('-kernel', def.kernel)
  if (def.initrd) argv.push('-initrd', def.initrd)
  if (def.append) argv.push('-append', def.append)
  if (fw) argv.push('-blockdev', fw.blockdev)
  let ide = 0
  let sata = 0
  const explicitBoot = def.disks.some((d) => d.bootIndex !== undefined) || (def.cdroms ?? []).some((c) => c.bootIndex !== undefined)
  // sata on pc needs an AHCI controller (q35 has one built in: ide.0..ide.5); virtio-scsi one HBA.
  if (def.machine === 'pc' && def.disks.some((d) => d.bus === 'sata')) argv.push('-device', JSON.stringify({ driver: 'ahci', id: 'ahci0' }))
  if (def.disks.some((d) => d.bus === 'virtio-scsi')) argv.push('-device', JSON.stringify({ driver: 'virtio-scsi-pci', id: 'scsi0' }))
  opts.disks.forEach((disk, i) => {
    const spec = def.disks.find((d) => d.id === disk.id)
    const names = nodeNames(disk.id, disk.gen)
    const props = blockdevProps(spec)
    argv.push(
      '-blockdev',
      JSON.stringify({
        driver: disk.format,
        'node-name': names.format,
        'read-only': spec?.readOnly ?? false,
        ...props.format,
        file: { driver: 'file', filename: disk.file, 'node-name': names.protocol, ...props.file },
      }),
    )
    // The NVRAM is pflash1 (a -machine property set above), not a guest device.
    if (fw && disk.id === NVRAM_DISK_ID) return
    const device: Record<string, unknown> = { id: disk.id, drive: names.format }
    if (spec?.bus === 'ide' || (spec?.bus === 'sata' && def.machine === 'q35')) {
      device['driver'] = 'ide-hd'
      // q35's AHCI has one device per port (ide.0..ide.5); pc's PIIX has two buses with two units each.
      if (def.machine === 'q35') device['bus'] = `ide.${ide}`
      else Object.assign(device, { bus: `ide.${ide >> 1}`, unit: ide & 1 })
      ide++
    } else if (spec?.bus === 'sata') {
      Object.assign(device, { driver: 'ide-hd', bus: `ahci0.${sata++}` })
    } else if (spec?.bus === 'virtio-scsi') {
      Object.assign(device, { driver: 'scsi-hd', bus: 'scsi0.0' })
    } else {
      device['driver'] = 'virtio-blk-pci'
    }
    device['write-cache'] = writeCacheProp(spec?.cache)
    if (spec?.serial) device['serial'] = spec.serial
    if (explicitBoot) {
      if (spec?.bootIndex !== undefined) device['bootindex'] = spec.bootIndex
    } else if (i === 0 && !def.kernel) device['bootindex'] = 0
    argv.push('-device', JSON.stringify(device))
  })
  argv.push(...cdromArgv(def.cdroms ?? [], def.machine, ide))
  // -nodefaults leaves out the graphics card: a display needs one, or VNC shows only QEMU's placeholder.
  if (def.vnc) argv.push('-device', JSON.stringify({ driver: 'VGA', id: 'video0' }), '-vnc', vncArg(def.vnc))
  argv.push(...nicArgv(def.nics ?? []))
  if (def.guestAgent) {
    argv.push(
      '-chardev', `socket,id=qga0,path=${VM_FILES.qgaSocket},server=on,wait=off`,
      '-device', 'virtio-serial-pci,id=qgaserial0',
      '-device', 'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
    )
  }
  if (opts.incoming) argv.push('-incoming', 'defer')
  return argv
}
