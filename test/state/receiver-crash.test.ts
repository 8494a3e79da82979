// A daemon killed while a live checkpoint (background snapshot) streams RAM: the receiver, a
// process of its own, takes the stream to its end with no daemon alive, so QEMU 7.2 releases
// the guest (a broken background snapshot would leave its vCPUs asleep in userfaultfd), and the
// next daemon records the checkpoint whole. Proven from outside: the guest counts on, and the
// checkpoint reverts to one instant of RAM and disks.
import { existsSync, statSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { reapQemusUnder, revertExact, snapshotRefs, startChildDaemon } from '../helpers/crash.ts'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { receiversIn } from '../../src/vm/receivers.ts'

t.before(() => {
  requireQemu(t)
})

t.test('the RAM stream of a live checkpoint outlives the daemon; the guest runs on', async (t) => {
  const dir = t.testdir()
  t.teardown(() => reapQemusUnder(dir))
  const td1 = await startTestDaemon(t, { stateDir: dir })
  await defineGuestVm(td1, 'bg', { disks: 2, memoryMiB: 256, stampMiB: 16 })
  await op(td1, 'bg', 'start')
  t.ok(await eventually(async () => (await guestCounters(td1, 'bg')).counter > 30))
  await td1.close()

  const child = await startChildDaemon(t, dir, { point: 'snapshot-create.save-ram.migrating' })
  void child.api('POST', '/v1/vms/bg/snapshots?wait=true', { name: 'live', kind: 'external', memory: true, live: true }).catch(() => {})
  const end = await child.ended(60_000)
  t.equal(end?.signal, 'SIGKILL', 'the daemon died while the stream ran')
  const vmDir = join(dir, 'vms', 'bg')
  const partial = join(vmDir, '.live.vmstate.partial')
  // No daemon runs now: only the receiver can finish the file.
  t.ok(await eventually(() => receiversIn(vmDir).length === 0, 30_000), 'the receiver took the stream to its end by itself')
  t.ok(existsSync(partial) && statSync(partial).size > 8 * 1024 * 1024, `the partial RAM file holds the whole stream (${existsSync(partial) ? statSync(partial).size : 0} bytes)`)

  const td = await startTestDaemon(t, { stateDir: dir })
  await td.daemon.jobs.drain()
  const job = ((await td.api('GET', '/v1/jobs?vm=bg')).body.jobs as any[]).find((j) => j.op === 'snapshot-create')
  t.equal(job?.state, 'succeeded', 'recovery finished the checkpoint: it was whole')
  t.equal((await td.api('GET', '/v1/vms/bg/check')).body.ok, true, 'store, QEMU and files agree')
  const c0 = (await guestCounters(td, 'bg')).counter
  t.ok(await eventually(async () => (await guestCounters(td, 'bg')).counter > c0 + 20), 'the guest was never wedged: it counts on')
  const refs = await snapshotRefs(td, 'bg')
  const live = refs.find((r) => r.name === 'live')
  t.ok(live, 'the checkpoint exists')
  if (live) t.same(await revertExact(td, 'bg', live), [], 'and reverts to one instant of RAM and disks')
})
