// Builds the fastify app: auth, validation, routes, OpenAPI; never builds a QMP message or touches
// the store.
import { timingSafeEqual } from 'node:crypto'
import fastifySwagger from '@fastify/swagger'
import fastifySwaggerUi from '@fastify/swagger-ui'
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify'
import { jsonSchemaTransform, serializerCompiler, validatorCompiler, type ZodTypeProvider } from 'fastify-type-provider-zod'
import type { Logger } from 'pino'
import type { EventBus } from '../events/bus.ts'
import type { JobManager } from '../jobs/manager.ts'
import type { VmManager } from '../vm/manager.ts'
import type { SnapshotService } from '../snapshot/service.ts'
import { snapshotRoutes } from './routes/snapshots.ts'
import { chainRoutes } from './routes/chain.ts'
import { eventRoutes } from './routes/events.ts'
import type { BlockJobService } from '../chain/service.ts'
import type { StateService } from '../state/service.ts'
import type { VmChecker } from '../ops/check.ts'
import type { Reconciler } from '../ops/reconcile.ts'
import { errorBody, installErrorHandler } from './error-handler.ts'
import { nextTurn } from '../util.ts'
import { jobRoutes } from './routes/jobs.ts'
import { vmRoutes } from './routes/vms.ts'

/** What the routes call: the services below the HTTP layer. */
export interface Services {
  vms: VmManager
  jobs: JobManager
  bus: EventBus
  snapshots: SnapshotService
  blockJobs: BlockJobService
  state: StateService
  checker: VmChecker
  reconciler: Reconciler
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
}

/** Paths served without a token: liveness and the API's own documentation (no VM data). */
const PUBLIC_PREFIXES = ['/healthz', '/docs', '/openapi.json']

/** Builds the fastify app (routes, validation, OpenAPI, auth). Never listens: see server.ts. */
export async function buildApp(opts: AppOptions): Promise<FastifyInstance> {
  const app = Fastify({
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-type-assertion -- tsc needs it: pino's Logger is not fastify's logger type
    loggerInstance: opts.logger.child({ component: 'http' }) as FastifyBaseLogger,
    bodyLimit: 1024 * 1024,
  }).withTypeProvider<ZodTypeProvider>()
  app.setValidatorCompiler(validatorCompiler)
  app.setSerializerCompiler(serializerCompiler)
  installErrorHandler(app)
  // `curl -X POST …/pause` sends no body at all; treat that as {} so optional bodies stay optional.
  app.addHook('preValidation', async (req) => {
    if (req.body === undefined || req.body === null) req.body = {}
    // Validation and the handler run in a loop iteration of their own: a burst of requests
    // does not hold the event loop for all of them at once (util.ts nextTurn).
    await nextTurn()
  })

  if (opts.token !== undefined) {
    const expected = Buffer.from(`Bearer ${opts.token}`)
    app.addHook('onRequest', async (req, reply) => {
      const path = req.url.split('?')[0] ?? ''
      if (PUBLIC_PREFIXES.some((p) => path === p || path.startsWith(p + '/'))) return
      const got = Buffer.from(req.headers.authorization ?? '')
      if (got.length !== expected.length || !timingSafeEqual(got, expected)) {
        reply.header('WWW-Authenticate', 'Bearer realm="qmpd"')
        return reply.code(401).send(errorBody('UNAUTHORIZED', 'missing or wrong bearer token (see <state-dir>/token or QMPD_TOKEN)'))
      }
    })
  }

  await app.register(fastifySwagger, {
    openapi: {
      info: { title: 'qmpd', description: 'Snapshots, checkpoints and saved state of QEMU VMs, over QMP', version: opts.version },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
      security: [{ bearer: [] }],
    },
    transform: jsonSchemaTransform,
  })
  await app.register(fastifySwaggerUi, { routePrefix: '/docs' })

  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger())
  app.get('/healthz', { schema: { summary: 'Liveness', tags: ['daemon'] } }, async () => ({ status: 'ok', version: opts.version }))
  await app.register(vmRoutes, { services: opts.services })
  await app.register(jobRoutes, { services: opts.services })
  await app.register(snapshotRoutes, { services: opts.services })
  await app.register(chainRoutes, { services: opts.services })
  await app.register(eventRoutes, { services: opts.services, ...(opts.sseMaxPendingBytes ? { maxPendingBytes: opts.sseMaxPendingBytes } : {}) })
  await app.ready()
  return app
}
