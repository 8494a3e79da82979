// Routes of block jobs and saved state; they validate and call services, nothing more.
import type { FastifyReply } from 'fastify'
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { CommitBody, CopyBody, PullBody } from '../../chain/service.ts'
import { StateFileBody } from '../../state/service.ts'
import { Name } from '../../vm/definition.ts'
import type { Services } from '../app.ts'
import { replyWithJob } from '../job-reply.ts'
import { errors, jobReplies } from '../replies.ts'
import { VmParams, WaitQuery } from '../schemas.ts'

const DiskParams = z.strictObject({ vm: Name, disk: z.string().regex(/^[a-z][a-z0-9]{0,15}$/, 'a disk id such as vda') })

/** Backing-chain jobs (commit, pull, copy) and saved state (managedsave, save, restore). */
export const chainRoutes: FastifyPluginAsyncZod<{ services: Services }> = async (app, { services }) => {
  const { blockJobs, state, jobs } = services

  app.post(
    '/v1/vms/:vm/disks/:disk/commit',
    { schema: { summary: 'Commit layers of a disk\'s chain down into a lower one (block-commit; offline qemu-img commit)', tags: ['block jobs'], operationId: 'commitDisk', params: DiskParams, querystring: WaitQuery, body: CommitBody, response: jobReplies() } },
    async (req, reply) => replyWithJob(reply, jobs, await blockJobs.commit(req.params.vm, req.params.disk, req.body), req.query),
  )
  app.post(
    '/v1/vms/:vm/disks/:disk/pull',
    { schema: { summary: 'Pull backing data up into the active layer (block-stream; offline qemu-img rebase)', tags: ['block jobs'], operationId: 'pullDisk', params: DiskParams, querystring: WaitQuery, body: PullBody, response: jobReplies() } },
    async (req, reply) => replyWithJob(reply, jobs, await blockJobs.pull(req.params.vm, req.params.disk, req.body), req.query),
  )
  app.post(
    '/v1/vms/:vm/disks/:disk/copy',
    { schema: { summary: 'Copy a disk to a new file (blockdev-mirror; offline qemu-img convert), with or without pivot', tags: ['block jobs'], operationId: 'copyDisk', params: DiskParams, querystring: WaitQuery, body: CopyBody, response: jobReplies() } },
    async (req, reply) => replyWithJob(reply, jobs, blockJobs.copy(req.params.vm, req.params.disk, req.body), req.query),
  )

  app.post(
    '/v1/vms/:vm/managedsave',
    { schema: { summary: 'Save RAM and device state to the VM\'s managed-save file and stop it; the next start restores it', tags: ['saved state'], operationId: 'managedSave', params: VmParams, querystring: WaitQuery, body: z.strictObject({}), response: jobReplies() } },
    async (req, reply) => {
      await state.assertMigratable(req.params.vm, 'managed-save')
      return replyWithJob(reply, jobs, state.managedSave(req.params.vm), req.query)
    },
  )
  app.delete('/v1/vms/:vm/managedsave', { schema: { summary: 'Discard the managed save', tags: ['saved state'], operationId: 'discardManagedSave', params: VmParams, response: { 204: z.null().describe('discarded'), ...errors(409, 507) } } }, async (req, reply) => {
    state.discardManagedSave(req.params.vm)
    return (reply as FastifyReply).code(204).send()
  })
  app.post(
    '/v1/vms/:vm/save',
    { schema: { summary: 'Save RAM and device state to a file and stop the VM (virsh save)', tags: ['saved state'], operationId: 'saveVm', params: VmParams, querystring: WaitQuery, body: StateFileBody, response: jobReplies() } },
    async (req, reply) => {
      await state.assertMigratable(req.params.vm, 'save')
      return replyWithJob(reply, jobs, state.save(req.params.vm, req.body), req.query)
    },
  )
  app.post(
    '/v1/vms/:vm/restore',
    { schema: { summary: 'Start the VM from a saved state file (virsh restore)', tags: ['saved state'], operationId: 'restoreVm', params: VmParams, querystring: WaitQuery, body: StateFileBody, response: jobReplies() } },
    async (req, reply) => replyWithJob(reply, jobs, await state.restore(req.params.vm, req.body), req.query),
  )
}
