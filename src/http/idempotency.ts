// Idempotency-Key on every POST of /v1: replays the VM or job a key created, refuses a key reused
// with another request, serializes requests with the same key; no route logic of its own.
import { createHash } from 'node:crypto'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import type { JobManager } from '../jobs/manager.ts'
import { type IdempotencyClaim, type IdempotencyRecord, type IdempotencyRepo, withClaim } from '../store/idempotency.ts'
import type { VmManager } from '../vm/manager.ts'
import { replyWithJob } from './job-reply.ts'

/** The header's value: 1-255 visible ASCII characters (a UUID, Nomad's task id…). */
const KEY = /^[\x21-\x7e]{1,255}$/

/** The request headers schema every POST of /v1 gets (documents the header in the OpenAPI document). */
const KeyHeaders = z.looseObject({
  'idempotency-key': z
    .string()
    .regex(KEY, 'must be 1-255 visible ASCII characters')
    .optional()
    .describe('the same key with the same request answers the VM or job the first request created (24 h); another request under it is 409'),
})

/** JSON with object keys sorted at every level, so equal bodies hash equal whatever their key order. */
export function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(',')}]`
  if (v !== null && typeof v === 'object') {
    const entries = Object.entries(v as Record<string, unknown>).filter(([, x]) => x !== undefined)
    return `{${entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)).map(([k, x]) => `${JSON.stringify(k)}:${canonicalJson(x)}`).join(',')}}`
  }
  return JSON.stringify(v) ?? 'null'
}

/** sha256 of the request as the key identifies it: path parameters and the validated body (defaults applied). */
function requestHash(req: FastifyRequest): string {
  return createHash('sha256').update(canonicalJson({ params: req.params ?? {}, body: req.body ?? {} })).digest('hex')
}

/** One lock per key in flight: a retry waits for the first request to store its answer. */
class KeyLocks {
  private readonly tails = new Map<string, Promise<void>>()

  /** Waits for the key's previous holder; returns the release function (safe to call twice). */
  async acquire(key: string): Promise<() => void> {
    const prev = this.tails.get(key) ?? Promise.resolve()
    let release!: () => void
    const mine = new Promise<void>((r) => (release = r))
    const tail = prev.then(() => mine)
    this.tails.set(key, tail)
    await prev
    let done = false
    return () => {
      if (done) return
      done = true
      release()
      if (this.tails.get(key) === tail) this.tails.delete(key)
    }
  }
}

/** What the wrapper needs: the keys and the services that show what a key created. */
export interface IdempotencyDeps {
  repo: IdempotencyRepo
  vms: VmManager
  jobs: JobManager
}

/**
 * Wraps the handler of every POST route of /v1 registered after this call. A request without the
 * header runs as before. With it: a stored key with the same route and request answers what the
 * first request created (201 + the VM, or the job as ?wait= asks, with Location and
 * `Idempotent-Replayed: true`); with another route or request it is 409 IDEMPOTENCY_KEY_REUSED;
 * an unknown key runs the handler, and the first VM or job row it writes stores the key in the
 * same transaction (src/store/idempotency.ts). A request that creates nothing stores no key.
 */
export function installIdempotency(app: FastifyInstance, deps: IdempotencyDeps): void {
  const locks = new KeyLocks()
  app.addHook('onRoute', (route) => {
    const methods = ([] as string[]).concat(route.method)
    if (!methods.includes('POST') || !route.url.startsWith('/v1/')) return
    // A route whose answer is neither the VM nor the job it creates (repair answers a check report)
    // opts out: a replay could only answer the job. Such routes are idempotent by themselves.
    if ((route.config as { idempotencyKey?: boolean } | undefined)?.idempotencyKey === false) return
    route.schema ??= {}
    route.schema.headers ??= KeyHeaders
    const routeName = `POST ${route.url}`
    const inner = route.handler
    const wrapped = async function (this: FastifyInstance, req: FastifyRequest, reply: FastifyReply): Promise<unknown> {
      const key = req.headers['idempotency-key']
      if (key === undefined) return inner.call(this, req, reply)
      // The headers schema checks this already, unless a route brought a headers schema of its own;
      // a header sent twice is an array and names no one request.
      if (typeof key !== 'string' || !KEY.test(key)) {
        throw new QmpdError('INVALID_INPUT', 'invalid headers: /idempotency-key must be one value of 1-255 visible ASCII characters', { issues: [{ path: '/idempotency-key', message: 'must be 1-255 visible ASCII characters, sent once' }] })
      }
      const bodyHash = requestHash(req)
      const release = await locks.acquire(key)
      try {
        const found = deps.repo.get(key)
        if (found) return await replay(deps, req, reply, found, routeName, bodyHash)
        const claim: IdempotencyClaim = { key, route: routeName, bodyHash, onAnswer: release }
        try {
          return await withClaim(claim, () => inner.call(this, req, reply))
        } catch (err) {
          // Another writer stored the key first (the SQLite unique constraint): answer what it made.
          const again = (err as { code?: unknown }).code === 'SQLITE_CONSTRAINT_PRIMARYKEY' ? deps.repo.get(key) : undefined
          if (again) return await replay(deps, req, reply, again, routeName, bodyHash)
          throw err
        }
      } finally {
        release()
      }
    }
    route.handler = wrapped
  })
}

/**
 * The answer of a stored key.
 * @throws QmpdError IDEMPOTENCY_KEY_REUSED when the key was used with another route or request;
 *   VM_NOT_FOUND when the VM it created was deleted since.
 */
async function replay(deps: IdempotencyDeps, req: FastifyRequest, reply: FastifyReply, rec: IdempotencyRecord, route: string, bodyHash: string): Promise<unknown> {
  if (rec.route !== route || rec.bodyHash !== bodyHash) {
    throw new QmpdError('IDEMPOTENCY_KEY_REUSED', `Idempotency-Key ${JSON.stringify(rec.key)} was used at ${rec.createdAt} with ${rec.route === route ? 'another request body' : rec.route}: use a new key for a new request`, {
      key: rec.key,
      route: rec.route,
      createdAt: rec.createdAt,
    })
  }
  reply.header('Idempotent-Replayed', 'true')
  if (rec.kind === 'vm') return reply.code(201).header('Location', `/v1/vms/${rec.id}`).send(await deps.vms.view(rec.id))
  const job = deps.jobs.get(rec.id)
  if (!job) throw new QmpdError('JOB_NOT_FOUND', `no job ${rec.id}`, { job: rec.id })
  const q = (req.query ?? {}) as { wait?: boolean; timeoutSec?: number }
  return replyWithJob(reply, deps.jobs, job, { wait: q.wait ?? false, timeoutSec: q.timeoutSec ?? 300 })
}
