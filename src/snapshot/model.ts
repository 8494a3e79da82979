// Request bodies of the snapshot routes (zod); no behaviour.
import { z } from 'zod'
import { Name, PathString } from '../vm/definition.ts'
import { Duration } from '../sched/model.ts'

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
  expiresIn: Duration.optional().describe('delete the snapshot this long after it is taken (e.g. 7d); not with expiresAt'),
  expiresAt: z.iso.datetime({ offset: true }).optional().describe('delete the snapshot at this instant (in the future); not with expiresIn'),
})
export type CreateSnapshotBody = z.output<typeof CreateSnapshotBody>

/** A creation as the services submit it: the HTTP body, or the scheduler's, which also names its schedule. */
export type CreateSnapshotInput = CreateSnapshotBody & { schedule?: string }

/** Body of POST …/snapshots/{snap}/revert. */
export const RevertBody = z.strictObject({
  state: z.enum(['running', 'paused', 'shutoff']).optional().describe('default: running when the snapshot has memory, else shutoff'),
})
export type RevertBody = z.output<typeof RevertBody>
