// How a route answers with a job (202 + Location, or ?wait=true); no job logic.
import type { FastifyReply } from 'fastify'
import type { JobManager } from '../jobs/manager.ts'
import { isFinal, type Job } from '../jobs/model.ts'
import { errorBody, statusFor } from './error-handler.ts'

/**
 * Answers for an operation that created a job: 202 + Location at once, or with ?wait=true the
 * finished job (200, or the job's error status with {error, job}). A wait that runs out answers 202
 * with the job as it is: it keeps running.
 */
export async function replyWithJob(
  reply: FastifyReply,
  jobs: JobManager,
  job: Job,
  query: { wait: boolean; timeoutSec: number },
): Promise<FastifyReply> {
  reply.header('Location', `/v1/jobs/${job.id}`)
  if (!query.wait) return reply.code(202).send(job)
  const done = await jobs.wait(job.id, query.timeoutSec * 1000)
  if (!isFinal(done.state)) return reply.code(202).send(done)
  if (done.state === 'succeeded') return reply.code(200).send(done)
  const err = done.error ?? { code: 'INTERNAL', message: `job ${done.state}` }
  return reply.code(statusFor(err.code)).send({ ...errorBody(err.code, err.message, err.details), job: done })
}
