// Routes of push-mode backups (create, list, restore); they validate and call BackupService,
// nothing more.
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { BackupChain, CreateBackupBody, RestoreBackupBody } from '../../backup/model.ts'
import { Name } from '../../vm/definition.ts'
import type { Services } from '../app.ts'
import { replyWithJob } from '../job-reply.ts'
import { errors, jobReplies } from '../replies.ts'
import { VmParams, WaitQuery } from '../schemas.ts'

const BackupParams = z.strictObject({ vm: Name, id: z.string().regex(/^b[0-9a-f]{8}$/, 'a backup id such as b1a2b3c4d') })

/** A chain with what QEMU holds of its bitmaps and the size of its files. */
const ChainView = z.object({
  ...BackupChain.shape,
  bitmaps: z
    .array(z.object({ disk: z.string(), state: z.enum(['active', 'inconsistent', 'missing']), dirtyBytes: z.number().int().optional() }))
    .nullable()
    .describe('per disk, the bitmap on its active layer now; null when the VM\'s QEMU is not running'),
  sizeBytes: z.number().int().describe('the chain\'s files on the host'),
})

/** /v1/vms/{vm}/backups: push-mode backup chains with persistent dirty bitmaps. */
export const backupRoutes: FastifyPluginAsyncZod<{ services: Services }> = async (app, { services }) => {
  const { backups, jobs } = services

  app.post(
    '/v1/vms/:vm/backups',
    {
      schema: {
        summary: 'Back up a running VM\'s disks (full or incremental, all from one instant) into a qcow2 chain (a job; its result is the point)',
        tags: ['backups'],
        operationId: 'createBackup',
        params: VmParams,
        querystring: WaitQuery,
        body: CreateBackupBody,
        response: jobReplies(),
      },
    },
    async (req, reply) => replyWithJob(reply, jobs, backups.create(req.params.vm, req.body), req.query),
  )

  app.get(
    '/v1/vms/:vm/backups',
    { schema: { summary: 'The VM\'s backup chains: points, sizes, bitmap state', tags: ['backups'], operationId: 'listBackups', params: VmParams, response: { 200: z.object({ chains: z.array(ChainView) }), ...errors(409, 502) } } },
    async (req) => ({ chains: await backups.list(req.params.vm) }),
  )

  app.post(
    '/v1/vms/:vm/backups/:id/restore',
    {
      schema: {
        summary: 'Restore one disk of a backup point into a new standalone qcow2 file (a job)',
        tags: ['backups'],
        operationId: 'restoreBackup',
        params: BackupParams,
        querystring: WaitQuery,
        body: RestoreBackupBody,
        response: jobReplies(),
      },
    },
    async (req, reply) => replyWithJob(reply, jobs, backups.restore(req.params.vm, req.params.id, req.body), req.query),
  )
}
