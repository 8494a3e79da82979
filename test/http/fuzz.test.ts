// A hostile client generated from /openapi.json: every documented route with mostly valid,
// sometimes hostile path parameters, queries and bodies, against a daemon holding a running and a
// stopped VM. No answer may be a 5xx or hang, and the daemon must still serve, then start again on
// the same store. Bounded in count and time; a fixed seed under CI=true, a random one (printed)
// otherwise; QMPD_FUZZ_SEED and QMPD_FUZZ_COUNT override.
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { defineGuestVm, eventually, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { HOSTILE_STRINGS, Rng, ValueGen, type Schema } from '../helpers/fuzz.ts'
import { requireQemu } from '../helpers/qemu.ts'

const CI = process.env['CI'] === 'true'
const SEED = Number(process.env['QMPD_FUZZ_SEED'] ?? (CI ? 20261201 : Math.floor(Math.random() * 2 ** 31)))
const COUNT = Number(process.env['QMPD_FUZZ_COUNT'] ?? 2000)
const BUDGET_MS = 120_000
/** An answer slower than this counts as a hang (every ?wait is capped at 3 s below). */
const HANG_MS = 20_000

interface Operation {
  method: string
  path: string
  params: Array<{ name: string; in: string; schema?: Schema }>
  body?: Schema
}

/** The documented operations; GET /v1/events is left out: a stream that never ends by design. */
function operations(doc: any): Operation[] {
  const ops: Operation[] = []
  for (const [path, methods] of Object.entries<Record<string, any>>(doc.paths)) {
    for (const [method, o] of Object.entries<any>(methods)) {
      if (path === '/v1/events') continue
      ops.push({ method: method.toUpperCase(), path, params: o.parameters ?? [], body: o.requestBody?.content?.['application/json']?.schema })
    }
  }
  return ops
}

/**
 * A body with a `timeoutSec` over 3 cut to 3: a graceful stop of the boot-sector guest (it ignores
 * ACPI) rightly waits that long, and the queue behind it with it, which is not what this test is for.
 */
function capWaits(v: unknown): unknown {
  if (v && typeof v === 'object' && !Array.isArray(v) && ((v as Record<string, unknown>)['timeoutSec'] as number) > 3) {
    return { ...v, timeoutSec: 3 }
  }
  return v
}

t.test(`API fuzz from /openapi.json (seed ${SEED})`, async (t) => {
  if (!requireQemu(t)) return
  // No token: authentication has tests of its own (test/integration/api.test.ts); here every
  // request is to reach the route. The escape hatch is on with its default allow-list (query-*,
  // stop, cont), as an operator would enable it, so its policy is fuzzed too.
  const td = await startTestDaemon(t, { config: { qmpPassthrough: true, qmpAllow: [] } })
  const auth = {}
  const doc = (await td.app.inject({ method: 'GET', url: '/openapi.json' })).json()
  const ops = operations(doc)
  t.ok(ops.length >= 25, `the document lists ${ops.length} operations`)

  // The fixtures the requests aim at: a running VM with a snapshot, a stopped one.
  const fixtures = async (): Promise<void> => {
    for (const [name, run] of [['fz-run', true], ['fz-off', false]] as const) {
      const got = await td.api('GET', `/v1/vms/${name}`, undefined, auth)
      if (got.status === 404) await defineGuestVm(td, name, { disks: 2 }).catch(() => undefined)
      const state = (await td.api('GET', `/v1/vms/${name}`, undefined, auth)).body?.state
      if (run && state === 'paused') await op(td, name, 'resume').catch(() => undefined)
      else if (run && state !== 'running') await op(td, name, 'start').catch(() => undefined)
    }
    if ((await td.api('GET', '/v1/vms/fz-run/snapshots/s1', undefined, auth)).status === 404) {
      await td.api('POST', '/v1/vms/fz-run/snapshots?wait=true&timeoutSec=30', { name: 's1' }, auth)
    }
  }
  await fixtures()
  t.equal((await td.api('GET', '/v1/vms/fz-run', undefined, auth)).body?.state, 'running', 'the running fixture runs')

  const rng = new Rng(SEED)
  const vmDir = (vm: string): string => join(td.stateDir, 'vms', vm)
  const realPaths = [join(vmDir('fz-off'), 'disk0.qcow2'), join(vmDir('fz-run'), 'disk1.qcow2'), vmDir('fz-run'), td.stateDir, join(td.stateDir, 'qmpd.db'), 'disk0.qcow2', 'new.qcow2', 'save.state']
  const gen = new ValueGen(rng, ['fz-run', 'fz-off', 's1', 's2', 'vda', 'vdb', 'query-status', 'quit', 'stop', ...realPaths], 0.05)
  const jobIds: string[] = []
  const pathValue = (name: string): string => {
    const pools: Record<string, string[]> = { vm: ['fz-run', 'fz-run', 'fz-off', 'nope'], snap: ['s1', 's1', 'nope'], disk: ['vda', 'vdb', 'nope'], id: jobIds.length ? jobIds : ['nope'] }
    if (rng.chance(0.1)) return encodeURIComponent(rng.pick(HOSTILE_STRINGS)) || '%20'
    return rng.pick(pools[name] ?? ['x'])
  }

  const statuses = new Map<number, number>()
  const failures: string[] = []
  const started = Date.now()
  let sent = 0
  for (; sent < COUNT && Date.now() - started < BUDGET_MS; sent++) {
    if (sent % 250 === 249) await fixtures()
    const o = rng.pick(ops)
    let url = o.path.replace(/\{(\w+)\}/g, (_, name: string) => pathValue(name))
    const query = new URLSearchParams()
    for (const p of o.params) {
      if (p.in !== 'query' || !rng.chance(0.5)) continue
      const v = gen.value(p.schema)
      query.set(p.name, typeof v === 'string' ? v : JSON.stringify(v))
    }
    if (query.get('wait') === 'true' || query.has('wait')) query.set('timeoutSec', String(rng.int(0, 3)))
    if (rng.chance(0.05)) query.set(rng.pick(['bogus', 'limit', '__proto__', 'x'.repeat(200)]), rng.pick(['1', '', 'true']))
    if ([...query].length) url += `?${query}`
    let payload: string | undefined
    if (o.body || rng.chance(0.1)) {
      const shape = rng.next()
      payload = shape < 0.85 ? JSON.stringify(capWaits(gen.value(o.body))) : shape < 0.9 ? 'null' : shape < 0.95 ? '{"name": "x", ' : JSON.stringify([gen.value(o.body)])
    }
    const headers: Record<string, string> = { ...auth, ...(payload !== undefined ? { 'content-type': 'application/json' } : {}) }
    const what = `${o.method} ${url.slice(0, 200)} ${payload?.slice(0, 300) ?? ''}`
    const t0 = Date.now()
    const res = await Promise.race([
      td.app.inject({ method: o.method as 'GET', url, headers, ...(payload !== undefined ? { payload } : {}) }),
      new Promise<undefined>((r) => setTimeout(() => r(undefined), HANG_MS).unref()),
    ])
    if (!res) {
      failures.push(`hung > ${HANG_MS} ms: ${what}`)
      continue
    }
    statuses.set(res.statusCode, (statuses.get(res.statusCode) ?? 0) + 1)
    if (res.statusCode >= 500) failures.push(`${res.statusCode} after ${Date.now() - t0} ms: ${what} -> ${res.body.slice(0, 300)}`)
    const id = (() => {
      try {
        return res.json<{ id?: unknown } | null>()?.id
      } catch {
        return undefined
      }
    })()
    if (typeof id === 'string' && /^[0-9a-f-]{36}$/.test(id) && !jobIds.includes(id)) jobIds.push(id)
  }
  const elapsed = Date.now() - started
  t.comment(`sent ${sent} requests in ${elapsed} ms (seed ${SEED}); statuses: ${[...statuses].sort((a, b) => a[0] - b[0]).map(([s, n]) => `${s}×${n}`).join(' ')}`)
  t.ok(sent >= Math.min(COUNT, 300), `at least ${Math.min(COUNT, 300)} requests were sent (${sent})`)
  t.same(failures.slice(0, 20), [], `no 5xx and no hang in ${sent} requests (${failures.length} failures)`)

  // Whatever the fuzz started settles once its jobs are cancelled: some rightly wait for a client
  // (a mirror in ready, a paused job, a copy throttled to a few bytes a second by a fuzzed speed)
  // and hold the VM's queue behind them. A job that cannot be cancelled answers 409 and ends by itself.
  const live = async (): Promise<Array<{ id: string; vm: string; type: string; state: string }>> => {
    const jobs = (await td.api('GET', '/v1/jobs?limit=1000', undefined, auth)).body?.jobs as Array<{ id: string; vm: string; type: string; state: string }>
    return jobs.filter((j) => !['succeeded', 'failed', 'cancelled'].includes(j.state))
  }
  for (const j of await live()) await td.api('POST', `/v1/jobs/${j.id}/cancel`, undefined, auth)
  const idle = await eventually(async () => (await live()).length === 0, 90_000, 250)
  t.ok(idle, `every job ends once the fuzz's jobs are cancelled${idle ? '' : `: ${JSON.stringify(await live())}`}`)
  const h0 = Date.now()
  t.equal((await td.api('GET', '/healthz')).status, 200, '/healthz answers')
  t.ok(Date.now() - h0 < 1000, `/healthz answered in ${Date.now() - h0} ms`)
  const list = await td.api('GET', '/v1/vms', undefined, auth)
  t.equal(list.status, 200, 'GET /v1/vms answers 200')
  t.ok(!existsSync('/tmp/qmpd-fuzz-pwned'), 'no string reached a shell')

  // The store it leaves behind opens again, and every VM in it reads back.
  const names = ((list.body?.vms ?? []) as Array<{ name: string }>).map((v) => v.name)
  await td.close()
  const again: TestDaemon = await startTestDaemon(t, { stateDir: td.stateDir, config: { qmpPassthrough: true, qmpAllow: [] } })
  const relist = await again.api('GET', '/v1/vms', undefined, auth)
  t.equal(relist.status, 200, 'after a restart GET /v1/vms answers 200')
  for (const name of names) t.equal((await again.api('GET', `/v1/vms/${encodeURIComponent(name)}`, undefined, auth)).status, 200, `after a restart VM ${name} reads back`)
})
