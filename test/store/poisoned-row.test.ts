// A stored row that fails its schema, written behind a stopped daemon's back: the next daemon
// starts, marks that VM quarantined with the table, row and issue, refuses its operations with
// 409 STORE_ROW_INVALID, serves the other VMs normally (a real QEMU starts and snapshots), and lets the
// operator delete the broken VM's records.
import Database from 'better-sqlite3'
import { join } from 'node:path'
import t from 'tap'
import { defineGuestVm, op, startTestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

/** Changes the stored rows of a stopped daemon's store directly, as a hand edit or a bad tool would. */
function poison(stateDir: string, fn: (db: Database.Database) => void): void {
  const db = new Database(join(stateDir, 'qmpd.db'))
  try {
    fn(db)
  } finally {
    db.close()
  }
}

t.test('poisoned rows in vms, snapshots and jobs: the daemon serves, the VMs with a bad row need repair', async (t) => {
  const stateDir = t.testdir()
  const first = await startTestDaemon(t, { stateDir })
  await defineGuestVm(first, 'good')
  await defineGuestVm(first, 'bad')
  await defineGuestVm(first, 'badsnap')
  await defineGuestVm(first, 'badjob')
  // A job of badjob's that ends, so that its row exists to be poisoned.
  t.equal((await op(first, 'badjob', 'start')).state, 'succeeded')
  t.equal((await op(first, 'badjob', 'stop', { force: true })).state, 'succeeded')
  await first.close()

  let badJobId = ''
  poison(stateDir, (db) => {
    // A disk path over the schema's 4096-byte limit: the zod dump that used to stop the daemon.
    const def = JSON.parse((db.prepare("SELECT definition FROM vms WHERE name = 'bad'").get() as { definition: string }).definition)
    def.disks[0].file = '/' + 'x'.repeat(5000)
    db.prepare("UPDATE vms SET definition = ? WHERE name = 'bad'").run(JSON.stringify(def))
    db.prepare("INSERT INTO snapshots (vm, name, body, created_at) VALUES ('badsnap', 's1', '{not json', '2026-01-01T00:00:00.000Z')").run()
    const job = db.prepare("SELECT id FROM jobs WHERE vm = 'badjob' LIMIT 1").get() as { id: string }
    badJobId = job.id
    db.prepare("UPDATE jobs SET state = 'exploded' WHERE id = ?").run(job.id)
  })

  const t0 = Date.now()
  const td = await startTestDaemon(t, { stateDir })
  t.pass(`the daemon starts on the poisoned store (${Date.now() - t0} ms)`)

  const list = await td.api('GET', '/v1/vms')
  t.equal(list.status, 200, 'GET /v1/vms answers 200')
  const byName = new Map<string, any>(list.body.vms.map((v: any) => [v.name, v]))
  t.same([...byName.keys()], ['bad', 'badjob', 'badsnap', 'good'], 'every VM is listed, in name order')
  t.equal(byName.get('good').state, 'shutoff', 'the sound VM is shutoff')
  for (const [name, table, key, issue] of [
    ['bad', 'vms', 'bad', /disks\.0\.file/],
    ['badsnap', 'snapshots', 'badsnap/s1', /JSON/],
    ['badjob', 'jobs', badJobId, /state/],
  ] as const) {
    const one = await td.api('GET', `/v1/vms/${name}`)
    t.equal(one.status, 200, `GET /v1/vms/${name} answers 200`)
    t.equal(one.body.state, 'quarantined', `${name} is quarantined`)
    t.match(one.body.reason, new RegExp(`stored ${table} row ${key.replace('/', '\\/')} fails its schema`), `${name}'s reason names the table and the row`)
    t.match(one.body.repair.problems, [{ table, key, issue }], `${name}'s repair lists the bad row and what failed`)
  }

  const start = await td.api('POST', '/v1/vms/bad/start?wait=true')
  t.equal(start.status, 409, 'starting the broken VM answers 409')
  t.equal(start.body.error.code, 'STORE_ROW_INVALID')
  t.match(start.body.error.message, /VM bad is quarantined: stored vms row bad fails its schema: disks\.0\.file.*DELETE \/v1\/vms\/bad/)
  const snaps = await td.api('GET', '/v1/vms/badsnap/snapshots')
  t.equal(snaps.status, 409, "listing the broken VM's snapshots answers 409")
  t.equal(snaps.body.error.code, 'STORE_ROW_INVALID')
  const snapCreate = await td.api('POST', '/v1/vms/badjob/snapshots', { name: 'x', kind: 'external' })
  t.equal(snapCreate.status, 409, 'a snapshot of a VM with a bad job row answers 409')
  t.equal(snapCreate.body.error.code, 'STORE_ROW_INVALID')
  const job = await td.api('GET', `/v1/jobs/${badJobId}`)
  t.equal(job.status, 409, 'the bad job row itself answers 409, naming what failed')
  t.match(job.body.error, { code: 'STORE_ROW_INVALID', message: /state/ })
  const jobs = await td.api('GET', '/v1/jobs')
  t.equal(jobs.status, 200, 'GET /v1/jobs answers 200 (the bad row left out)')
  t.notOk(jobs.body.jobs.some((j: any) => j.id === badJobId), 'the bad job row is not listed')

  // The other VM works normally: a real QEMU starts, takes a live snapshot, stops.
  t.equal((await op(td, 'good', 'start')).state, 'succeeded', 'the sound VM starts')
  const snap = await td.api('POST', '/v1/vms/good/snapshots?wait=true&timeoutSec=120', { name: 's1', kind: 'external' })
  t.equal(snap.status, 200, `the sound VM snapshots (${JSON.stringify(snap.body?.error ?? snap.body?.state)})`)
  t.equal(snap.body.state, 'succeeded')
  t.equal((await op(td, 'good', 'stop', { force: true })).state, 'succeeded', 'the sound VM stops')

  // The operator's way out: delete the definition (deleteStorage is refused: its records cannot be trusted).
  const withStorage = await td.api('DELETE', '/v1/vms/bad?deleteStorage=true')
  t.equal(withStorage.status, 409, 'delete with deleteStorage is refused')
  t.equal(withStorage.body.error.code, 'STORE_ROW_INVALID')
  for (const name of ['bad', 'badsnap', 'badjob']) {
    t.equal((await td.api('DELETE', `/v1/vms/${name}`)).status, 204, `DELETE /v1/vms/${name} answers 204`)
    t.equal((await td.api('GET', `/v1/vms/${name}`)).status, 404, `${name} is gone`)
  }
  t.equal((await td.api('GET', `/v1/jobs/${badJobId}`)).status, 404, 'the bad job row went with its VM')
  await defineGuestVm(td, 'bad')
  t.equal((await td.api('GET', '/v1/vms/bad')).body.state, 'shutoff', 'the name can be defined again')
  await td.close()

  const third = await startTestDaemon(t, { stateDir })
  const again = await third.api('GET', '/v1/vms')
  t.same(
    again.body.vms.map((v: any) => [v.name, v.state]),
    [
      ['bad', 'shutoff'],
      ['good', 'shutoff'],
    ],
    'after a restart nothing is quarantined',
  )
})

t.test('a definition whose stored form fails the schema is refused at define (400), and nothing is stored', async (t) => {
  const td = await startTestDaemon(t)
  // 4096 characters relative: accepted as input, but its absolute stored form is over the limit.
  // The path policy refuses it first (it checks the resolved form); the store's own check of the
  // stored form (test/store/integrity.test.ts) is the second line behind it.
  const res = await td.api('POST', '/v1/vms', { name: 'long', disks: [{ id: 'vda', file: 'a'.repeat(4096) }] })
  t.equal(res.status, 400, 'define answers 400')
  t.equal(res.body.error.code, 'INVALID_PATH')
  t.match(res.body.error.message, /long as an absolute path; the limit is 4095/)
  t.equal((await td.api('GET', '/v1/vms/long')).status, 404, 'no VM was stored')
  const list = await td.api('GET', '/v1/vms')
  t.equal(list.status, 200, 'GET /v1/vms answers 200')
  t.same(list.body.vms, [], 'and lists nothing')
  await td.close()
  const again = await startTestDaemon(t, { stateDir: td.stateDir })
  t.equal((await again.api('GET', '/v1/vms')).status, 200, 'the next daemon starts and lists')
})
