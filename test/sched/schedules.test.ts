// Snapshot schedules against real QEMU (a shut-off boot-sector guest: offline internal disk
// snapshots are quick): short-interval schedules take snapshots, retention keeps exactly what it
// says, expiry deletes, a daemon restart keeps the schedule and runs no slot twice, and bad
// input is refused with the right status.
import { mkdirSync } from 'node:fs'
import { request } from 'node:http'
import { join } from 'node:path'
import t from 'tap'
import type { ScheduleEvent } from '../../src/events/bus.ts'
import { SchedDeletes } from '../../src/sched/deletes.ts'
import { Scheduler } from '../../src/sched/scheduler.ts'
import { ScheduleRepo } from '../../src/store/schedules.ts'
import { defineGuestVm, eventually, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

/** The scheduler's events, as the bus carries them to GET /v1/events. */
function scheduleEvents(td: TestDaemon): ScheduleEvent[] {
  const out: ScheduleEvent[] = []
  const off = td.daemon.bus.subscribe((ev) => {
    if (ev.type === 'schedule') out.push(ev)
  })
  t.teardown(off)
  return out
}

/** Reads GET /v1/events?types=schedule over real HTTP until `want` matches the text received (or 15 s pass). */
async function sseUntil(td: TestDaemon, want: RegExp): Promise<string> {
  const address = await td.app.listen({ host: '127.0.0.1', port: 0 })
  const port = Number(new URL(address).port)
  return new Promise((resolve) => {
    let text = ''
    const req = request({ host: '127.0.0.1', port, path: '/v1/events?types=schedule' }, (res) => {
      res.setEncoding('utf8')
      res.on('data', (d: string) => {
        text += d
        if (want.test(text)) done()
      })
    })
    const timer = setTimeout(() => done(), 15_000)
    const done = (): void => {
      clearTimeout(timer)
      req.destroy()
      resolve(text)
    }
    req.on('error', () => done())
    req.end()
  })
}

async function snapshotNames(td: TestDaemon, vm: string): Promise<string[]> {
  const res = await td.api('GET', `/v1/vms/${vm}/snapshots`)
  return (res.body.snapshots as Array<{ name: string }>).map((s) => s.name).sort()
}

/** Snapshot-create jobs of the VM's schedule `id`, oldest first. */
async function scheduledJobs(td: TestDaemon, vm: string, id: string): Promise<Array<{ id: string; state: string; params: { name: string } }>> {
  const res = await td.api('GET', `/v1/jobs?vm=${vm}&limit=1000`)
  return (res.body.jobs as Array<{ id: string; op: string; state: string; params: { name: string; schedule?: string } }>).filter((j) => j.op === 'snapshot-create' && j.params.schedule === id).reverse()
}

/** Waits until the schedule's deletes are settled and no job of the VM is queued or running. */
async function settled(td: TestDaemon, vm: string, id: string): Promise<boolean> {
  return eventually(async () => {
    const s = (await td.api('GET', `/v1/vms/${vm}/schedules/${id}`)).body
    return s.pendingDeletes.every((p: { refused?: string }) => p.refused !== undefined) && !td.daemon.jobs.busy(vm)
  }, 30_000, 100)
}

t.test('a 1 s schedule with keepLast 2 takes a snapshot per slot and leaves exactly the 2 newest after 4 firings', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'r1')
  const events = scheduleEvents(td)
  const t0 = Date.now()
  const res = await td.api('POST', '/v1/vms/r1/schedules', { id: 'often', cron: '* * * * * *', action: { type: 'snapshot', kind: 'internal' }, retention: { keepLast: 2 } })
  t.equal(res.status, 201, 'created')
  t.ok(Date.parse(res.body.nextRun) > t0 && Date.parse(res.body.nextRun) <= t0 + 2000, `nextRun ${res.body.nextRun} is the next whole second`)
  t.same(res.body.pendingDeletes, [])
  const fired = (): ScheduleEvent[] => events.filter((e) => e.event === 'schedule.fired' && e.schedule === 'often')
  t.ok(await eventually(() => fired().length >= 4, 30_000), `4 slots fired (${fired().length})`)
  t.equal((await td.api('PATCH', '/v1/vms/r1/schedules/often', { enabled: false })).status, 200, 'disabled')
  const firedAtStop = fired().length
  t.ok(await settled(td, 'r1', 'often'), 'every job and delete settled')
  const jobs = await scheduledJobs(td, 'r1', 'often')
  t.equal(jobs.length, firedAtStop, 'one snapshot job per fired slot')
  t.ok(jobs.every((j) => j.state === 'succeeded'), `every scheduled snapshot succeeded: ${jobs.map((j) => j.state).join(',')}`)
  t.equal(new Set(jobs.map((j) => j.params.name)).size, jobs.length, 'no slot ran twice')
  const newest2 = jobs.slice(-2).map((j) => j.params.name).sort()
  t.same(await snapshotNames(td, 'r1'), newest2, `exactly the 2 newest of ${jobs.length} are kept`)
  const deletes = (await td.api('GET', '/v1/jobs?vm=r1&limit=1000')).body.jobs.filter((j: { op: string }) => j.op === 'snapshot-delete')
  t.equal(deletes.length, jobs.length - 2, 'the others went through the delete job')
  t.ok(deletes.every((j: { state: string }) => j.state === 'succeeded'), 'every delete succeeded')
  const view = (await td.api('GET', '/v1/vms/r1/schedules/often')).body
  t.equal(view.lastRun.state, 'succeeded')
  t.equal(view.lastRun.snapshot, jobs.at(-1)!.params.name, 'lastRun names its snapshot')
  t.equal(view.lastRun.job, jobs.at(-1)!.id, 'and its job')
  t.equal(view.nextRun, undefined, 'a disabled schedule has no next run')
  const snap = (await td.api('GET', `/v1/vms/r1/snapshots/${newest2[1]}`)).body
  t.equal(snap.schedule, 'often', 'the snapshot records its schedule')
  await new Promise((r) => setTimeout(r, 2500))
  t.equal(fired().length, firedAtStop, 'nothing fires while disabled')
})

t.test('a backup schedule takes a full point, then incremental ones, into its chain; bad backup actions are refused', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'b1')
  const events = scheduleEvents(td)
  const dir = join(td.stateDir, 'vms', 'b1', 'bk')
  mkdirSync(dir)
  const bad = await td.api('POST', '/v1/vms/b1/schedules', { cron: '* * * * * *', action: { type: 'backup', mode: 'incremental', dir: 'nope' } })
  t.equal(bad.status, 400, 'a dir that does not exist is 400')
  t.equal(bad.body.error.code, 'INVALID_PATH')
  const withRetention = await td.api('POST', '/v1/vms/b1/schedules', { cron: '* * * * * *', action: { type: 'backup', mode: 'incremental', dir: 'bk' }, retention: { keepLast: 1 } })
  t.equal(withRetention.status, 400, 'retention on a backup schedule is 400')
  t.same((await td.api('GET', '/v1/vms/b1/schedules')).body.schedules, [], 'no schedule was made')
  const offSlot = await td.api('POST', '/v1/vms/b1/schedules', { id: 'nightly', cron: '* * * * * *', action: { type: 'backup', mode: 'incremental', dir: 'bk' } })
  t.equal(offSlot.status, 201, 'created')
  t.ok(await eventually(() => events.some((e) => e.event === 'schedule.skipped' && e.schedule === 'nightly'), 10_000), 'a slot of a shut-off VM is skipped')
  t.match(events.find((e) => e.event === 'schedule.skipped' && e.schedule === 'nightly')!.reason, /needs it running/)
  t.equal((await td.api('PATCH', '/v1/vms/b1/schedules/nightly', { enabled: false })).status, 200)
  t.equal((await td.api('POST', '/v1/vms/b1/start')).status < 300, true, 'started')
  t.ok(await eventually(() => td.daemon.vms.record('b1').runtime.state === 'running', 30_000))
  const firedBefore = events.filter((e) => e.event === 'schedule.fired' && e.schedule === 'nightly').length
  t.equal((await td.api('PATCH', '/v1/vms/b1/schedules/nightly', { enabled: true })).status, 200, 'enabled again')
  t.ok(await eventually(() => events.filter((e) => e.event === 'schedule.fired' && e.schedule === 'nightly').length >= firedBefore + 3, 30_000), '3 slots fired')
  t.equal((await td.api('PATCH', '/v1/vms/b1/schedules/nightly', { enabled: false })).status, 200, 'disabled')
  t.ok(await eventually(() => !td.daemon.jobs.busy('b1'), 30_000), 'its jobs settled')
  const chains = (await td.api('GET', '/v1/vms/b1/backups')).body.chains
  t.equal(chains.length, 1, 'one chain')
  const points = chains[0].points as Array<{ mode: string; requested: string }>
  const fired = events.filter((e) => e.event === 'schedule.fired' && e.schedule === 'nightly')
  t.equal(points.length, fired.length, `one point per fired slot (${points.length})`)
  t.equal(points[0]!.mode, 'full', 'the first point is full (the chain had none)')
  t.ok(points.slice(1).every((p) => p.mode === 'incremental'), `the later ones are incremental: ${points.map((p) => p.mode).join(',')}`)
  const view = (await td.api('GET', '/v1/vms/b1/schedules/nightly')).body
  t.equal(view.lastRun.state, 'succeeded', 'the last slot succeeded')
  t.equal(view.lastRun.snapshot, undefined, 'and names no snapshot')
})

t.test('expiry deletes scheduled and manual snapshots through the delete queue', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'x1')
  const events = scheduleEvents(td)
  t.equal((await td.api('POST', '/v1/vms/x1/snapshots?wait=true', { name: 'past', expiresAt: '2020-01-01T00:00:00Z' })).status, 400, 'an expiresAt in the past is refused')
  t.equal((await td.api('POST', '/v1/vms/x1/snapshots?wait=true', { name: 'both', expiresAt: '2099-01-01T00:00:00Z', expiresIn: '1d' })).status, 400, 'expiresAt and expiresIn together are refused')
  t.equal((await td.api('POST', '/v1/vms/x1/snapshots?wait=true', { name: 'bad', expiresIn: '5 days' })).status, 400, 'a bad duration is refused')
  t.same(await snapshotNames(td, 'x1'), [], 'the refusals took nothing')
  const keep = await td.api('POST', '/v1/vms/x1/snapshots?wait=true', { name: 'keep', expiresAt: '2099-01-01T00:00:00+02:00' })
  t.equal(keep.body.result.snapshot.expiresAt, '2098-12-31T22:00:00.000Z', 'expiresAt is kept in UTC')
  const t0 = Date.now()
  const manual = await td.api('POST', '/v1/vms/x1/snapshots?wait=true', { name: 'brief', expiresIn: '2s' })
  t.equal(manual.status, 200)
  const exp = Date.parse(manual.body.result.snapshot.expiresAt)
  t.ok(exp >= t0 + 2000 && exp <= Date.now() + 2000, 'expiresAt = creation + 2 s')
  t.ok(await eventually(async () => !(await snapshotNames(td, 'x1')).includes('brief'), 15_000), 'the manual snapshot is gone after it expired')
  t.ok(Date.now() >= exp, 'not before its expiry')
  t.ok(events.some((e) => e.event === 'snapshot.expired' && e.snapshot === 'brief' && e.job), 'snapshot.expired names the delete job')

  t.equal((await td.api('POST', '/v1/vms/x1/schedules', { id: 'ttl', cron: '*/2 * * * * *', action: { type: 'snapshot' }, expiry: '3s' })).status, 201)
  const fired = (): ScheduleEvent[] => events.filter((e) => e.event === 'schedule.fired' && e.schedule === 'ttl')
  t.ok(await eventually(() => fired().length >= 2, 20_000), '2 slots fired')
  await td.api('PATCH', '/v1/vms/x1/schedules/ttl', { enabled: false })
  const taken = fired().map((e) => e.snapshot!)
  t.ok(await eventually(async () => (await snapshotNames(td, 'x1')).every((n) => !taken.includes(n)), 20_000), `every scheduled snapshot expired (${taken.join(', ')})`)
  t.same(await snapshotNames(td, 'x1'), ['keep'], 'the one without a near expiry stays')
  for (const n of taken) t.ok(events.some((e) => e.event === 'snapshot.expired' && e.snapshot === n && e.schedule === 'ttl'), `${n}: snapshot.expired`)
})

t.test('a daemon restart keeps the schedule, catches up the latest missed slot once, and runs no slot twice', async (t) => {
  const stateDir = t.testdir()
  const td = await startTestDaemon(t, { stateDir })
  await defineGuestVm(td, 'p1')
  t.equal((await td.api('POST', '/v1/vms/p1/schedules', { id: 'keep', cron: '*/2 * * * * *', action: { type: 'snapshot' }, retention: { keepLast: 10 } })).status, 201)
  const before = scheduleEvents(td)
  t.ok(await eventually(() => before.filter((e) => e.event === 'schedule.fired').length >= 2, 20_000), '2 slots fired before the restart')
  await td.close()
  const down = Date.now()
  // Down for two or three slots: only the latest of them may run, once.
  await new Promise((r) => setTimeout(r, 5000))
  const td2 = await startTestDaemon(t, { stateDir })
  const up = Date.now()
  const after = scheduleEvents(td2)
  const got = await td2.api('GET', '/v1/vms/p1/schedules/keep')
  t.equal(got.status, 200, 'the schedule survived the restart')
  t.equal(got.body.cron, '*/2 * * * * *')
  t.same(got.body.retention, { keepLast: 10 })
  t.ok(await eventually(() => after.filter((e) => e.event === 'schedule.fired').length >= 2, 20_000), '2 more slots fired after the restart')
  await td2.api('PATCH', '/v1/vms/p1/schedules/keep', { enabled: false })
  t.ok(await settled(td2, 'p1', 'keep'), 'settled')
  const jobs = await scheduledJobs(td2, 'p1', 'keep')
  t.ok(jobs.every((j) => j.state === 'succeeded'), `every scheduled job succeeded: ${jobs.map((j) => `${j.params.name}=${j.state}`).join(', ')}`)
  const names = jobs.map((j) => j.params.name)
  t.equal(new Set(names).size, names.length, 'no slot ran twice')
  const slots = names.map((n) => Date.parse(n.replace(/^keep-(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$/, '$1-$2-$3T$4:$5:$6Z')))
  const missed = slots.filter((s) => s > down && s < up)
  t.ok(missed.length <= 1, `at most one slot of the downtime ran (${missed.length}: the latest missed, caught up at start)`)
  if (missed.length === 1) t.ok(up - missed[0]! <= 2500, 'the one caught up is the latest missed slot')
  t.same(await snapshotNames(td2, 'p1'), [...names].sort(), 'every slot that ran left its snapshot (keepLast 10 keeps all)')
})

t.test('bad input: bad cron 400 with the parser\'s reason, unknown VM 404, unknown schedule 404, duplicate 409; a checkpoint slot of a stopped VM is skipped', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'b1')
  const events = scheduleEvents(td)
  const bad = await td.api('POST', '/v1/vms/b1/schedules', { cron: '61 * * * *', action: { type: 'snapshot' } })
  t.equal(bad.status, 400)
  t.equal(bad.body.error.code, 'INVALID_INPUT')
  t.match(bad.body.error.message, /cron: .*minute/, 'the parser\'s reason')
  t.equal((await td.api('POST', '/v1/vms/b1/schedules', { cron: '* * * * *', tz: 'Mars/Olympus', action: { type: 'snapshot' } })).status, 400, 'unknown tz')
  t.equal((await td.api('POST', '/v1/vms/b1/schedules', { cron: '* * * * *', action: { type: 'backup' } })).status, 400, 'an action type qmpd does not have')
  t.equal((await td.api('POST', '/v1/vms/b1/schedules', { cron: '* * * * *', action: { type: 'snapshot' }, retention: { keepLast: 0 } })).status, 400, 'keepLast 0')
  t.equal((await td.api('POST', '/v1/vms/nope/schedules', { cron: '* * * * *', action: { type: 'snapshot' } })).status, 404, 'unknown VM')
  t.equal((await td.api('GET', '/v1/vms/nope/schedules')).status, 404)
  t.equal((await td.api('GET', '/v1/vms/b1/schedules/nope')).status, 404, 'unknown schedule')
  t.equal((await td.api('PATCH', '/v1/vms/b1/schedules/nope', { enabled: false })).status, 404)
  t.equal((await td.api('DELETE', '/v1/vms/b1/schedules/nope')).status, 404)
  t.same((await td.api('GET', '/v1/vms/b1/schedules')).body.schedules, [], 'the refusals made no schedule')
  const stream = sseUntil(td, /event: schedule\ndata: \{[^\n]*"event":"schedule\.skipped"[^\n]*\n/)
  const ck = await td.api('POST', '/v1/vms/b1/schedules', { id: 'ck', cron: '* * * * * *', action: { type: 'snapshot', kind: 'internal', memory: true } })
  t.equal(ck.status, 201)
  t.equal((await td.api('POST', '/v1/vms/b1/schedules', { id: 'ck', cron: '* * * * *', action: { type: 'snapshot' } })).status, 409, 'duplicate id')
  t.equal((await td.api('PATCH', '/v1/vms/b1/schedules/ck', { cron: 'nope' })).status, 400, 'PATCH with a bad cron')
  t.ok(await eventually(() => events.some((e) => e.event === 'schedule.skipped' && e.schedule === 'ck'), 10_000), 'the checkpoint slot is skipped')
  const skipped = events.find((e) => e.event === 'schedule.skipped')!
  t.match(skipped.reason, /shutoff.*running/, `the reason says why: ${skipped.reason}`)
  const sse = await stream
  const data = [...sse.matchAll(/event: schedule\ndata: (.*)\n/g)].map((m) => JSON.parse(m[1]!))
  t.match(data, [{ type: 'schedule', vm: 'b1', event: 'schedule.skipped', schedule: 'ck', slot: String, reason: /^the VM is shutoff/ }], 'GET /v1/events carries schedule.skipped with its reason')
  const view = (await td.api('GET', '/v1/vms/b1/schedules/ck')).body
  t.equal(view.lastRun.state, 'skipped')
  t.equal(view.cron, '* * * * * *', 'the refused PATCH changed nothing')
  t.equal((await td.api('DELETE', '/v1/vms/b1/schedules/ck')).status, 204)
  t.same(await snapshotNames(td, 'b1'), [], 'no snapshot was taken')
  t.equal((await td.api('DELETE', '/v1/vms/b1')).status, 204, 'the VM deletes')
})

t.test('catch-up: the latest missed slot runs once when within the window, and is skipped with an event past it', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'm1')
  const events = scheduleEvents(td)
  // The daemon's own scheduler is stopped; two schedulers with chosen windows look at a schedule
  // whose slots (every minute) began before it was "created", as after a daemon downtime.
  td.daemon.scheduler.stop()
  const repo = new ScheduleRepo(td.daemon.db)
  const now = Date.now()
  const since = new Date(now - 3 * 60_000).toISOString()
  const mk = (id: string): void => repo.put({ vm: 'm1', id, cron: '* * * * *', action: { type: 'snapshot', kind: 'internal', memory: false }, enabled: true, since, createdAt: since, updatedAt: since })
  mk('late')
  const latest = new Date(Math.floor(now / 60_000) * 60_000)
  const deps = { repo, vms: td.daemon.vms, snapshots: td.daemon.snapshots, backups: td.daemon.backups, jobs: td.daemon.jobs, bus: td.daemon.bus, log: td.daemon.log }
  const strict = new Scheduler({ ...deps, deletes: new SchedDeletes(deps), graceMs: 0 })
  t.teardown(() => strict.stop())
  strict.start()
  t.ok(await eventually(() => events.some((e) => e.event === 'schedule.skipped' && e.schedule === 'late'), 10_000), 'past a window of 0 s the missed slot is skipped')
  strict.stop()
  const skipped = events.find((e) => e.schedule === 'late')!
  t.equal(skipped.slot, latest.toISOString(), 'the one considered is the latest missed slot')
  t.match(skipped.reason, /missed: .*catch-up window/)
  t.equal(repo.runs('m1', 'late').length, 1, 'one slot recorded, none of the earlier missed ones')

  mk('ontime')
  const lenient = new Scheduler({ ...deps, deletes: new SchedDeletes(deps), graceMs: 10 * 60_000 })
  t.teardown(() => lenient.stop())
  lenient.start()
  t.ok(await eventually(() => events.some((e) => e.event === 'schedule.fired' && e.schedule === 'ontime'), 10_000), 'within the window the latest missed slot fires')
  lenient.stop()
  const fired = events.filter((e) => e.event === 'schedule.fired' && e.schedule === 'ontime')
  t.equal(fired.length, 1, 'once')
  t.equal(fired[0]!.slot, latest.toISOString(), 'for the latest missed slot')
  t.ok(await eventually(() => !td.daemon.jobs.busy('m1'), 30_000))
  t.same(await snapshotNames(td, 'm1'), [fired[0]!.snapshot], 'one snapshot taken for the three missed minutes')
  t.notOk(events.some((e) => e.event === 'schedule.fired' && e.schedule === 'late'), 'the skipped schedule never fired')
})
