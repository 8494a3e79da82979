// A daemon SIGKILLed while a schedule fires: after the slot is recorded and before its job is
// queued, and right after the job is queued. The next daemon reports that slot interrupted, never
// runs it (or anything for it) a second time, and goes on with the later slots.
import Database from 'better-sqlite3'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import t from 'tap'
import { FIRE_POINTS } from '../../src/sched/scheduler.ts'
import { startChildDaemon } from '../helpers/crash.ts'
import { eventually, startTestDaemon } from '../helpers/daemon.ts'
import { makeGuestDisk } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

/** The schedule's recorded slots, read from the store file itself (no daemon). */
function runsInStore(stateDir: string): Array<{ slot: string; state: string; job?: string; snapshot: string; reason?: string }> {
  const db = new Database(join(stateDir, 'qmpd.db'), { readonly: true })
  try {
    return (db.prepare('SELECT body FROM schedule_runs ORDER BY slot').all() as Array<{ body: string }>).map((r) => JSON.parse(r.body))
  } finally {
    db.close()
  }
}

for (const [point, jobQueued] of [
  [FIRE_POINTS.recorded, false],
  [FIRE_POINTS.enqueued, true],
] as const) {
  t.test(`killed at ${point}: the slot is reported interrupted, never run twice, and later slots run`, async (t) => {
    const stateDir = t.testdir()
    const child = await startChildDaemon(t, stateDir, { point })
    const file = join(stateDir, 'vms', 'k1', 'disk0.qcow2')
    await mkdir(join(stateDir, 'vms', 'k1'), { recursive: true })
    await makeGuestDisk(file, { format: 'qcow2', sizeMiB: 16, boot: true })
    t.equal((await child.api('POST', '/v1/vms', { name: 'k1', memoryMiB: 32, machine: 'q35', disks: [{ id: 'vda', file, format: 'qcow2', bus: 'virtio' }] })).status, 201)
    t.equal((await child.api('POST', '/v1/vms/k1/schedules', { id: 'tick', cron: '* * * * * *', action: { type: 'snapshot' } })).status, 201)
    t.match(await child.ended(20_000), { signal: 'SIGKILL' }, `the daemon died at ${point} on the first slot`)

    const left = runsInStore(stateDir)
    t.equal(left.length, 1, 'one slot recorded')
    const killed = left[0]!
    t.equal(killed.state, jobQueued ? 'queued' : 'firing', `the store says ${jobQueued ? 'queued, with its job' : 'firing, no job'}`)
    t.equal(killed.job !== undefined, jobQueued)

    const td = await startTestDaemon(t, { stateDir })
    const after = runsInStore(stateDir).find((r) => r.slot === killed.slot)!
    t.equal(after.state, 'interrupted', 'the next daemon reports the slot interrupted')
    t.ok(await eventually(async () => {
      const last = (await td.api('GET', '/v1/vms/k1/schedules/tick')).body.lastRun
      return last?.state === 'succeeded' && last.slot > killed.slot
    }, 30_000), 'a later slot ran and succeeded: the schedule resumed')
    t.equal((await td.api('PATCH', '/v1/vms/k1/schedules/tick', { enabled: false })).status, 200)
    t.ok(await eventually(() => !td.daemon.jobs.busy('k1'), 30_000), 'jobs settled')

    const jobs = (await td.api('GET', '/v1/jobs?vm=k1&limit=1000')).body.jobs.filter((j: { op: string }) => j.op === 'snapshot-create') as Array<{ state: string; error?: { code: string }; params: { name: string } }>
    const forKilled = jobs.filter((j) => j.params.name === killed.snapshot)
    if (jobQueued) {
      t.equal(forKilled.length, 1, 'the killed slot has exactly its one job')
      t.equal(forKilled[0]?.state, 'failed')
      t.equal(forKilled[0]?.error?.code, 'INTERRUPTED', 'which the restart marked interrupted')
    } else {
      t.equal(forKilled.length, 0, 'no job was ever queued for the killed slot')
    }
    const names = jobs.map((j) => j.params.name)
    t.equal(new Set(names).size, names.length, `no slot has two jobs (${names.length} jobs)`)
    const snaps = (await td.api('GET', '/v1/vms/k1/snapshots')).body.snapshots.map((s: { name: string }) => s.name)
    t.notOk(snaps.includes(killed.snapshot), 'the killed slot took no snapshot')
    const ran = runsInStore(stateDir).filter((r) => r.slot > killed.slot)
    // A slot that fires while the previous slot's job still runs (a loaded host) is skipped by
    // policy, saying so; every other later slot succeeded.
    const overlap = (r: { state: string; reason?: string }) => r.state === 'skipped' && /previous slot's job .* is still queued or running/.test(r.reason ?? '')
    t.ok(ran.some((r) => r.state === 'succeeded') && ran.every((r) => r.state === 'succeeded' || overlap(r)), `the later slots succeeded (or were skipped behind a running one): ${ran.map((r) => r.state).join(',')}`)
    t.same(ran.filter((r) => r.state === 'succeeded').map((r) => r.snapshot).sort(), snaps.sort(), 'each later slot that ran left its one snapshot')
  })
}
