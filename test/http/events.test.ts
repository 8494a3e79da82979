// The SSE stream never lets a slow reader hold up the daemon: it is dropped with a final event.
import { request } from 'node:http'
import t from 'tap'
import { pino } from 'pino'
import { makeConfig } from '../../src/config.ts'
import { startDaemon } from '../../src/daemon.ts'

t.test('a client that stops reading is dropped with a final "dropped" event; others are unaffected', async (t) => {
  const daemon = await startDaemon(makeConfig({ stateDir: t.testdir() }, {}), pino({ level: 'silent' }))
  const app = await daemon.app({ sseMaxPendingBytes: 64 * 1024 })
  t.teardown(async () => {
    await app.close()
    await daemon.close()
  })
  const address = await app.listen({ host: '127.0.0.1', port: 0 })
  const port = Number(new URL(address).port)
  const req = request({ host: '127.0.0.1', port, path: '/v1/events' })
  req.end()
  const res = await new Promise<import('node:http').IncomingMessage>((r) => req.once('response', r))
  res.pause() // a reader that has stopped reading
  const payload = 'x'.repeat(400)
  const t0 = performance.now()
  for (let i = 0; i < 40_000; i++) daemon.bus.emit({ type: 'qmp', vm: 'flood', event: 'TEST', data: { i, payload } })
  const emitMs = performance.now() - t0
  t.ok(emitMs < 5000, `emitting 40k events took ${emitMs.toFixed(0)} ms: the slow client did not block it`)
  const health = await app.inject({ method: 'GET', url: '/healthz' })
  t.equal(health.statusCode, 200, 'the daemon still answers')
  let body = ''
  res.setEncoding('utf8')
  res.on('data', (d: string) => (body += d))
  res.resume()
  await new Promise((r) => res.once('end', r))
  const blocks = body.trim().split('\n\n')
  const last = blocks.at(-1)!
  t.match(last, /^event: dropped\ndata: .*client too slow/, 'the final event says why')
  t.ok(blocks.length < 40_000, `only ${blocks.length} of 40000 events were queued for it`)
})

t.test('closing the server ends open event streams instead of waiting for them', async (t) => {
  const daemon = await startDaemon(makeConfig({ stateDir: t.testdir() }, {}), pino({ level: 'silent' }))
  const app = await daemon.app()
  const address = await app.listen({ host: '127.0.0.1', port: 0 })
  const req = request({ host: '127.0.0.1', port: Number(new URL(address).port), path: '/v1/events' })
  req.end()
  const res = await new Promise<import('node:http').IncomingMessage>((r) => req.once('response', r))
  let body = ''
  res.setEncoding('utf8')
  res.on('data', (d: string) => (body += d))
  const ended = new Promise((r) => res.once('end', r))
  const t0 = Date.now()
  await app.close()
  await daemon.close()
  await ended
  t.ok(Date.now() - t0 < 3000, 'closed promptly')
  t.match(body, /event: shutdown/, 'the client is told why')
})
