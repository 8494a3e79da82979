// Routes of pull-mode NBD exports (POST/GET/DELETE /v1/vms/{vm}/exports); they validate and call
// the export service, nothing more.
import type { FastifyReply } from 'fastify'
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { CreateExportBody, ExportView } from '../../export/model.ts'
import { Name } from '../../vm/definition.ts'
import type { Services } from '../app.ts'
import { errors, HOST_ERRORS } from '../replies.ts'
import { VmParams } from '../schemas.ts'

const ExportParams = z.strictObject({ vm: Name, id: z.string().regex(/^[0-9a-f]{8}$/, 'an export id (8 hex digits)') })

/** Pull-mode NBD exports of a point-in-time view of a running VM's disks. */
export const exportRoutes: FastifyPluginAsyncZod<{ services: Services }> = async (app, { services }) => {
  const { exports } = services
  app.post(
    '/v1/vms/:vm/exports',
    {
      schema: {
        summary: 'Export a point-in-time view of disks read-only over NBD (image fleecing), optionally with a frozen dirty bitmap',
        tags: ['exports'],
        operationId: 'createExport',
        params: VmParams,
        body: CreateExportBody,
        response: { 201: ExportView, ...errors(404, 409, ...HOST_ERRORS) },
      },
    },
    async (req, reply) => (reply as FastifyReply).code(201).send(await exports.create(req.params.vm, req.body)),
  )
  app.get(
    '/v1/vms/:vm/exports',
    { schema: { summary: 'The VM\'s open NBD exports', tags: ['exports'], operationId: 'listExports', params: VmParams, response: { 200: z.strictObject({ exports: z.array(ExportView) }), ...errors(404) } } },
    async (req) => ({ exports: exports.list(req.params.vm) }),
  )
  app.delete(
    '/v1/vms/:vm/exports/:id',
    {
      schema: {
        summary: 'End an export: drop its NBD clients, cancel the fleecing job, remove the scratch node and file',
        tags: ['exports'],
        operationId: 'deleteExport',
        params: ExportParams,
        response: { 204: z.null().describe('ended'), ...errors(404, 409, ...HOST_ERRORS) },
      },
    },
    async (req, reply) => {
      await exports.remove(req.params.vm, req.params.id)
      return (reply as FastifyReply).code(204).send()
    },
  )
}
