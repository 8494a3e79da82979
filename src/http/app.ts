// Builds the fastify app: auth, validation, routes, OpenAPI; never builds a QMP message or touches
// the store.
import { createHash, timingSafeEqual } from 'node:crypto'
import fastifySwagger from '@fastify/swagger'
import fastifySwaggerUi from '@fastify/swagger-ui'
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply } from 'fastify'
import { jsonSchemaTransform, serializerCompiler, validatorCompiler, type ZodTypeProvider } from 'fastify-type-provider-zod'
import type { Logger } from 'pino'
import { z } from 'zod'
import type { EventBus } from '../events/bus.ts'
import { Metrics } from '../events/metrics.ts'
import type { JobManager } from '../jobs/manager.ts'
import type { VmManager } from '../vm/manager.ts'
import type { SnapshotService } from '../snapshot/service.ts'
import type { ScheduleService } from '../sched/service.ts'
import { snapshotRoutes } from './routes/snapshots.ts'
import { chainRoutes } from './routes/chain.ts'
import { backupRoutes } from './routes/backups.ts'
import type { BackupService } from '../backup/service.ts'
import { eventRoutes } from './routes/events.ts'
import type { BlockJobService } from '../chain/service.ts'
import type { StateService } from '../state/service.ts'
import type { VmChecker } from '../ops/check.ts'
import type { Reconciler } from '../ops/reconcile.ts'
import { errorBody, installErrorHandler } from './error-handler.ts'
import { QmpdError } from '../errors.ts'
import { nextTurn } from '../util.ts'
import { jobRoutes } from './routes/jobs.ts'
import { DOCUMENT_TAGS, installDocumentRules, isOpenPath, transformDocument } from './openapi.ts'
import { Health } from './replies.ts'
import { DebugRequestLog } from './request-log.ts'
import { vmRoutes } from './routes/vms.ts'
import { schedulingRoutes } from './routes/scheduling.ts'
import { scheduleRoutes } from './routes/schedules.ts'
import { installIdempotency } from './idempotency.ts'
import type { IdempotencyRepo } from '../store/idempotency.ts'
import type { HostInfo } from '../vm/host-info.ts'
import type { ExportService } from '../export/service.ts'
import { exportRoutes } from './routes/exports.ts'

/** What the routes call: the services below the HTTP layer. */
export interface Services {
  vms: VmManager
  jobs: JobManager
  bus: EventBus
  snapshots: SnapshotService
  /** Snapshot schedules (src/sched/). */
  schedules: ScheduleService
  blockJobs: BlockJobService
  /** Push-mode backups (src/backup). */
  backups: BackupService
  state: StateService
  checker: VmChecker
  reconciler: Reconciler
  /** Idempotency-Key records (src/http/idempotency.ts). */
  idempotency: IdempotencyRepo
  /** Pull-mode NBD exports (src/export). */
  exports: ExportService
  /** GET /v1/host. */
  host: HostInfo
  /** The directory of a VM (PathPolicy.vmDir). */
  vmDir: (vm: string) => string
}

/** Options of the HTTP app. */
export interface AppOptions {
  services: Services
  logger: Logger
  /** When set, every /v1 request must carry "Authorization: Bearer <token>" (TCP listeners). */
  token?: string
  version: string
  /** SSE: bytes that may wait unsent for one client before it is dropped (default 1 MiB). */
  sseMaxPendingBytes?: number
  /** Connection caps and timeouts of the HTTP server (defaults: HTTP_LIMITS). */
  limits?: Partial<HttpLimits>
}

/** What a caller of Daemon.app() may set: everything but the services, logger and version. */
export type AppExtras = Omit<AppOptions, 'services' | 'logger' | 'version'>

/**
 * Bounds on what clients can hold: connections, idle keep-alive sockets, slow requests. Long
 * operations are not cut short: `?wait=true` may wait up to an hour with no byte on the socket, so
 * there is no inactivity timeout on a socket whose request is being answered.
 */
export interface HttpLimits {
  /** Open connections at most (SSE streams included); the kernel-accepted connection beyond is closed at once. */
  maxConnections: number
  /** A keep-alive socket with no request in flight is closed after this long (ms). */
  keepAliveTimeoutMs: number
  /** The request's headers must have arrived within this long after the connection or the previous request (ms). */
  headersTimeoutMs: number
  /** The whole request (headers and body) must have arrived within this long (ms). */
  requestTimeoutMs: number
  /** How often the server looks for requests over headersTimeoutMs / requestTimeoutMs (ms). */
  checkIntervalMs: number
  /** Requests served on one keep-alive connection before the server closes it. */
  maxRequestsPerSocket: number
}

/** The defaults of HttpLimits (docs/api.md "Limits"). */
export const HTTP_LIMITS: HttpLimits = {
  maxConnections: 256,
  keepAliveTimeoutMs: 5_000,
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 30_000,
  checkIntervalMs: 1_000,
  maxRequestsPerSocket: 1_000,
}

/** Routes whose query strings are strict even without a query schema of their own. */
const STRICT_QUERY = /^\/(v1\/|healthz$|openapi\.json$|metrics$|$)/

/** "Scheme credentials" of an Authorization header (RFC 7235). */
const AUTHORIZATION = /^([!#$%&'*+.^_`|~0-9A-Za-z-]+) +(\S+) *$/

/** Equal-length digests, so the comparison takes the same time whatever the token's length. */
function digest(s: string): Buffer {
  return createHash('sha256').update(s).digest()
}

/** Builds the fastify app (routes, validation, OpenAPI, auth). Never listens: see server.ts. */
export async function buildApp(opts: AppOptions): Promise<FastifyInstance> {
  const limits = { ...HTTP_LIMITS, ...opts.limits }
  const app = Fastify({
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-type-assertion -- tsc needs it: pino's Logger is not fastify's logger type
    loggerInstance: opts.logger.child({ component: 'http' }) as FastifyBaseLogger,
    bodyLimit: 1024 * 1024,
    logController: new DebugRequestLog(),
    keepAliveTimeout: limits.keepAliveTimeoutMs,
    requestTimeout: limits.requestTimeoutMs,
    maxRequestsPerSocket: limits.maxRequestsPerSocket,
    // No inactivity timeout on sockets: a ?wait=true request may be answered an hour later.
    connectionTimeout: 0,
    http: { headersTimeout: limits.headersTimeoutMs, requestTimeout: limits.requestTimeoutMs, connectionsCheckingInterval: limits.checkIntervalMs },
  }).withTypeProvider<ZodTypeProvider>()
  app.server.maxConnections = limits.maxConnections
  app.setValidatorCompiler(validatorCompiler)
  app.setSerializerCompiler(serializerCompiler)
  // Every /v1 route (and /healthz, /openapi.json) refuses query keys it does not document: a route
  // without a query schema gets an empty strict one.
  app.addHook('onRoute', (route) => {
    if (!STRICT_QUERY.test(route.url)) return
    route.schema ??= {}
    route.schema.querystring ??= z.strictObject({})
  })
  installErrorHandler(app)
  installDocumentRules(app)
  // An empty body sent as application/json is no body (read as {} below), as curl -H 'Content-Type:
  // application/json' -d '' sends it; anything else goes to fastify's own (poisoning-safe) parser.
  const json = app.getDefaultJsonParser('error', 'error')
  app.removeContentTypeParser('application/json')
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (req, body, done) => {
    if (body.toString().trim() === '') {
      done(null, undefined)
      return
    }
    void json(req, body.toString(), done)
  })
  // `curl -X POST …/pause` sends no body at all; treat that as {} so optional bodies stay optional.
  // A JSON `null` is a body, and never the object a route expects: refused.
  app.addHook('preValidation', async (req) => {
    if (req.body === null) throw new QmpdError('INVALID_INPUT', 'invalid body: null is not an object (send an object, or no body at all)', { issues: [{ path: '/', message: 'expected an object, got null' }] })
    if (req.body === undefined) req.body = {}
    // Validation and the handler run in a loop iteration of their own: a burst of requests
    // does not hold the event loop for all of them at once (util.ts nextTurn).
    await nextTurn()
  })

  if (opts.token !== undefined) {
    const expected = digest(opts.token)
    app.addHook('onRequest', async (req, reply) => {
      const path = req.url.split('?')[0] ?? ''
      if (isOpenPath(path)) return
      // RFC 7235: the scheme is case-insensitive ("bearer", "BEARER"); the token is compared as sent.
      const m = AUTHORIZATION.exec(req.headers.authorization ?? '')
      const ok = m !== null && m[1]!.toLowerCase() === 'bearer' && timingSafeEqual(digest(m[2]!), expected)
      if (!ok) {
        reply.header('WWW-Authenticate', 'Bearer realm="qmpd"')
        return reply.code(401).send(errorBody('UNAUTHORIZED', 'missing or wrong bearer token (see <state-dir>/token or QMPD_TOKEN)'))
      }
    })
  }

  await app.register(fastifySwagger, {
    openapi: {
      info: { title: 'qmpd', description: 'Snapshots, checkpoints and saved state of QEMU VMs, over QMP', version: opts.version, license: { name: 'MIT', url: 'https://opensource.org/license/mit' } },
      servers: [{ url: '/', description: 'this daemon (TCP --listen, default 127.0.0.1:7777; or its unix socket)' }],
      tags: DOCUMENT_TAGS,
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer', description: 'the token of <state-dir>/token or QMPD_TOKEN; not needed on the unix socket' } } },
      security: [{ bearer: [] }],
    },
    transform: jsonSchemaTransform,
    transformObject: transformDocument,
  })
  await app.register(fastifySwaggerUi, { routePrefix: '/docs' })

  app.get(
    '/openapi.json',
    { schema: { summary: 'This OpenAPI document', tags: ['daemon'], operationId: 'getOpenApi', response: { 200: z.looseObject({ openapi: z.string() }) } } },
    async () => app.swagger() as { openapi: string },
  )
  app.get('/healthz', { schema: { summary: 'Liveness', tags: ['daemon'], operationId: 'getHealth', response: { 200: Health } } }, async () => ({ status: 'ok' as const, version: opts.version }))
  app.get(
    '/',
    {
      schema: {
        summary: 'Where the API is described (no token needed)',
        tags: ['daemon'],
        operationId: 'getRoot',
        response: { 200: z.object({ name: z.literal('qmpd'), version: z.string(), docs: z.string(), openapi: z.string(), health: z.string() }) },
      },
    },
    async () => ({ name: 'qmpd' as const, version: opts.version, docs: '/docs', openapi: '/openapi.json', health: '/healthz' }),
  )
  // Prometheus metrics, behind the token like the rest of the API (docs/api.md "Metrics").
  const metrics = new Metrics(opts.services.bus, opts.services.vms)
  app.addHook('onClose', async () => metrics.close())
  app.decorate('metrics', metrics)
  app.get(
    '/metrics',
    {
      schema: {
        summary: 'Prometheus metrics (text exposition format): jobs, job durations, guest downtime, VMs by state, QMP latency, event-loop delay',
        tags: ['daemon'],
        operationId: 'getMetrics',
        response: { 200: { description: 'Prometheus text format 0.0.4', content: { 'text/plain': { schema: z.string() } } } },
      },
    },
    async (_req, reply) => {
      const { text, contentType } = await metrics.scrape()
      return (reply as FastifyReply).type(contentType).send(text)
    },
  )
  // Before the routes: it wraps the handler of every POST registered after it.
  installIdempotency(app, { repo: opts.services.idempotency, vms: opts.services.vms, jobs: opts.services.jobs })
  await app.register(vmRoutes, { services: opts.services })
  await app.register(schedulingRoutes, { services: opts.services })
  await app.register(jobRoutes, { services: opts.services })
  await app.register(snapshotRoutes, { services: opts.services })
  await app.register(scheduleRoutes, { services: opts.services })
  await app.register(chainRoutes, { services: opts.services })
  await app.register(exportRoutes, { services: opts.services })
  await app.register(backupRoutes, { services: opts.services })
  await app.register(eventRoutes, { services: opts.services, ...(opts.sseMaxPendingBytes ? { maxPendingBytes: opts.sseMaxPendingBytes } : {}) })
  await app.ready()
  return app
}
