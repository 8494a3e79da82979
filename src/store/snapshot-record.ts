// The snapshot record as stored (zod); no behaviour.
import { z } from 'zod'
import { StoredDefinition } from '../vm/definition.ts'

/** How one disk took part in a snapshot. */
export const SnapshotDisk = z.strictObject({
  id: z.string(),
  /** internal: a tag inside `file`; external: `file` froze and `overlay` took the writes; excluded: not captured. */
  mode: z.enum(['internal', 'external', 'excluded']),
  /** The image that holds the snapshot's data (internal: the qcow2 with the tag; external: the frozen image). */
  file: z.string(),
  format: z.enum(['qcow2', 'raw']),
  /** external: the overlay created on top of `file` when the snapshot was taken. */
  overlay: z.string().optional(),
})
export type SnapshotDisk = z.output<typeof SnapshotDisk>

/** A snapshot as stored. The tree is kept by `parent`; `current` lives on the VM. */
export const Snapshot = z.strictObject({
  vm: z.string(),
  name: z.string(),
  description: z.string().optional(),
  kind: z.enum(['internal', 'external']),
  memory: z.boolean(),
  parent: z.string().optional(),
  createdAt: z.string(),
  /** The VM's state when the snapshot was taken; a revert with memory restores to it by default. */
  vmState: z.enum(['running', 'paused', 'shutoff']),
  disks: z.array(SnapshotDisk),
  /** external memory: the migration-stream file; internal memory: the disk whose qcow2 holds the vmstate. */
  vmstateFile: z.string().optional(),
  vmstateDisk: z.string().optional(),
  live: z.boolean().optional(),
  quiesced: z.boolean().optional(),
  /** How long the guest was paused by taking it (from QEMU's STOP/RESUME events). */
  downtimeMs: z.number().optional(),
  /** The QEMU version that wrote the RAM state (a restore needs a compatible QEMU). */
  qemuVersion: z.string().optional(),
  /** How RAM was captured: background-snapshot, precopy (disks switched in the final pause), paused, snapshot-save. */
  ramMethod: z.enum(['background-snapshot', 'precopy', 'paused', 'snapshot-save']).optional(),
  /** external memory: how the RAM state file is laid out (stream, or mapped-ram: needs a QEMU with the mapped-ram capability to load). */
  ramFormat: z.enum(['stream', 'mapped-ram']).optional(),
  /**
   * The VM's definition at the snapshot's instant (as libvirt keeps the domain XML); a revert
   * makes it the VM's definition again. Absent in rows written before qmpd recorded it: their
   * revert keeps the definition the VM has.
   */
  definition: StoredDefinition.optional(),
  /**
   * VMs defined as linked clones of this snapshot (src/snapshot/clone.ts): their overlays are
   * backed by its frozen images, so it and the snapshots below it are kept while they exist.
   */
  clones: z.array(z.string()).optional(),
  /** When the scheduler deletes it (through the normal delete job); absent: never. */
  expiresAt: z.string().optional(),
  /** The schedule that took it: only that schedule's retention ever deletes it. */
  schedule: z.string().optional(),
})
export type Snapshot = z.output<typeof Snapshot>
