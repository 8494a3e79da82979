// Routes of snapshots (create, list, revert, delete); they validate and call SnapshotService,
// nothing more.
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { CreateSnapshotBody, RevertBody } from '../../snapshot/model.ts'
import { Name } from '../../vm/definition.ts'
import type { Services } from '../app.ts'
import { replyWithJob } from '../job-reply.ts'
import { VmParams, WaitQuery } from '../schemas.ts'

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
        params: VmParams,
        querystring: WaitQuery,
        body: CreateSnapshotBody,
      },
    },
    async (req, reply) => replyWithJob(reply, jobs, snapshots.create(req.params.vm, req.body), req.query),
  )

  app.get('/v1/vms/:vm/snapshots', { schema: { summary: 'All snapshots of a VM with their tree and the current one', tags: ['snapshots'], params: VmParams } }, async (req) => ({
    snapshots: await snapshots.list(req.params.vm),
  }))

  app.get('/v1/vms/:vm/snapshots/:snap', { schema: { summary: 'One snapshot', tags: ['snapshots'], params: SnapParams } }, async (req) =>
    snapshots.get(req.params.vm, req.params.snap),
  )

  app.post(
    '/v1/vms/:vm/snapshots/:snap/revert',
    {
      schema: {
        summary: 'Revert the VM to a snapshot (any kind, any branch; a job)',
        tags: ['snapshots'],
        params: SnapParams,
        querystring: WaitQuery,
        body: RevertBody,
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
        params: SnapParams,
        querystring: WaitQuery.extend({
          children: z.stringbool().default(false).describe('delete the whole subtree'),
          metadataOnly: z.stringbool().default(false).describe('forget the snapshot, touch no file'),
        }),
      },
    },
    async (req, reply) =>
      replyWithJob(reply, jobs, snapshots.delete(req.params.vm, req.params.snap, { children: req.query.children, metadataOnly: req.query.metadataOnly }), req.query),
  )
}
