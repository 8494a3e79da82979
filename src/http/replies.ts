// Response schemas of the routes and the error statuses each kind of route declares; no logic.
// Open shapes are loose objects: the serializer (zod encode) would drop a field a strict or plain
// object does not list, and a response must never lose what the API returns.
import { z } from 'zod'
import { Job as JobRecord } from '../jobs/model.ts'
import { Snapshot } from '../snapshot/model.ts'
import type { SnapshotView as SnapshotViewType } from '../snapshot/views.ts'
import { VmState } from '../vm/definition.ts'
import type { VmView as VmViewType } from '../vm/manager.ts'
import { ErrorBody } from './schemas.ts'

/** A job, as one component of the document. */
export const Job = JobRecord.meta({ id: 'Job' })

/** One disk of a VM view, with its backing chain as QEMU reports it. */
const DiskView = z.looseObject({
  id: z.string(),
  node: z.string().optional(),
  file: z.string(),
  format: z.string(),
  chain: z.array(z.looseObject({})).describe('layers from the active image down'),
  chainError: z.string().optional(),
})

/** GET /v1/vms/{vm}: a VM, its definition, disks and run state. */
export const VmView = z
  .looseObject({
    name: z.string(),
    state: z.union([VmState, z.literal('quarantined')]),
    reason: z.string().optional(),
    pid: z.number().int().optional(),
    adopted: z.boolean(),
    definition: z.looseObject({ name: z.string() }).describe('the definition as stored (POST /v1/vms body, defaults filled in)'),
    disks: z.array(DiskView),
    exit: z.looseObject({}).optional(),
    repair: z.looseObject({}).optional().describe('set when reconcile could not resolve a disagreement (needs-repair)'),
    createdAt: z.string(),
    updatedAt: z.string(),
  })
  // The service's own type: the schema says what a client may rely on, loosely (see the header).
  .meta({ id: 'Vm' }) as unknown as z.ZodType<VmViewType>

/** GET /v1/vms: a page of VMs. */
export const VmPage = z.object({ vms: z.array(VmView), next: z.string().optional().describe('pass as ?after= for the next page') })

/** A snapshot with its place in the tree and its size. */
export const SnapshotView = z
  .looseObject({
    ...Snapshot.shape,
    children: z.array(z.string()),
    current: z.boolean(),
    sizeBytes: z.number(),
  })
  .meta({ id: 'Snapshot' }) as unknown as z.ZodType<SnapshotViewType>

/** GET /v1/vms/{vm}/snapshots. */
export const SnapshotList = z.object({ snapshots: z.array(SnapshotView) })

/** GET /healthz. */
export const Health = z.object({ status: z.literal('ok'), version: z.string() })

/** POST /v1/vms/{vm}/qmp: QEMU's `return` value, as QEMU sent it. */
export const QmpReply = z.object({ return: z.unknown() })

/** Error statuses as response-schema entries: {404: ErrorBody, ...}. */
export function errors(...statuses: number[]): Record<number, typeof ErrorBody> {
  return Object.fromEntries(statuses.map((s) => [s, ErrorBody]))
}

/** Statuses the host side of an operation can answer: QEMU/qemu-img failures, no QEMU, timeouts, a full disk. */
export const HOST_ERRORS = [502, 503, 504, 507]

/**
 * What an operation that creates a job answers: 202 + Location (the job), 200 with ?wait=true (the
 * finished job), and any error: at submit, or the failed job's own with ?wait=true ({error, job}).
 */
export function jobReplies(): Record<number, typeof Job | typeof ErrorBody> {
  return { 200: Job, 202: Job, ...errors(404, 409, 422, ...HOST_ERRORS) }
}
