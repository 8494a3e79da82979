// /metrics against a real daemon and real QEMU: the text parses, and the counts move with jobs.
import t from 'tap'
import { defineGuestVm, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

const AUTH = { authorization: 'Bearer metrics-token' }

/** Samples of the Prometheus text format: `name{labels} value` lines, keyed by `name{labels}` as written. */
function parse(text: string): Map<string, number> {
  const out = new Map<string, number>()
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$/.exec(line)
    if (!m) throw new Error(`not a sample line: ${line}`)
    out.set(m[1]!, Number(m[2]))
  }
  return out
}

async function scrape(td: TestDaemon): Promise<Map<string, number>> {
  const res = await td.app.inject({ method: 'GET', url: '/metrics', headers: AUTH })
  if (res.statusCode !== 200) throw new Error(`/metrics: ${res.statusCode} ${res.body}`)
  if (!String(res.headers['content-type']).startsWith('text/plain')) throw new Error(`content type ${String(res.headers['content-type'])}`)
  return parse(res.body)
}

/** A sample's value, 0 when absent. */
function v(m: Map<string, number>, key: string): number {
  return m.get(key) ?? 0
}

t.test('a scrape after jobs shows them: jobs, durations, guest downtime, VMs, QMP latency, event loop', async (t) => {
  const td = await startTestDaemon(t, { token: 'metrics-token' })
  t.equal((await td.app.inject({ method: 'GET', url: '/metrics' })).statusCode, 401, 'the token is needed')
  const before = await scrape(td)
  t.equal(v(before, 'qmpd_jobs_total{operation="start",state="succeeded"}'), 0)
  t.ok(before.has('nodejs_eventloop_lag_seconds'), 'event-loop delay is there')

  const authed: TestDaemon = { ...td, api: (m, u, b, h = {}) => td.api(m, u, b, { ...AUTH, ...h }) }
  await defineGuestVm(authed, 'm1')
  const shut = await scrape(td)
  t.equal(v(shut, 'qmpd_vms{state="shutoff"}'), 1, 'one VM, shut off')

  const start = await op(authed, 'm1', 'start')
  const snap = await authed.api('POST', '/v1/vms/m1/snapshots?wait=true&timeoutSec=120', { name: 's1' })
  t.equal(snap.status, 200, 'internal snapshot with memory')
  const after = await scrape(td)
  t.equal(v(after, 'qmpd_jobs_total{operation="start",state="succeeded"}'), 1, 'the start job is counted')
  t.equal(v(after, `qmpd_jobs_total{operation="${snap.body.op}",state="succeeded"}`), 1, 'the snapshot job is counted')
  t.equal(v(after, 'qmpd_job_duration_seconds_count{operation="start"}'), 1)
  t.ok(v(after, 'qmpd_job_duration_seconds_sum{operation="start"}') > 0, `start took ${v(after, 'qmpd_job_duration_seconds_sum{operation="start"}')} s`)
  t.equal(v(after, 'qmpd_guest_downtime_seconds_count{kind="internal-memory"}'), 1, 'one internal checkpoint\'s downtime')
  t.equal(v(after, 'qmpd_guest_downtime_seconds_sum{kind="internal-memory"}'), snap.body.result.downtimeMs / 1000, 'its downtimeMs, in seconds')
  t.equal(v(after, 'qmpd_vms{state="running"}'), 1, 'the VM runs')
  t.equal(v(after, 'qmpd_vms{state="shutoff"}'), 0)
  t.ok(v(after, 'qmpd_qmp_command_duration_seconds_count{command="qmp_capabilities"}') >= 1, 'QMP replies are timed')
  const replies = [...after].filter(([k]) => k.startsWith('qmpd_qmp_command_duration_seconds_count{')).reduce((n, [, x]) => n + x, 0)
  t.ok(replies > 2, `${replies} QMP replies timed`)
  t.ok(start.id, 'start job id')
})
