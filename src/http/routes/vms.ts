// Routes of VMs (define, adopt, clone, lifecycle, check, repair, QMP escape hatch); they validate and call
// services, nothing more.
import type { FastifyReply } from 'fastify'
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { CheckReport } from '../../ops/check-model.ts'
import { CloneDefinition } from '../../snapshot/clone.ts'
import { FromBackupDefinition } from '../../backup/new-vm.ts'
import { AdoptDefinition, Name, VmDefinition } from '../../vm/definition.ts'
import { parseSelectors } from '../../vm/labels.ts'
import { jsonDepth, MAX_QMP_ARG_BYTES, MAX_QMP_ARG_DEPTH } from '../../vm/passthrough.ts'
import type { Services } from '../app.ts'
import { replyWithJob } from '../job-reply.ts'
import { errors, HOST_ERRORS, jobReplies, QmpReply, VmPage, VmView } from '../replies.ts'
import { BoolQuery, VmParams, WaitQuery } from '../schemas.ts'

const StartBody = z.strictObject({ paused: z.boolean().optional().describe('leave the guest paused after start') }).default({})
const StopBody = z
  .strictObject({
    force: z.boolean().optional().describe('skip the ACPI powerdown: quit QEMU at once'),
    timeoutSec: z.number().int().min(0).max(3600).optional().describe('how long the guest gets to power off (default 60)'),
  })
  .default({})
/** GET /v1/vms: VMs per page by default, and at most. */
const LIST_DEFAULT = 100
const LIST_MAX = 1000
const EmptyBody = z.strictObject({}).default({})
const QmpBody = z.strictObject({
  execute: z.string().regex(/^[A-Za-z][A-Za-z0-9_-]{0,63}$/, 'must be a QMP command name'),
  // Bounded here, before anything reaches QEMU: QEMU answers a request nested deeper than 1024
  // with errors that carry no id, and deep values overflow the stack of whoever recurses on them.
  arguments: z
    .record(z.string(), z.unknown())
    .superRefine((args, ctx) => {
      if (jsonDepth(args, MAX_QMP_ARG_DEPTH) > MAX_QMP_ARG_DEPTH) {
        ctx.addIssue({ code: 'custom', message: `must not be nested deeper than ${MAX_QMP_ARG_DEPTH} levels` })
      } else if (Buffer.byteLength(JSON.stringify(args)) > MAX_QMP_ARG_BYTES) {
        ctx.addIssue({ code: 'custom', message: `must not be larger than ${MAX_QMP_ARG_BYTES} bytes as JSON` })
      }
    })
    .optional(),
})

/** /v1/vms: define, adopt, list, inspect, delete, start/stop/pause/resume, and the QMP escape hatch. */
export const vmRoutes: FastifyPluginAsyncZod<{ services: Services }> = async (app, { services }) => {
  const { vms, jobs, checker, reconciler } = services

  app.post(
    '/v1/vms',
    {
      schema: {
        summary: 'Define a VM, adopt a running QEMU by its QMP socket, clone a VM from a snapshot (linked or full), or make one from a backup point',
        tags: ['vms'],
        operationId: 'defineVm',
        body: z.union([VmDefinition, AdoptDefinition, CloneDefinition, FromBackupDefinition]),
        response: { 201: VmView, ...errors(404, 409, 422, ...HOST_ERRORS) },
      },
    },
    async (req, reply) =>
      reply
        .code(201)
        .header('Location', `/v1/vms/${req.body.name}`)
        .send(await ('clone' in req.body ? services.snapshots.clone(req.body) : 'from' in req.body ? services.backups.fromBackup(req.body) : vms.define(req.body))),
  )

  app.get(
    '/v1/vms',
    {
      schema: {
        summary: 'List VMs by name, a page at a time (follow `next` with ?after=)',
        tags: ['vms'],
        operationId: 'listVms',
        response: { 200: VmPage },
        querystring: z.strictObject({
          limit: z.coerce.number().int().min(1).max(LIST_MAX).default(LIST_DEFAULT).describe(`VMs per page (1-${LIST_MAX}, default ${LIST_DEFAULT})`),
          after: Name.optional().describe('start after this name: the previous page\'s `next`'),
          label: z.union([z.string(), z.array(z.string())]).optional().describe('key=value (the label has that value) or key (the VM has it); repeat for AND'),
        }),
      },
    },
    async (req) =>
      vms.page({ limit: req.query.limit, ...(req.query.after !== undefined ? { after: req.query.after } : {}), labels: parseSelectors(req.query.label) }),
  )

  app.get('/v1/vms/:vm', { schema: { summary: 'One VM, with its disks\' backing chains as QEMU reports them', tags: ['vms'], operationId: 'getVm', params: VmParams, response: { 200: VmView, ...errors(409) } } }, async (req) =>
    vms.view(req.params.vm),
  )

  // RFC 7386 merge patches are JSON under their own media type: parsed (and limited) like JSON.
  app.addContentTypeParser('application/merge-patch+json', { parseAs: 'string' }, app.getDefaultJsonParser('error', 'error'))
  app.patch(
    '/v1/vms/:vm',
    {
      schema: {
        summary: 'Change a shut-off VM\'s definition with a JSON merge patch (RFC 7386), validated as POST /v1/vms validates',
        tags: ['vms'],
        operationId: 'patchVm',
        params: VmParams,
        body: z.record(z.string(), z.unknown()).describe('members to set; null removes a member; arrays (disks) are replaced whole'),
        response: { 200: VmView, ...errors(409, 422, 507) },
      },
    },
    // Spread: a plain object type meets the loose schema's index signature, the VmView interface does not.
    async (req) => ({ ...(await vms.patch(req.params.vm, req.body)) }),
  )

  app.get(
    '/v1/vms/:vm/check',
    {
      schema: {
        summary: 'Compare the store with QEMU and the files for one VM (read-only; problems say what repair would do)',
        tags: ['vms'],
        params: VmParams,
        operationId: 'checkVm',
        response: { 200: CheckReport, ...errors(409, ...HOST_ERRORS) },
      },
    },
    async (req) => checker.check(req.params.vm),
  )

  app.post(
    '/v1/vms/:vm/repair',
    {
      // Repair is idempotent by itself and answers a check report, not its job: no key replay.
      config: { idempotencyKey: false },
      schema: {
        summary: 'Reconcile the VM now (as at daemon start); clears needs-repair when the check then passes; answers the check',
        tags: ['vms'],
        params: VmParams,
        body: EmptyBody,
        operationId: 'repairVm',
        response: { 200: CheckReport, ...errors(409, ...HOST_ERRORS) },
      },
    },
    async (req) => reconciler.repair(req.params.vm),
  )

  app.delete(
    '/v1/vms/:vm',
    {
      schema: {
        summary: 'Delete a VM that is not running',
        tags: ['vms'],
        operationId: 'deleteVm',
        response: { 204: z.null().describe('deleted'), ...errors(409, 507) },
        params: VmParams,
        querystring: z.strictObject({ deleteStorage: BoolQuery(false, 'also remove the files qmpd created') }),
      },
    },
    async (req, reply) => {
      await vms.delete(req.params.vm, { deleteStorage: req.query.deleteStorage })
      return (reply as FastifyReply).code(204).send()
    },
  )

  app.post(
    '/v1/vms/:vm/start',
    { schema: { summary: 'Start the VM (a job)', tags: ['vms'], operationId: 'startVm', params: VmParams, querystring: WaitQuery, body: StartBody, response: jobReplies() } },
    async (req, reply) => replyWithJob(reply, jobs, vms.start(req.params.vm, req.body), req.query),
  )
  app.post(
    '/v1/vms/:vm/stop',
    { schema: { summary: 'Stop the VM: ACPI powerdown, then quit after timeoutSec; force quits at once (a job)', tags: ['vms'], operationId: 'stopVm', params: VmParams, querystring: WaitQuery, body: StopBody, response: jobReplies() } },
    async (req, reply) => replyWithJob(reply, jobs, vms.stop(req.params.vm, req.body), req.query),
  )
  app.post(
    '/v1/vms/:vm/pause',
    { schema: { summary: 'Pause the guest (a job)', tags: ['vms'], operationId: 'pauseVm', params: VmParams, querystring: WaitQuery, body: EmptyBody, response: jobReplies() } },
    async (req, reply) => replyWithJob(reply, jobs, vms.pause(req.params.vm), req.query),
  )
  app.post(
    '/v1/vms/:vm/resume',
    { schema: { summary: 'Resume a paused guest (a job)', tags: ['vms'], operationId: 'resumeVm', params: VmParams, querystring: WaitQuery, body: EmptyBody, response: jobReplies() } },
    async (req, reply) => replyWithJob(reply, jobs, vms.resume(req.params.vm), req.query),
  )

  app.post(
    '/v1/vms/:vm/qmp',
    {
      schema: {
        summary: 'Send a QMP command to the VM\'s QEMU (escape hatch: off unless --qmp-passthrough, then an allow-list; outside the job queue; logged)',
        tags: ['vms'],
        operationId: 'qmpCommand',
        params: VmParams,
        body: QmpBody,
        response: { 200: QmpReply, ...errors(403, 409, 422, 502, 504) },
      },
    },
    async (req) => ({ return: await vms.qmpPassthrough(req.params.vm, req.body.execute, req.body.arguments) }),
  )
}
