// Routes of the job history and job controls; they validate and call JobManager, nothing more.
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { QmpdError } from '../../errors.ts'
import { Name } from '../../vm/definition.ts'
import type { Services } from '../app.ts'
import { errors, Job } from '../replies.ts'
import { JobParams } from '../schemas.ts'

/** /v1/jobs: history, one job, cancel. */
export const jobRoutes: FastifyPluginAsyncZod<{ services: Services }> = async (app, { services }) => {
  const { jobs } = services

  app.get(
    '/v1/jobs',
    {
      schema: {
        summary: 'Jobs, newest first',
        tags: ['jobs'],
        operationId: 'listJobs',
        querystring: z.strictObject({ vm: Name.optional(), limit: z.coerce.number().int().min(1).max(1000).default(100) }),
        response: { 200: z.object({ jobs: z.array(Job) }) },
      },
    },
    async (req) => ({ jobs: jobs.list({ ...(req.query.vm ? { vm: req.query.vm } : {}), limit: req.query.limit }) }),
  )

  app.get('/v1/jobs/:id', { schema: { summary: 'One job, with live progress', tags: ['jobs'], operationId: 'getJob', params: JobParams, response: { 200: Job, ...errors(409) } } }, async (req) => {
    const job = jobs.get(req.params.id)
    if (!job) throw new QmpdError('JOB_NOT_FOUND', `no job ${req.params.id}`, { job: req.params.id })
    return job
  })

  app.post(
    '/v1/jobs/:id/cancel',
    {
      schema: {
        summary: 'Cancel a queued job, or a running block job (a copy cancelled once ready keeps its point-in-time copy)',
        tags: ['jobs'],
        operationId: 'cancelJob',
        params: JobParams,
        response: { 200: Job, ...errors(409, 502, 504) },
      },
    },
    async (req) => jobs.cancel(req.params.id),
  )
  for (const action of ['pause', 'resume', 'complete'] as const) {
    app.post(
      `/v1/jobs/:id/${action}`,
      {
        schema: {
          summary: { pause: 'Pause a running block job', resume: 'Resume a paused block job', complete: 'Complete a ready block job (pivot)' }[action],
          tags: ['jobs'],
          operationId: `${action}Job`,
          params: JobParams,
          response: { 200: Job, ...errors(409, 502, 504) },
        },
      },
      async (req) => jobs.control(req.params.id, action),
    )
  }
  app.patch(
    '/v1/jobs/:id',
    {
      schema: {
        summary: 'Change a running block job\'s speed limit',
        tags: ['jobs'],
        operationId: 'setJobSpeed',
        params: JobParams,
        body: z.strictObject({ speedBytesPerSec: z.number().int().min(0).describe('0 = unlimited') }),
        response: { 200: Job, ...errors(409, 502, 504) },
      },
    },
    async (req) => jobs.control(req.params.id, 'speed', req.body.speedBytesPerSec),
  )
}
