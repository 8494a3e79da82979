// What a client can hold is bounded: connections beyond the cap are closed at once, sockets that
// never send a request and idle keep-alive sockets are closed after their timeouts, and a dropped
// SSE client's socket is destroyed (the server's connection count falls). No QEMU needed.
import { request, type IncomingMessage } from 'node:http'
import { connect, type Socket } from 'node:net'
import t, { type Test } from 'tap'
import { pino } from 'pino'
import { makeConfig } from '../../src/config.ts'
import { startDaemon } from '../../src/daemon.ts'
import type { AppExtras } from '../../src/http/app.ts'

async function serve(t: Test, extras: AppExtras = {}) {
  const daemon = await startDaemon(makeConfig({ stateDir: t.testdir() }, {}), pino({ level: 'silent' }))
  const app = await daemon.app(extras)
  const address = await app.listen({ host: '127.0.0.1', port: 0 })
  const sockets: Socket[] = []
  t.teardown(async () => {
    for (const s of sockets) s.destroy()
    await app.close()
    await daemon.close()
  })
  const port = Number(new URL(address).port)
  const connections = () => new Promise<number>((r, j) => app.server.getConnections((err, n) => (err ? j(err) : r(n))))
  /** A raw TCP connection; resolves once connected, records when the server closes it. */
  const raw = async () => {
    const s = connect(port, '127.0.0.1')
    sockets.push(s)
    const closed = { at: 0, data: '' }
    s.on('data', (d) => (closed.data += String(d)))
    s.on('close', () => (closed.at = performance.now()))
    s.on('error', () => {})
    await new Promise((r) => s.once('connect', r))
    return { s, closed }
  }
  return { daemon, app, port, connections, raw }
}

async function until(check: () => boolean | Promise<boolean>, ms: number): Promise<boolean> {
  const end = performance.now() + ms
  while (performance.now() < end) {
    if (await check()) return true
    await new Promise((r) => setTimeout(r, 20))
  }
  return check()
}

function get(port: number, path: string, agent = false): Promise<{ status: number; body: string; ms: number }> {
  const t0 = performance.now()
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, agent: agent ? undefined : false }, (res) => {
      let body = ''
      res.on('data', (d) => (body += d))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, ms: performance.now() - t0 }))
    })
    req.setTimeout(5000, () => req.destroy(new Error(`GET ${path}: no answer in 5 s`)))
    req.on('error', reject)
    req.end()
  })
}

t.test('connections over maxConnections are closed at once; idle ones time out; the server serves again', async (t) => {
  const { raw, port, connections } = await serve(t, { limits: { maxConnections: 4, headersTimeoutMs: 600, requestTimeoutMs: 1000, checkIntervalMs: 100 } })
  const idle = [await raw(), await raw(), await raw(), await raw()]
  t.ok(await until(async () => (await connections()) === 4, 2000), 'four idle connections are held')
  const t0 = performance.now()
  const extra = await raw()
  t.ok(await until(() => extra.closed.at > 0, 1000), 'the fifth connection is closed by the server')
  t.ok(extra.closed.at - t0 < 500, `closed after ${(extra.closed.at - t0).toFixed(0)} ms`)
  t.equal(extra.closed.data, '', 'without an answer')
  t.ok(idle.every((c) => c.closed.at === 0), 'the four held ones are still open at that moment')
  // Nothing was ever sent on them: the headers timeout (600 ms, checked every 100 ms) closes them.
  t.ok(await until(() => idle.every((c) => c.closed.at > 0), 3000), 'idle connections that send nothing are closed')
  const lived = Math.max(...idle.map((c) => c.closed.at)) - t0
  t.ok(lived < 2500, `the last idle connection was closed ${lived.toFixed(0)} ms after the cap was reached`)
  t.ok(await until(async () => (await connections()) === 0, 1000), 'the server holds no connection')
  const health = await get(port, '/healthz')
  t.equal(health.status, 200, 'and serves again')
})

t.test('a request whose headers never end is cut after the headers timeout (slowloris)', async (t) => {
  const { raw } = await serve(t, { limits: { headersTimeoutMs: 500, requestTimeoutMs: 1000, checkIntervalMs: 100 } })
  const c = await raw()
  const t0 = performance.now()
  c.s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n')
  const drip = setInterval(() => c.s.write('X-Drip: 1\r\n'), 100)
  t.teardown(() => clearInterval(drip))
  t.ok(await until(() => c.closed.at > 0, 3000), 'the dripping connection is closed')
  clearInterval(drip)
  t.ok(c.closed.at - t0 < 2000, `after ${(c.closed.at - t0).toFixed(0)} ms`)
  t.match(c.closed.data, /^HTTP\/1\.1 408/, 'with 408 Request Timeout')
})

t.test('an idle keep-alive socket is closed after keepAliveTimeout', async (t) => {
  const { raw } = await serve(t, { limits: { keepAliveTimeoutMs: 300 } })
  const c = await raw()
  c.s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n')
  t.ok(await until(() => /"status":"ok"/.test(c.closed.data), 2000), 'answered')
  const t0 = performance.now()
  t.ok(await until(() => c.closed.at > 0, 3000), 'then closed while idle')
  const ms = c.closed.at - t0
  t.ok(ms > 150 && ms < 2500, `closed ${ms.toFixed(0)} ms after the answer (keepAliveTimeout 300 ms)`)
})

t.test('an event stream outlives the request timeouts: only receiving the request is timed', async (t) => {
  const { daemon, port } = await serve(t, { limits: { headersTimeoutMs: 300, requestTimeoutMs: 500, checkIntervalMs: 100, keepAliveTimeoutMs: 300 } })
  const req = request({ host: '127.0.0.1', port, path: '/v1/events', agent: false })
  req.end()
  const res = await new Promise<IncomingMessage>((r) => req.once('response', r))
  t.teardown(() => req.destroy())
  let body = ''
  res.setEncoding('utf8')
  res.on('data', (d: string) => (body += d))
  await new Promise((r) => setTimeout(r, 1500))
  daemon.bus.emit({ type: 'qmp', vm: 'x', event: 'LATE', data: {} })
  t.ok(await until(() => body.includes('LATE'), 2000), 'an event 1.5 s later still arrives')
})

t.test('a slow SSE client is dropped and its socket destroyed: the server connection count falls', async (t) => {
  // Keep-alive at 60 s: only the destroy on drop can free the socket within the 3 s allowed below.
  const { daemon, port, connections } = await serve(t, { sseMaxPendingBytes: 64 * 1024, limits: { keepAliveTimeoutMs: 60_000 } })
  const req = request({ host: '127.0.0.1', port, path: '/v1/events', agent: false })
  req.end()
  const res = await new Promise<IncomingMessage>((r) => req.once('response', r))
  t.teardown(() => req.destroy())
  res.pause() // stops reading, for good
  t.equal(await connections(), 1, 'one connection: the stream')
  const payload = 'x'.repeat(400)
  for (let i = 0; i < 40_000; i++) daemon.bus.emit({ type: 'qmp', vm: 'flood', event: 'TEST', data: { i, payload } })
  const t0 = performance.now()
  t.ok(await until(async () => (await connections()) === 0, 3000), 'the server no longer holds the dropped client')
  t.ok(performance.now() - t0 < 3000, `released ${(performance.now() - t0).toFixed(0)} ms after the flood`)
  t.equal((await get(port, '/healthz')).status, 200, 'the daemon serves on')
})

t.test('a client that leaves an event stream: its socket is gone from the server', async (t) => {
  const { port, connections } = await serve(t)
  const req = request({ host: '127.0.0.1', port, path: '/v1/events', agent: false })
  req.end()
  const res = await new Promise<IncomingMessage>((r) => req.once('response', r))
  res.resume()
  t.equal(await connections(), 1)
  req.destroy()
  t.ok(await until(async () => (await connections()) === 0, 2000), 'connection count back to 0')
})
