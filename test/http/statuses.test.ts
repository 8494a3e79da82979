// Statuses as docs/api.md states them: the auth scheme is case-insensitive, a JSON null body is
// refused, unknown query keys are refused on every route, a wrong method is 405 with Allow, HEAD
// is answered (the event stream too). No QEMU needed: nothing here starts a VM.
import { request } from 'node:http'
import t, { type Test } from 'tap'
import { pino } from 'pino'
import { makeConfig } from '../../src/config.ts'
import { startDaemon } from '../../src/daemon.ts'

const TOKEN = 'statuses-test-token'

async function setup(t: Test) {
  const daemon = await startDaemon(makeConfig({ stateDir: t.testdir() }, {}), pino({ level: 'silent' }))
  const app = await daemon.app({ token: TOKEN })
  t.teardown(async () => {
    await app.close()
    await daemon.close()
  })
  const inject = async (method: string, url: string, opts: { auth?: string | null; payload?: string } = {}) => {
    const auth = opts.auth === undefined ? `Bearer ${TOKEN}` : opts.auth
    const res = await app.inject({
      method: method as 'GET',
      url,
      headers: { ...(auth !== null ? { authorization: auth } : {}), ...(opts.payload !== undefined ? { 'content-type': 'application/json' } : {}) },
      ...(opts.payload !== undefined ? { payload: opts.payload } : {}),
    })
    return { status: res.statusCode, headers: res.headers, body: res.body ? (JSON.parse(res.body)) : undefined, raw: res.body }
  }
  return { daemon, app, inject }
}

t.test('the auth scheme is case-insensitive (RFC 7235); anything else is still 401', async (t) => {
  const { inject } = await setup(t)
  for (const auth of [`Bearer ${TOKEN}`, `bearer ${TOKEN}`, `BEARER ${TOKEN}`, `bEaReR ${TOKEN}`, `Bearer  ${TOKEN}`]) {
    t.equal((await inject('GET', '/v1/vms', { auth })).status, 200, JSON.stringify(auth))
  }
  for (const auth of [null, '', 'Bearer', `Basic ${TOKEN}`, `Bearer ${TOKEN}x`, `Bearer ${TOKEN.toUpperCase()}`, `Bearer${TOKEN}`, `Bearer ${TOKEN} extra`, `Bearer x ${TOKEN}`]) {
    const res = await inject('GET', '/v1/vms', { auth })
    t.equal(res.status, 401, JSON.stringify(auth))
    t.equal(res.body.error.code, 'UNAUTHORIZED')
    t.equal(res.headers['www-authenticate'], 'Bearer realm="qmpd"')
  }
})

t.test('a JSON null body is refused with 400 and changes nothing; no body at all is still {}', async (t) => {
  const { inject } = await setup(t)
  const define = await inject('POST', '/v1/vms', { payload: 'null' })
  t.equal(define.status, 400)
  t.equal(define.body.error.code, 'INVALID_INPUT')
  t.match(define.body.error.message, /null/)
  const start = await inject('POST', '/v1/vms/x/start', { payload: 'null' })
  t.equal(start.status, 400, 'null where an optional body is expected')
  const repair = await inject('POST', '/v1/vms/x/repair', { payload: 'null' })
  t.equal(repair.status, 400)
  t.same((await inject('GET', '/v1/vms')).body.vms, [], 'nothing was stored')
  // Without a body the optional body is {}: the request gets as far as the VM lookup.
  t.equal((await inject('POST', '/v1/vms/x/start')).body.error.code, 'VM_NOT_FOUND')
  t.equal((await inject('POST', '/v1/vms/x/start', { payload: '{}' })).body.error.code, 'VM_NOT_FOUND')
})

t.test('every GET route in /openapi.json refuses an unknown query key with 400', async (t) => {
  const { inject } = await setup(t)
  const spec = (await inject('GET', '/openapi.json')).body as { paths: Record<string, Record<string, unknown>> }
  const gets = Object.entries(spec.paths).filter(([, ops]) => 'get' in ops).map(([p]) => p)
  t.ok(gets.length >= 8, `${gets.length} GET routes: ${gets.join(' ')}`)
  for (const p of gets) {
    const url = p.replace('{id}', '00000000-0000-4000-8000-000000000000').replace(/\{[^}]+\}/g, 'x')
    const res = await inject('GET', `${url}?bogusKey=1`)
    t.equal(res.status, 400, `GET ${url}?bogusKey=1`)
    t.equal(res.body?.error.code, 'INVALID_INPUT', url)
    t.match(res.body?.error.message ?? '', /bogusKey|unrecognized/i, url)
  }
  for (const url of ['/healthz?x=1', '/openapi.json?x=1']) t.equal((await inject('GET', url)).status, 400, url)
  // Documented keys still work.
  t.equal((await inject('GET', '/v1/jobs?limit=5')).status, 200)
  t.equal((await inject('GET', '/healthz')).status, 200)
  // POST routes without a query of their own refuse one too.
  t.equal((await inject('POST', '/v1/vms?x=1', { payload: '{"name":"q"}' })).status, 400)
  t.same((await inject('GET', '/v1/vms')).body.vms, [], 'the refused define stored nothing')
})

t.test('a known path with a wrong method is 405 with Allow; an unknown path is 404', async (t) => {
  const { inject } = await setup(t)
  const cases: Array<[string, string, string]> = [
    ['DELETE', '/v1/vms', 'GET, HEAD, POST'],
    ['PUT', '/v1/vms/demo', 'DELETE, GET, HEAD, PATCH'],
    ['GET', '/v1/vms/demo/start', 'POST'],
    ['DELETE', '/v1/jobs/00000000-0000-4000-8000-000000000000', 'GET, HEAD, PATCH'],
    ['POST', '/healthz', 'GET, HEAD'],
    ['POST', '/v1/events', 'GET, HEAD'],
    ['GET', '/v1/vms/demo/disks/vda/commit', 'POST'],
    ['PATCH', '/v1/vms/demo/managedsave', 'DELETE, POST'],
  ]
  for (const [method, url, allow] of cases) {
    const res = await inject(method, url)
    t.equal(res.status, 405, `${method} ${url}`)
    t.equal(res.headers['allow'], allow, `${method} ${url}: Allow`)
    t.equal(res.body.error.code, 'METHOD_NOT_ALLOWED')
  }
  const none = await inject('GET', '/v1/nothing-here')
  t.equal(none.status, 404)
  t.equal(none.body.error.code, 'NOT_FOUND')
  t.equal((await inject('GET', '/v1/vms/demo/start/extra')).status, 404, 'a longer path matches no route')
  t.equal((await inject('DELETE', '/v1/vms', { auth: null })).status, 401, 'the token is checked before the method')
})

t.test('HEAD is answered on GET routes, /v1/events included, without a body', async (t) => {
  const { app, inject } = await setup(t)
  const list = await inject('HEAD', '/v1/vms')
  t.equal(list.status, 200)
  t.equal(list.raw, '')
  t.equal((await inject('HEAD', '/healthz')).status, 200)
  t.equal((await inject('HEAD', '/v1/vms/none')).status, 404)
  // Over a real socket: HEAD /v1/events must end, not hang like a stream.
  const address = await app.listen({ host: '127.0.0.1', port: 0 })
  const t0 = performance.now()
  const res = await new Promise<import('node:http').IncomingMessage>((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port: Number(new URL(address).port), path: '/v1/events', method: 'HEAD', headers: { authorization: `Bearer ${TOKEN}` } }, resolve)
    req.setTimeout(5000, () => req.destroy(new Error('HEAD /v1/events did not answer in 5 s')))
    req.on('error', reject)
    req.end()
  })
  await new Promise((r) => {
    res.resume()
    res.once('end', r)
  })
  const ms = performance.now() - t0
  t.equal(res.statusCode, 200)
  t.match(String(res.headers['content-type']), /text\/event-stream/)
  t.ok(ms < 1000, `HEAD /v1/events answered and ended in ${ms.toFixed(1)} ms`)
  const bad = await inject('HEAD', '/v1/events?types=nope')
  t.equal(bad.status, 400, 'HEAD validates the query like GET')
})
