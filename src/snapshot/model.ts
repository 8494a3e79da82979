// Request bodies of the snapshot routes (zod); no behaviour.
import { z } from 'zod'
import { Name, PathString } from '../vm/definition.ts'

// The stored record lives with the store (which must not import upward); re-exported for callers.
export { Snapshot, SnapshotDisk } from '../store/snapshot-record.ts'

/** Body of POST /v1/vms/{vm}/snapshots. */
export const CreateSnapshotBody = z.strictObject({
  name: Name,
  description: z.string().max(4096).optional(),
  kind: z.enum(['internal', 'external']).default('internal'),
  memory: z.boolean().optional().describe('capture RAM and device state too (default: true when the VM runs)'),
  live: z
    .boolean()
    .optional()
    .describe('external memory only: resume the guest at once and write RAM in the background (background-snapshot)'),
  disks: z
    .record(
      z.string(),
      z.strictObject({
        exclude: z.literal(true).optional(),
        file: PathString.optional().describe('external: where the new overlay goes (must not exist)'),
      }),
    )
    .optional(),
  quiesce: z.boolean().optional().describe('freeze guest filesystems through the guest agent around the disk snapshot'),
  vmstateFile: PathString.optional().describe('external memory: where the RAM state file goes (must not exist)'),
})
export type CreateSnapshotBody = z.output<typeof CreateSnapshotBody>

/** Body of POST …/snapshots/{snap}/revert. */
export const RevertBody = z.strictObject({
  state: z.enum(['running', 'paused', 'shutoff']).optional().describe('default: running when the snapshot has memory, else shutoff'),
})
export type RevertBody = z.output<typeof RevertBody>
