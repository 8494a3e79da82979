// VM definitions and runtime records (zod); no behaviour.
import { z } from 'zod'
import { CpuSpec, topologyIssue } from './cpu.ts'
import { DiskOptionFields, diskOptionIssue } from './disk-options.ts'
import { Labels } from './labels.ts'
import { NicDefinition, nicListIssues } from './nic.ts'

/** Names of VMs and snapshots: what libvirt accepts in a file name, minus surprises. */
export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/

/** A VM or snapshot name. */
export const Name = z
  .string()
  .regex(NAME_PATTERN, 'must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}')
  .describe('1-64 characters: letters, digits, ".", "_" and "-", starting with a letter or digit')

/** A file path as given by a user; confinement is checked later by PathPolicy. */
export const PathString = z
  .string()
  .min(1)
  .max(4096)
  .refine((s) => !s.includes('\0'), 'must not contain a NUL byte')
  .refine((s) => !s.split(/[\\/]+/).includes('..'), "must not contain '..' segments")

/** One disk of a VM. `id` is the guest-visible device id and the stem of its node names. */
export const DiskDefinition = z.strictObject({
  id: z.string().regex(/^[a-z][a-z0-9]{0,15}$/, 'must match [a-z][a-z0-9]{0,15}, e.g. vda'),
  file: PathString.describe('image file; relative paths are under the VM directory'),
  format: z.enum(['qcow2', 'raw']).default('qcow2'),
  bus: z.enum(['virtio', 'virtio-scsi', 'sata', 'ide']).default('virtio').describe('virtio (virtio-blk), virtio-scsi, sata (AHCI) or ide'),
  sizeMiB: z
    .number()
    .int()
    .min(1)
    .max(16 * 1024 * 1024)
    .optional()
    .describe('create the image with qemu-img when the file does not exist'),
  readOnly: z.boolean().default(false),
  ...DiskOptionFields,
})
export type DiskDefinition = z.output<typeof DiskDefinition>

/** What a user gives to define a VM that qmpd launches. */
export const VmDefinition = z
  .strictObject({
    name: Name,
    machine: z.enum(['q35', 'pc']).default('q35'),
    cpus: z.number().int().min(1).max(64).optional().describe('number of vCPUs (default 1, or sockets*cores*threads of cpu)'),
    cpu: CpuSpec.optional().describe('CPU model and topology; with a topology, cpus (when given) must equal sockets*cores*threads'),
    accel: z.enum(['auto', 'kvm', 'tcg']).optional().describe("accelerator; default: the daemon's --accel. auto takes KVM only where the host probe ran a long-mode guest under it"),
    memoryMiB: z.number().int().min(16).max(1024 * 1024).default(128),
    disks: z.array(DiskDefinition).max(16).default([]),
    kernel: PathString.optional(),
    initrd: PathString.optional(),
    append: z.string().max(4096).optional(),
    serialLog: z.boolean().default(true).describe('write the first serial port to serial.log in the VM directory'),
    serialSocket: z.boolean().optional().describe('also serve the first serial port on console.sock in the VM directory (a unix socket; default false; serial.log still gets everything when serialLog)'),
    guestAgent: z.boolean().default(false).describe('add a virtio-serial qemu-guest-agent channel on a socket qmpd owns'),
    labels: Labels.optional(),
    firmware: z.enum(['bios', 'uefi']).optional().describe('bios (SeaBIOS, the default) or uefi (OVMF, with a per-VM NVRAM that snapshots include)'),
    cdroms: z
      .array(
        z.strictObject({
          file: PathString.describe('an ISO image (or any raw image), attached read-only; relative paths are under the VM directory'),
          bootIndex: z.number().int().min(0).max(99).optional(),
        }),
      )
      .max(4)
      .optional()
      .describe('CD-ROMs cd0, cd1, ... on IDE/AHCI ports after the disks: read-only, in no snapshot'),
    vnc: z
      .union([
        z.strictObject({ unix: z.literal(true) }).describe('a unix socket, vnc.sock in the VM directory'),
        z.strictObject({ port: z.number().int().min(5900).max(65535) }).describe('a TCP port on 127.0.0.1 only'),
      ])
      .optional()
      .describe('a VNC display (none when absent)'),
    nics: z.array(NicDefinition).max(8).optional().describe('network cards, in PCI order (see docs/api.md, "Network cards"); none when absent'),
  })
  .superRefine((def, ctx) => {
    const seen = new Set<string>()
    def.disks.forEach((d, i) => {
      // The id of a UEFI VM's NVRAM in the snapshot engine (src/vm/firmware.ts).
      if (d.id === 'nvram') ctx.addIssue({ code: 'custom', path: ['disks', i, 'id'], message: 'nvram is reserved for the UEFI variable store' })
      // Only the ids the CD-ROMs take: stored VMs with a disk named cd0 and no cdroms still load.
      const cd = /^cd([0-9]+)$/.exec(d.id)
      if (cd && Number(cd[1]) < (def.cdroms?.length ?? 0)) ctx.addIssue({ code: 'custom', path: ['disks', i, 'id'], message: `${d.id} is the id of a CD-ROM (cdroms[${cd[1]}])` })
      if (seen.has(d.id)) ctx.addIssue({ code: 'custom', path: ['disks', i, 'id'], message: `duplicate disk id ${d.id}` })
      seen.add(d.id)
      const issue = diskOptionIssue(d)
      if (issue) ctx.addIssue({ code: 'custom', path: ['disks', i], message: issue })
      if (d.bootIndex !== undefined && def.disks.findIndex((o) => o.bootIndex === d.bootIndex) !== i) {
        ctx.addIssue({ code: 'custom', path: ['disks', i, 'bootIndex'], message: `bootIndex ${d.bootIndex} is given twice` })
      }
    })
    const cpuIssue = topologyIssue(def.cpus, def.cpu)
    if (cpuIssue) ctx.addIssue({ code: 'custom', path: ['cpu'], message: cpuIssue })
    for (const issue of nicListIssues(def.nics ?? [])) ctx.addIssue({ code: 'custom', ...issue })
    // q35's AHCI ports (ide.0-5) take ide and sata disks; pc's PIIX (2 buses x 2 units) only ide ones.
    const idePorts = def.disks.filter((d) => d.bus === 'ide' || (d.bus === 'sata' && def.machine === 'q35')).length + (def.cdroms?.length ?? 0)
    const maxIde = def.machine === 'q35' ? 6 : 4
    if (def.cdroms?.length && idePorts > maxIde) {
      ctx.addIssue({ code: 'custom', path: ['cdroms'], message: `${idePorts} IDE/SATA devices (disks and CD-ROMs) but machine ${def.machine} has ${maxIde} ports` })
    }
    const boots = [...def.disks.map((d) => d.bootIndex), ...(def.cdroms ?? []).map((c) => c.bootIndex)].filter((b) => b !== undefined)
    if (def.cdroms?.length && new Set(boots).size !== boots.length) ctx.addIssue({ code: 'custom', path: ['cdroms'], message: 'a bootIndex is given twice (disks and CD-ROMs share them)' })
    if ((def.initrd || def.append) && !def.kernel) {
      ctx.addIssue({ code: 'custom', path: ['kernel'], message: 'initrd and append need a kernel' })
    }
  })
export type VmDefinition = z.output<typeof VmDefinition>

/** Registering a QEMU that something else started, by its QMP socket. */
export const AdoptDefinition = z.strictObject({
  name: Name,
  adopt: z.strictObject({
    qmpSocket: PathString.describe('path of the running QEMU\'s QMP unix socket (server mode)'),
  }),
  labels: Labels.optional(),
})
export type AdoptDefinition = z.output<typeof AdoptDefinition>

/** Either kind of definition, as stored. */
export const StoredDefinition = z.union([AdoptDefinition, VmDefinition])
export type StoredDefinition = VmDefinition | AdoptDefinition

/** True for VMs that qmpd adopted rather than launched. */
export function isAdopted(def: StoredDefinition): def is AdoptDefinition {
  return 'adopt' in def
}

/** Run states as qmpd reports them. `reason` refines paused/shutoff/crashed. */
export const VmState = z.enum(['shutoff', 'starting', 'running', 'paused', 'stopping', 'crashed', 'saved', 'unknown'])
export type VmState = z.output<typeof VmState>

/** What the store remembers about a VM between daemon runs. */
export const VmRuntime = z.strictObject({
  state: VmState,
  reason: z.string().optional(),
  pid: z.number().int().positive().optional(),
  /** /proc/PID/stat start time, so that a recycled PID is never mistaken for our QEMU. */
  pidStartTime: z.string().optional(),
  qmpSocket: z.string(),
  exit: z
    .strictObject({ code: z.number().int().nullable(), signal: z.string().nullable(), at: z.string() })
    .optional(),
  /** The active layer of each disk; external snapshots and block jobs move it. */
  disks: z
    .array(
      z.strictObject({
        id: z.string(),
        file: z.string(),
        format: z.enum(['qcow2', 'raw']),
        gen: z.number().int().min(0),
      }),
    )
    .default([]),
  /** The accelerator and CPU model of the last launch, and why (src/vm/accel.ts). */
  machine: z
    .strictObject({ accel: z.enum(['kvm', 'tcg']), cpuModel: z.string(), reason: z.string(), qemuVersion: z.string().optional() })
    .optional(),
  /** The snapshot the VM's current state descends from (set by create and revert). */
  currentSnapshot: z.string().optional(),
  /** Files qmpd created for this VM (removed by DELETE ?deleteStorage=true). */
  createdFiles: z.array(z.string()).default([]),
  /**
   * Set when the store, QEMU and the files disagree in a way reconcile (src/ops/reconcile.ts)
   * could not resolve on its own: the VM needs an operator. Optional, so rows written before it
   * existed still load.
   */
  repair: z.strictObject({ reason: z.string(), at: z.string() }).optional(),
})
export type VmRuntime = z.output<typeof VmRuntime>
