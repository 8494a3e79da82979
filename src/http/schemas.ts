// zod schemas shared by the routes (params, queries, error reply); no logic.
import { z } from 'zod'
import { Job } from '../jobs/model.ts'
import { Name } from '../vm/definition.ts'

/** Path parameter {vm}. */
export const VmParams = z.strictObject({ vm: Name })

/** Path parameter {id} of a job. */
export const JobParams = z.strictObject({ id: z.string().uuid() })

/**
 * A boolean query flag: the strings true/false, 1/0, yes/no, on/off as zod's stringbool reads
 * them. The document types it as a boolean (what a client sends, once serialized into the query).
 */
export function BoolQuery(dflt: boolean, description: string): z.ZodType<boolean, string | undefined> {
  return z.stringbool().meta({ type: 'boolean' }).default(dflt).meta({ type: 'boolean', default: dflt, description })
}

/** ?wait=true&timeoutSec=N on every operation that creates a job. */
export const WaitQuery = z.strictObject({
  wait: BoolQuery(false, 'wait for the job to finish and answer with it (200, or the job\'s error status with {error, job})'),
  timeoutSec: z.coerce.number().int().min(1).max(3600).default(300).describe('how long ?wait=true waits'),
})

/**
 * The JSON error shape every route can answer with (one component of the document, ErrorBody).
 * `job` comes only with ?wait=true on an operation whose job failed.
 */
export const ErrorBody = z
  .object({
    error: z.object({ code: z.string().describe('a stable code (src/errors.ts)'), message: z.string(), details: z.record(z.string(), z.unknown()).optional() }),
    job: Job.optional().describe('?wait=true: the job that failed'),
  })
  .meta({ id: 'ErrorBody' })
