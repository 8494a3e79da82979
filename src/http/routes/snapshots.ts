// Routes of snapshots (create, list, revert, delete, export); they validate and call SnapshotService,
// nothing more.
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { ExportBody } from '../../snapshot/export.ts'
import { CreateSnapshotBody, RevertBody } from '../../snapshot/model.ts'
import { Name } from '../../vm/definition.ts'
import type { Services } from '../app.ts'
import { replyWithJob } from '../job-reply.ts'
import { errors, jobReplies, SnapshotList, SnapshotView } from '../replies.ts'
import { BoolQuery, VmParams, WaitQuery } from '../schemas.ts'

const SnapParams = z.strictObject({ vm: Name, snap: Name })

/** /v1/vms/{vm}/snapshots: every snapshot kind, its tree, revert and delete. */
export const snapshotRoutes: FastifyPluginAsyncZod<{ services: Services }> = async (app, { services }) => {
  const { snapshots, jobs } = services

  app.post(
    '/v1/vms/:vm/snapshots',
    {
      schema: {
        summary: 'Take a snapshot: internal or external, disk-only or with memory (a job; its result is the snapshot)',
        tags: ['snapshots'],
        operationId: 'createSnapshot',
        params: VmParams,
        querystring: WaitQuery,
        body: CreateSnapshotBody,
        response: jobReplies(),
      },
    },
    async (req, reply) => {
      // A snapshot with memory (the default on a live VM) migrates the VM's state: ask QEMU first.
      if (req.body.memory !== false) await services.state.assertMigratable(req.params.vm, 'take a checkpoint of')
      return replyWithJob(reply, jobs, snapshots.create(req.params.vm, req.body), req.query)
    },
  )

  app.get('/v1/vms/:vm/snapshots', { schema: { summary: 'All snapshots of a VM with their tree and the current one', tags: ['snapshots'], operationId: 'listSnapshots', params: VmParams, response: { 200: SnapshotList, ...errors(409, 502) } } }, async (req) => ({
    snapshots: await snapshots.list(req.params.vm),
  }))

  app.get('/v1/vms/:vm/snapshots/:snap', { schema: { summary: 'One snapshot', tags: ['snapshots'], operationId: 'getSnapshot', params: SnapParams, response: { 200: SnapshotView, ...errors(409, 502) } } }, async (req) =>
    snapshots.get(req.params.vm, req.params.snap),
  )

  app.post(
    '/v1/vms/:vm/snapshots/:snap/revert',
    {
      schema: {
        summary: 'Revert the VM to a snapshot (any kind, any branch; a job)',
        tags: ['snapshots'],
        operationId: 'revertSnapshot',
        params: SnapParams,
        querystring: WaitQuery,
        body: RevertBody,
        response: jobReplies(),
      },
    },
    async (req, reply) => replyWithJob(reply, jobs, snapshots.revert(req.params.vm, req.params.snap, req.body), req.query),
  )

  app.delete(
    '/v1/vms/:vm/snapshots/:snap',
    {
      schema: {
        summary: 'Delete a snapshot; external images are merged out of every chain without changing what any state reads (a job)',
        tags: ['snapshots'],
        operationId: 'deleteSnapshot',
        params: SnapParams,
        response: jobReplies(),
        querystring: WaitQuery.extend({
          children: BoolQuery(false, 'also delete every descendant of the snapshot (its whole subtree); without it, a snapshot with children is deleted alone and its children move up to its parent'),
          metadataOnly: BoolQuery(false, 'forget the snapshot, touch no file'),
        }),
      },
    },
    async (req, reply) =>
      replyWithJob(reply, jobs, snapshots.delete(req.params.vm, req.params.snap, { children: req.query.children, metadataOnly: req.query.metadataOnly }), req.query),
  )

  app.post(
    '/v1/vms/:vm/snapshots/:snap/export',
    {
      schema: {
        summary: 'Export one disk of a snapshot as a new standalone image (qcow2 or raw, backing chain flattened; a job with progress; the VM may run)',
        tags: ['snapshots'],
        operationId: 'exportSnapshot',
        params: SnapParams,
        querystring: WaitQuery,
        body: ExportBody,
        response: jobReplies(),
      },
    },
    async (req, reply) => replyWithJob(reply, jobs, snapshots.export(req.params.vm, req.params.snap, req.body), req.query),
  )
}
