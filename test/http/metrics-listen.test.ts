// --metrics-listen: GET /metrics on its own listener without a token, while the API's needs one.
import { linkSync, lstatSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { request as httpRequest } from 'node:http'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import t from 'tap'
import { makeConfig } from '../../src/config.ts'
import { EventBus } from '../../src/events/bus.ts'
import { buildApp, type Services } from '../../src/http/app.ts'
import { listenMetrics } from '../../src/http/metrics-server.ts'

t.test('the metrics listener answers without a token; the API app only with one', async (t) => {
  const bus = new EventBus()
  const app = await buildApp({ services: { bus, vms: { list: async () => [{ state: 'running' }, { state: 'shutoff' }] } } as unknown as Services, logger: pino({ level: 'silent' }), version: 't', token: 'tok' })
  t.teardown(() => app.close())
  const { server, address } = await listenMetrics(app, '127.0.0.1:0')
  t.teardown(() => server.close())
  const res = await fetch(`${address}/metrics`)
  t.equal(res.status, 200, 'no token needed on the metrics listener')
  t.match(res.headers.get('content-type') ?? '', /^text\/plain/)
  const text = await res.text()
  t.match(text, /^qmpd_vms\{state="running"\} 1$/m, 'the VM gauge is read at scrape')
  t.match(text, /^nodejs_eventloop_lag_seconds /m)
  t.equal((await fetch(`${address}/v1/vms`)).status, 404, 'it serves nothing else')
  t.equal((await app.inject({ method: 'GET', url: '/metrics' })).statusCode, 401, 'the API app wants the token')
  t.equal((await app.inject({ method: 'GET', url: '/metrics', headers: { authorization: 'Bearer tok' } })).statusCode, 200, 'and serves it with one')
})

t.test('--metrics-listen and QMPD_METRICS_LISTEN set the address; a bad one is refused', async (t) => {
  t.equal(makeConfig({ stateDir: t.testdir() }, { QMPD_METRICS_LISTEN: '127.0.0.1:9100' }).metricsListen, '127.0.0.1:9100')
  t.equal(makeConfig({ stateDir: t.testdir(), metricsListen: '127.0.0.1:9101' }, {}).metricsListen, '127.0.0.1:9101')
  t.equal(makeConfig({ stateDir: t.testdir() }, {}).metricsListen, undefined, 'off by default')
  const app = await buildApp({ services: { bus: new EventBus(), vms: { list: async () => [] } } as unknown as Services, logger: pino({ level: 'silent' }), version: 't' })
  t.teardown(() => app.close())
  await t.rejects(listenMetrics(app, 'nonsense'), { code: 'INVALID_INPUT' })
})

t.test('a unix metrics socket: a stale one is replaced, a regular file is not, the socket is 0660', async (t) => {
  const app = await buildApp({ services: { bus: new EventBus(), vms: { list: async () => [] } } as unknown as Services, logger: pino({ level: 'silent' }), version: 't' })
  t.teardown(() => app.close())
  const dir = mkdtempSync(join(tmpdir(), 'qmpd-metrics-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const path = join(dir, 'm.sock')
  // A stale socket (as after a SIGKILL): bound on another name, linked to the path, then closed.
  const stale = createServer()
  await new Promise<void>((resolve) => stale.listen(`${path}.orig`, resolve))
  linkSync(`${path}.orig`, path)
  await new Promise((resolve) => stale.close(resolve))
  t.ok(lstatSync(path).isSocket(), 'a stale socket is left at the path')
  const { server, address } = await listenMetrics(app, `unix:${path}`)
  t.teardown(() => server.close())
  t.equal(address, `unix:${path}`)
  t.equal(lstatSync(path).mode & 0o777, 0o660)
  const body = await new Promise<string>((resolve, reject) => {
    const req = httpRequest({ socketPath: path, path: '/metrics' }, (res) => {
      let s = ''
      res.on('data', (c: Buffer) => (s += c.toString()))
      res.on('end', () => resolve(s))
    })
    req.on('error', reject)
    req.end()
  })
  t.match(body, /^nodejs_eventloop_lag_seconds /m, 'it answers on the socket')
  const file = join(dir, 'file')
  writeFileSync(file, 'x')
  await t.rejects(listenMetrics(app, `unix:${file}`), { code: 'INVALID_INPUT' }, 'a regular file is never replaced')
  t.equal(readFileSync(file, 'utf8'), 'x')
})
