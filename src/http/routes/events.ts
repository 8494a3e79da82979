// The SSE stream GET /v1/events; a slow client is dropped, never waited for.
import type { FastifyReply } from 'fastify'
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod'
import { z } from 'zod'
import type { BusEvent } from '../../events/bus.ts'
import { EventReplay } from '../../events/replay.ts'
import { Name } from '../../vm/definition.ts'
import type { Services } from '../app.ts'

/** How much may wait unsent for one client before it is dropped: a slow reader never slows the daemon. */
export const SSE_MAX_PENDING_BYTES = 1024 * 1024
const HEARTBEAT_MS = 15_000
/** A dropped client that does not read its last event within this long loses it with its socket. */
const DROP_GRACE_MS = 2_000

/** GET /v1/events: Server-Sent Events of job, VM and QEMU events (curl -N). */
export const eventRoutes: FastifyPluginAsyncZod<{ services: Services; maxPendingBytes?: number }> = async (app, { services, maxPendingBytes }) => {
  const limit = maxPendingBytes ?? SSE_MAX_PENDING_BYTES
  // Open streams never end by themselves: end them when the server closes, or close would wait forever.
  const open = new Set<() => void>()
  const replay = new EventReplay(services.bus)
  app.addHook('preClose', async () => {
    for (const end of open) end()
  })
  app.addHook('onClose', async () => replay.close())
  app.get(
    '/v1/events',
    {
      schema: {
        summary: 'Live event stream (text/event-stream): job state and progress, VM state, QEMU events, schedule firings and expiries',
        tags: ['events'],
        operationId: 'streamEvents',
        response: { 200: { description: 'Server-Sent Events: `event:` job, vm, qmp or schedule (then dropped or shutdown when the stream ends), `data:` the event as JSON', content: { 'text/event-stream': { schema: z.string() } } } },
        querystring: z.strictObject({
          vm: Name.optional(),
          types: z
            .string()
            .regex(/^(job|vm|qmp|schedule)(,(job|vm|qmp|schedule))*$/, 'a comma-separated list of job, vm, qmp, schedule')
            .optional(),
          job: z.string().min(1).max(64).optional().describe('only the events of this job (type job)'),
        }),
        headers: z.object({ 'last-event-id': z.string().regex(/^\d{1,15}$/, 'the id of the last event received').optional() }),
      },
    },
    (req, reply) => {
      // HEAD (fastify serves it for every GET): the stream's headers, no stream.
      if (req.method === 'HEAD') return void (reply as FastifyReply).code(200).header('content-type', 'text/event-stream').header('cache-control', 'no-cache').send()
      const types = new Set((req.query.types ?? 'job,vm,qmp,schedule').split(','))
      const vm = req.query.vm
      const job = req.query.job
      const lastId = req.headers['last-event-id'] !== undefined ? Number(req.headers['last-event-id']) : undefined
      reply.hijack()
      const res = reply.raw
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive', 'x-accel-buffering': 'no' })
      res.write(`: qmpd event stream\n\n`)
      let closed = false
      const close = (): void => {
        if (closed) return
        closed = true
        open.delete(shutdown)
        unsubscribe()
        clearInterval(heartbeat)
      }
      // Ending a response does not free a socket whose client reads nothing (its last bytes never
      // drain) nor one kept alive for a next request: once the last event is handed to the kernel,
      // or after DROP_GRACE_MS, the socket is destroyed.
      const finish = (last: string): void => {
        const socket = res.socket
        const destroy = (): void => {
          clearTimeout(grace)
          socket?.destroy()
        }
        const grace = setTimeout(destroy, DROP_GRACE_MS)
        grace.unref()
        res.end(last, destroy)
      }
      const wanted = (ev: BusEvent): boolean => types.has(ev.type) && (!vm || ev.vm === vm) && (!job || (ev.type === 'job' && ev.job.id === job))
      const send = ({ id, ev }: { id: number; ev: BusEvent }): void => {
        if (closed || !wanted(ev)) return
        if (res.writableLength > limit) {
          req.log.warn('SSE client dropped: too slow')
          close()
          finish(`event: dropped\ndata: ${JSON.stringify({ reason: `client too slow: over ${limit} bytes unread` })}\n\n`)
          return
        }
        res.write(`id: ${id}\nevent: ${ev.type}\ndata: ${JSON.stringify(ev)}\n\n`)
      }
      const shutdown = (): void => {
        if (closed) return
        close()
        finish(`event: shutdown\ndata: ${JSON.stringify({ reason: 'qmpd is shutting down' })}\n\n`)
      }
      open.add(shutdown)
      // Last-Event-ID: what the client missed, still kept, goes first; a `gap` event says some of it
      // is gone (the client re-reads the state it follows, GET /v1/jobs/{id}).
      if (lastId !== undefined) {
        const { events, complete } = replay.since(lastId)
        if (!complete) res.write(`event: gap\ndata: ${JSON.stringify({ reason: 'events after the Last-Event-ID are no longer kept' })}\n\n`)
        for (const e of events) send(e)
      }
      const unsubscribe = replay.subscribe(send)
      const heartbeat = setInterval(() => res.write(': keep-alive\n\n'), HEARTBEAT_MS)
      heartbeat.unref()
      // A client that goes away: the stream ends and its socket with it.
      const gone = (): void => {
        close()
        res.socket?.destroy()
      }
      req.raw.on('close', close)
      res.on('close', gone)
      res.on('error', gone)
    },
  )
}
