// Every operation of the OpenAPI document is driven at least once against a real daemon and real
// QEMU, successes and errors; every response must be declared and match its schema.
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { contractOf, type Contract } from '../helpers/contract.ts'
import { defineGuestVm, eventually, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

/** Polls a job until its state is one of `states`; returns the job. */
async function jobIn(td: TestDaemon, id: string, states: string[]): Promise<any> {
  let job: any
  const ok = await eventually(async () => {
    job = (await td.api('GET', `/v1/jobs/${id}`)).body
    return states.includes(job.state)
  }, 60_000, 100)
  if (!ok) throw new Error(`job ${id} never reached ${states.join('/')}: ${JSON.stringify(job)}`)
  return job
}

t.test('every operation answers as the document declares, and every operation was driven', async (t) => {
  const td = await startTestDaemon(t, { stateDir: join(t.testdir(), 'open') })
  const guarded = await startTestDaemon(t, { stateDir: join(t.testdir(), 'guarded'), token: 'contract-token' })
  const contracts: Contract[] = [contractOf(td.app), contractOf(guarded.app)]
  const api = td.api.bind(td)
  const w = '?wait=true&timeoutSec=120'
  /** Asserts a status; the body is in the message only when it is not the one expected. */
  const is = (res: { status: number; body: unknown }, status: number, what: string): void => {
    t.equal(res.status, status, res.status === status ? what : `${what}: ${JSON.stringify(res.body).slice(0, 600)}`)
  }

  // Open routes, and the token.
  t.equal((await guarded.api('GET', '/')).status, 200, 'GET / needs no token')
  t.equal((await guarded.api('GET', '/healthz')).status, 200)
  t.equal((await guarded.api('GET', '/openapi.json')).status, 200)
  t.equal((await guarded.api('GET', '/v1/vms')).status, 401, 'the API needs the token')
  t.equal((await guarded.api('GET', '/v1/vms', undefined, { authorization: 'Bearer contract-token' })).status, 200)
  is(await api('GET', '/healthz?bogus=1'), 400, 'GET /healthz?bogus=1')
  is(await guarded.api('GET', '/metrics'), 401, 'metrics need the token')
  const metrics = await td.app.inject({ method: 'GET', url: '/metrics' })
  t.equal(metrics.statusCode, 200)
  t.equal(contracts[0]!.check('GET', '/metrics', metrics.statusCode, metrics.headers['content-type'] as string, metrics.body).problem, undefined, 'GET /metrics is text/plain as declared')

  // VMs.
  await defineGuestVm(td, 'c1')
  is(await api('POST', '/v1/vms', { name: 'c1' }), 409, 'define twice')
  is(await api('POST', '/v1/vms', { name: 'c2', bogus: true }), 400, 'POST /v1/vms')
  const form = await td.app.inject({ method: 'POST', url: '/v1/vms', headers: { 'content-type': 'application/x-www-form-urlencoded' }, payload: 'name=c2' })
  t.equal(form.statusCode, 415)
  t.match(JSON.parse(form.body).error.message, /application\/json/, '415 says to send JSON')
  is(await api('POST', '/v1/vms', { name: 'c2', description: 'x'.repeat(1024 * 1024 + 1) }), 413, 'POST /v1/vms')
  is(await api('GET', '/v1/vms'), 200, 'GET /v1/vms')
  is(await api('GET', '/v1/vms/c1'), 200, 'GET /v1/vms/c1')
  is(await api('GET', '/v1/vms/nope'), 404, 'GET /v1/vms/nope')
  is(await api('GET', '/v1/vms/c1/check'), 200, 'GET /v1/vms/c1/check')
  is(await api('PATCH', '/v1/vms/c1', { memoryMiB: 64 }), 200, 'PATCH /v1/vms/c1')
  is(await api('PATCH', '/v1/vms/c1', { memoryMiB: 1 }), 400, 'PATCH /v1/vms/c1 with a bad value')
  is(await api('PATCH', '/v1/vms/nope', { memoryMiB: 64 }), 404, 'PATCH /v1/vms/nope')
  is(await api('GET', '/v1/vms/c1/wait?state=shutoff&timeoutSec=1'), 200, 'GET /v1/vms/c1/wait')
  is(await api('GET', '/v1/vms/c1/wait?state=bogus'), 400, 'GET /v1/vms/c1/wait?state=bogus')
  is(await api('GET', '/v1/vms/c1/stats'), 200, 'GET /v1/vms/c1/stats of a shut-off VM')
  is(await api('GET', '/v1/host'), 200, 'GET /v1/host')
  is(await api('POST', '/v1/vms/c1/repair'), 200, 'POST /v1/vms/c1/repair')
  is(await api('POST', '/v1/vms/c1/pause'), 409, 'pause a shut-off VM')
  const started = await td.app.inject({ method: 'POST', url: `/v1/vms/c1/start${w}`, headers: { 'content-type': 'application/json' }, payload: '' })
  t.equal(started.statusCode, 200, 'an empty JSON body counts as {}')
  t.equal(contracts[0]!.check('POST', '/v1/vms/c1/start', started.statusCode, started.headers['content-type'] as string, started.body).problem, undefined)
  const pause = await api('POST', '/v1/vms/c1/pause')
  t.equal(pause.status, 202)
  t.equal(pause.headers['location'], `/v1/jobs/${pause.body.id}`)
  await jobIn(td, pause.body.id, ['succeeded'])
  is(await api('POST', `/v1/vms/c1/resume${w}`), 200, 'POST /v1/vms/c1/resume')
  is(await api('POST', '/v1/vms/c1/qmp', { execute: 'query-status' }), 200, 'POST /v1/vms/c1/qmp')
  is(await api('PATCH', '/v1/vms/c1', { memoryMiB: 32 }), 409, 'PATCH a running VM')
  is(await api('GET', '/v1/vms/c1/stats'), 200, 'GET /v1/vms/c1/stats of a running VM')
  is(await api('POST', '/v1/vms/c1/qmp', { execute: 'no-such-command' }), 422, 'POST /v1/vms/c1/qmp')

  // Snapshots: internal ones on c1, external ones on c2 (one VM cannot have both).
  is(await api('POST', `/v1/vms/c1/snapshots${w}`, { name: 's1' }), 200, 'internal snapshot')
  is(await api('POST', `/v1/vms/c1/snapshots${w}`, { name: 's1' }), 409, 'the same name twice')
  is(await api('GET', '/v1/vms/c1/snapshots'), 200, 'GET /v1/vms/c1/snapshots')
  is(await api('GET', '/v1/vms/c1/snapshots/s1'), 200, 'GET /v1/vms/c1/snapshots/s1')
  is(await api('GET', '/v1/vms/c1/snapshots/none'), 404, 'GET /v1/vms/c1/snapshots/none')
  is(await api('POST', `/v1/vms/c1/snapshots/s1/revert${w}`), 200, 'revert')
  is(await api('DELETE', `/v1/vms/c1/snapshots/s1${w}`), 200, 'delete')
  is(await api('DELETE', `/v1/vms/c1/snapshots/none${w}`), 404, 'delete an unknown snapshot')

  // Schedules.
  is(await api('POST', '/v1/vms/c1/schedules', { id: 'nightly', cron: '0 3 * * *', tz: 'Europe/Berlin', action: { type: 'snapshot' }, retention: { keepDaily: 7 }, expiry: '30d' }), 201, 'POST /v1/vms/c1/schedules')
  is(await api('POST', '/v1/vms/c1/schedules', { id: 'nightly', cron: '0 3 * * *', action: { type: 'snapshot' } }), 409, 'the same schedule id twice')
  is(await api('POST', '/v1/vms/c1/schedules', { cron: '0 25 * * *', action: { type: 'snapshot' } }), 400, 'a bad cron')
  is(await api('POST', '/v1/vms/nope/schedules', { cron: '0 3 * * *', action: { type: 'snapshot' } }), 404, 'a schedule of an unknown VM')
  is(await api('GET', '/v1/vms/c1/schedules'), 200, 'GET /v1/vms/c1/schedules')
  is(await api('GET', '/v1/vms/c1/schedules/nightly'), 200, 'GET /v1/vms/c1/schedules/nightly')
  is(await api('GET', '/v1/vms/c1/schedules/none'), 404, 'GET an unknown schedule')
  is(await api('PATCH', '/v1/vms/c1/schedules/nightly', { enabled: false, expiry: null }), 200, 'PATCH /v1/vms/c1/schedules/nightly')
  is(await api('PATCH', '/v1/vms/c1/schedules/nightly', { cron: 'bogus' }), 400, 'PATCH with a bad cron')
  is(await api('DELETE', '/v1/vms/c1/schedules/nightly'), 204, 'DELETE /v1/vms/c1/schedules/nightly')
  is(await api('DELETE', '/v1/vms/c1/schedules/nightly'), 404, 'DELETE it again')
  await defineGuestVm(td, 'c2')
  is(await api('POST', `/v1/vms/c2/start${w}`), 200, 'start c2')
  is(await api('POST', `/v1/vms/c2/snapshots${w}`, { name: 'e1', kind: 'external', memory: false }), 200, 'external snapshot')
  is(await api('POST', `/v1/vms/c2/snapshots/e1/export${w}`, { file: 'e1.qcow2' }), 200, 'export a snapshot')
  is(await api('POST', `/v1/vms/c2/snapshots/e1/export${w}`, { file: 'e1.qcow2' }), 409, 'export onto an existing file')
  const exp = await api('POST', '/v1/vms/c2/snapshots/e1/export', { file: 'e1.raw', format: 'raw' })
  is(exp, 202, 'export as a job')
  t.equal((await jobIn(td, exp.body.id, ['succeeded', 'failed'])).state, 'succeeded', 'the export job succeeded')
  is(await api('POST', '/v1/vms/c2/snapshots/none/export', { file: 'x.qcow2' }), 404, 'export of an unknown snapshot')
  is(await api('POST', '/v1/vms/c2/snapshots/e1/export', { file: 'x.qcow2', format: 'vmdk' }), 400, 'export in an unknown format')
  is(await api('POST', '/v1/vms', { name: 'c2full', clone: { vm: 'c2', snapshot: 'e1' } }), 201, 'clone a VM from a snapshot')
  is(await api('POST', '/v1/vms', { name: 'c2x', clone: { vm: 'c2', snapshot: 'none' } }), 404, 'clone from an unknown snapshot')
  is(await api('DELETE', '/v1/vms/c2full?deleteStorage=true'), 204, 'delete the clone')
  // A refusal at submit makes no job (docs/api.md): the commit would write into e1's image.
  const before = (await api('GET', '/v1/jobs?vm=c2&limit=1000')).body.jobs.length
  const commit = await api('POST', `/v1/vms/c2/disks/vda/commit${w}`, {})
  is(commit, 409, 'a commit into a snapshot\'s image is refused')
  t.equal(commit.body.job, undefined, 'the refusal carries no job')
  t.equal((await api('GET', '/v1/jobs?vm=c2&limit=1000')).body.jobs.length, before, 'and the job list is unchanged')
  is(await api('POST', `/v1/vms/c2/disks/vda/pull${w}`, { keepMerged: true }), 200, 'pull')
  is(await api('POST', `/v1/vms/c2/disks/vdz/commit${w}`, {}), 404, 'commit of an unknown disk')
  // Pull-mode NBD exports (test/integration/exports.test.ts reads them back).
  const ex = await api('POST', '/v1/vms/c2/exports', {})
  is(ex, 201, 'POST /v1/vms/c2/exports')
  is(await api('POST', '/v1/vms/c2/exports', { disks: ['vdz'] }), 404, 'export of an unknown disk')
  is(await api('POST', '/v1/vms/c2/exports', {}), 409, 'the same disks exported twice')
  is(await api('GET', '/v1/vms/c2/exports'), 200, 'GET /v1/vms/c2/exports')
  is(await api('GET', '/v1/vms/nope/exports'), 404, 'GET /v1/vms/nope/exports')
  is(await api('DELETE', `/v1/vms/c2/exports/${ex.body.id}`), 204, 'DELETE the export')
  is(await api('DELETE', '/v1/vms/c2/exports/00000000'), 404, 'DELETE an unknown export')
  is(await api('POST', `/v1/vms/c2/stop${w}`, { force: true }), 200, 'stop c2')

  // Block jobs' controls: a copy without pivot waits in ready until cancelled.
  const copy = await api('POST', '/v1/vms/c1/disks/vda/copy', { dest: 'copy.qcow2', speedBytesPerSec: 1024 * 1024 })
  is(copy, 202, 'copy')
  await jobIn(td, copy.body.id, ['ready', 'succeeded', 'failed'])
  is(await api('PATCH', `/v1/jobs/${copy.body.id}`, { speedBytesPerSec: 0 }), 200, 'speed of a ready copy')
  is(await api('POST', `/v1/jobs/${copy.body.id}/pause`), 200, 'pause a ready copy')
  is(await api('POST', `/v1/jobs/${copy.body.id}/resume`), 200, 'resume it')
  is(await api('POST', `/v1/jobs/${copy.body.id}/cancel`), 200, 'cancel it')
  await jobIn(td, copy.body.id, ['succeeded', 'cancelled', 'failed'])
  is(await api('POST', `/v1/jobs/${copy.body.id}/complete`), 409, 'complete a finished job')
  is(await api('POST', '/v1/jobs/00000000-0000-4000-8000-000000000000/cancel'), 404, 'cancel an unknown job')
  is(await api('GET', '/v1/jobs?vm=c1'), 200, 'GET /v1/jobs')

  // Backups: a full point of c1, the chain list, a restore of the point.
  mkdirSync(join(td.stateDir, 'vms', 'c1', 'bk'))
  const bk = await api('POST', `/v1/vms/c1/backups${w}`, { mode: 'full', dir: 'bk' })
  is(bk, 200, 'backup')
  is(await api('POST', `/v1/vms/c1/backups${w}`, { mode: 'incremental', dir: 'bk' }), 200, 'an incremental backup')
  is(await api('POST', `/v1/vms/c1/backups${w}`, { mode: 'differential', dir: 'bk' }), 200, 'a differential backup (basedOn in the point)')
  is(await api('POST', '/v1/vms/c1/backups', { mode: 'full', dir: 'no-such-dir' }), 400, 'a backup into a missing dir')
  is(await api('GET', '/v1/vms/c1/backups'), 200, 'GET /v1/vms/c1/backups')
  is(await api('POST', `/v1/vms/c1/backups/${bk.body.result?.point?.id}/restore${w}`, { file: 'restored.qcow2' }), 200, 'restore a backup')
  is(await api('POST', `/v1/vms/c1/backups/b00000000/restore${w}`, { file: 'r2.qcow2' }), 404, 'restore an unknown backup')

  // Saved state.
  is(await api('POST', `/v1/vms/c1/save${w}`, { file: 'state.bin' }), 200, 'save')
  is(await api('POST', `/v1/vms/c1/restore${w}`, { file: 'state.bin' }), 200, 'restore')
  is(await api('POST', `/v1/vms/c1/managedsave${w}`), 200, 'managed save')
  is(await api('DELETE', '/v1/vms/c1/managedsave'), 204, 'DELETE /v1/vms/c1/managedsave')
  is(await api('POST', `/v1/vms/c1/stop${w}`, { force: true }), 409, 'stop a saved-then-discarded (shut-off) VM')
  is(await api('DELETE', '/v1/vms/c1'), 204, 'DELETE /v1/vms/c1')

  // Events: HEAD is the stream's headers; a bad filter is a 400.
  is(await api('HEAD', '/v1/events'), 200, 'HEAD /v1/events')
  is(await api('GET', '/v1/events?types=bogus'), 400, 'GET /v1/events?types=bogus')

  // Not in the document: the not-found handler's 404 and 405.
  is(await api('GET', '/v1/nothing'), 404, 'GET /v1/nothing')
  is(await api('PUT', '/v1/vms'), 405, 'PUT /v1/vms')

  const seen = new Set(contracts.flatMap((c) => [...c.seen.keys()]))
  const uncovered = contracts[0]!.operations.filter((o) => !seen.has(o.id)).map((o) => `${o.id} (${o.method} ${o.path})`)
  t.same(uncovered, [], 'every operation of the document was driven')
  t.ok(contracts[0]!.operations.length >= 30, `the document has ${contracts[0]!.operations.length} operations`)
})

t.test('the checker refuses what the document does not declare', async (t) => {
  const td = await startTestDaemon(t)
  const c = contractOf(td.app)
  t.match(c.check('GET', '/v1/vms', 418, 'application/json', '{"error":{"code":"X","message":"m"}}').problem, /418 is not declared/)
  t.match(c.check('GET', '/v1/vms', 200, 'application/json', '{"vms":"no"}').problem, /vms/)
  t.match(c.check('GET', '/v1/jobs/00000000-0000-4000-8000-000000000000', 404, 'application/json', '{"oops":1}').problem, /error/)
  t.match(c.check('POST', '/v1/nowhere', 200, 'application/json', '{}').problem, /no such operation/)
  t.equal(c.check('GET', '/healthz', 200, 'application/json; charset=utf-8', '{"status":"ok","version":"1"}').problem, undefined)
})
