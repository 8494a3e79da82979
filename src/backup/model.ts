// Backup chains as qmpd records them (request bodies, the per-VM manifest's shape); no I/O.
import { z } from 'zod'
import { PathString } from '../vm/definition.ts'

/** How a backup point relates to the one before it. */
export const BackupMode = z.enum(['full', 'incremental', 'differential'])
export type BackupMode = z.output<typeof BackupMode>

/** Body of POST /v1/vms/{vm}/backups. */
export const CreateBackupBody = z.strictObject({
  mode: BackupMode.describe(
    'full: every cluster; incremental: the clusters written since the chain\'s last point; differential: the clusters that differ from the chain\'s last full point, in a file backed by that full point (incremental and differential fall back to full, and say why, when the bitmap cannot be trusted)',
  ),
  dir: PathString.describe('the directory of the backup chain (an existing directory; relative: under the VM\'s directory). One chain per VM and directory'),
  disks: z.array(z.string().regex(/^[a-z][a-z0-9]{0,15}$/)).min(1).max(16).optional().describe('disk ids (default: every disk); fixed when the chain is created'),
})
export type CreateBackupBody = z.output<typeof CreateBackupBody>

/** Body of POST /v1/vms/{vm}/backups/{id}/restore. */
export const RestoreBackupBody = z.strictObject({
  file: PathString.describe('the new standalone qcow2 file (must not exist)'),
  disk: z.string().regex(/^[a-z][a-z0-9]{0,15}$/).optional().describe('which disk of the point (required when it has more than one)'),
})
export type RestoreBackupBody = z.output<typeof RestoreBackupBody>

/** One disk of a backup point: its file (backed by the previous point's file of that disk, if any). */
export const PointDisk = z.strictObject({
  id: z.string(),
  file: z.string(),
  backing: z.string().nullable(),
  /** The disk's active layer when the point was taken (the bitmap lives there). */
  layer: z.string(),
  /** Bytes QEMU copied into this point. */
  copiedBytes: z.number().int().nonnegative(),
  /** Layers below `layer` whose bitmaps were merged into its bitmap for this point (external snapshots since the last point). */
  merged: z.array(z.string()).optional(),
})
export type PointDisk = z.output<typeof PointDisk>

/** One backup point: all of its disks from one instant (one QEMU transaction). */
export const BackupPoint = z.strictObject({
  id: z.string().regex(/^b[0-9a-f]{8}$/),
  mode: BackupMode,
  /** What the request asked for; differs from mode when qmpd had to fall back to full. */
  requested: BackupMode,
  /** Why mode differs from requested. */
  reason: z.string().optional(),
  /** A differential point: the full point its files are backed by. */
  basedOn: z.string().optional(),
  /** The instant the point holds: when QEMU started the jobs (ISO 8601). */
  at: z.string(),
  ms: z.number().int().nonnegative(),
  disks: z.array(PointDisk),
})
export type BackupPoint = z.output<typeof BackupPoint>

/** A chain: one directory, one persistent dirty bitmap per disk (named `bitmap`), its points oldest first. */
export const BackupChain = z.strictObject({
  id: z.string().regex(/^c[0-9a-f]{8}$/),
  dir: z.string(),
  bitmap: z.string(),
  disks: z.array(z.string()),
  points: z.array(BackupPoint),
  /** Set when qmpd cannot vouch for the bitmaps any more (the next backup is full and says why). */
  invalid: z.strictObject({ reason: z.string(), at: z.string() }).optional(),
  /** Per disk: the copy (blockdev-mirror with pivot) the chain's bitmap was carried into, holding every write since the last point. */
  carried: z.record(z.string(), z.string()).optional(),
})
export type BackupChain = z.output<typeof BackupChain>

/** The per-VM manifest, `<vm dir>/backups.json`. */
export const Manifest = z.strictObject({ chains: z.array(BackupChain) })
export type Manifest = z.output<typeof Manifest>

/** What the journal holds for a backup in flight: enough to remove what it made or to mark the chain. */
export const BackupJournal = z.strictObject({
  chain: z.string(),
  point: z.string(),
  /** The target files and the QEMU nodes opened on them. */
  targets: z.array(z.strictObject({ disk: z.string(), file: z.string(), node: z.string(), jobId: z.string() })),
})
export type BackupJournal = z.output<typeof BackupJournal>

/** What the journal holds for a restore in flight: the file it writes. */
export const RestoreJournal = z.strictObject({ file: z.string() })
