// The job record and its states as stored and shown; no behaviour.
import { z } from 'zod'

/** Job states. queued, running, ready (a block job waiting for complete) and paused are live; the rest are final. */
export const JobState = z.enum(['queued', 'running', 'ready', 'paused', 'succeeded', 'failed', 'cancelled'])
export type JobState = z.output<typeof JobState>

/** True when a job in this state will not change any more. */
export function isFinal(state: JobState): boolean {
  return state === 'succeeded' || state === 'failed' || state === 'cancelled'
}

/** The error of a failed job, as stored and as served. */
export const JobError = z.strictObject({
  code: z.string(),
  message: z.string(),
  qmpClass: z.string().optional(),
  details: z.record(z.string(), z.unknown()).optional(),
})
export type JobError = z.output<typeof JobError>

/** Progress in units the operation chooses (bytes for block jobs and migration). */
export const JobProgress = z.strictObject({ current: z.number(), total: z.number() })
export type JobProgress = z.output<typeof JobProgress>

/** A job as stored and served by GET /v1/jobs/{id}. */
export const Job = z.strictObject({
  id: z.string(),
  vm: z.string(),
  op: z.string(),
  state: JobState,
  params: z.unknown(),
  progress: JobProgress.optional(),
  /** Bytes per second a block job is limited to (0: unlimited), when the job has a speed. */
  speedBytesPerSec: z.number().optional(),
  result: z.unknown().optional(),
  error: JobError.optional(),
  createdAt: z.string(),
  startedAt: z.string().optional(),
  finishedAt: z.string().optional(),
})
export type Job = z.output<typeof Job>
