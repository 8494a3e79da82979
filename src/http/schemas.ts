// zod schemas shared by the routes (params, queries, replies); no logic.
import { z } from 'zod'
import { Name } from '../vm/definition.ts'

/** Path parameter {vm}. */
export const VmParams = z.strictObject({ vm: Name })

/** Path parameter {id} of a job. */
export const JobParams = z.strictObject({ id: z.string().uuid() })

/** ?wait=true&timeoutSec=N on every operation that creates a job. */
export const WaitQuery = z.strictObject({
  wait: z.stringbool().default(false).describe('wait for the job to finish and answer with it'),
  timeoutSec: z.coerce.number().int().min(1).max(3600).default(300).describe('how long ?wait=true waits'),
})

/** The JSON error shape every route can answer with. */
export const ErrorBody = z.object({
  error: z.object({ code: z.string(), message: z.string(), details: z.record(z.string(), z.unknown()).optional() }),
})
