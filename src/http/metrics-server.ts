// The optional metrics-only listener (--metrics-listen): GET /metrics without a token; nothing else.
import { chmodSync, rmSync } from 'node:fs'
import Fastify, { type FastifyInstance } from 'fastify'
import type { Metrics } from '../events/metrics.ts'
import { QmpdError } from '../errors.ts'
import { claimUnixPath, parseListen } from './server.ts'

declare module 'fastify' {
  interface FastifyInstance {
    /** The app's metrics registry (set by buildApp). */
    metrics?: Metrics
  }
}

/**
 * Listens on `spec` (host:port or unix:/path) with one route, GET /metrics, answered from the
 * API app's registry without a token: give it a localhost or private address only.
 * @throws QmpdError INVALID_INPUT for a bad address, a unix path that is not a stale socket, or when the app has no metrics; BUSY when something listens on the unix path.
 */
export async function listenMetrics(app: FastifyInstance, spec: string): Promise<{ server: FastifyInstance; address: string }> {
  const target = parseListen(spec)
  const metrics = app.metrics
  if (!metrics) throw new QmpdError('INVALID_INPUT', 'the app has no metrics registry')
  const server = Fastify({ logger: false })
  server.get('/metrics', async (_req, reply) => {
    const { text, contentType } = await metrics.scrape()
    return reply.type(contentType).send(text)
  })
  if (target.kind === 'tcp') return { server, address: await server.listen({ host: target.host, port: target.port }) }
  // As the API's socket: only nothing or a stale socket is replaced; mode 0660.
  await claimUnixPath(target.path)
  rmSync(target.path, { force: true })
  await server.listen({ path: target.path })
  chmodSync(target.path, 0o660)
  return { server, address: `unix:${target.path}` }
}
