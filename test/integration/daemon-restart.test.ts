// The daemon can stop and start again while QEMU keeps running; adopted QEMUs are controllable.
import { writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import t from 'tap'
import { isAlive, waitForExit } from '../../src/vm/proc.ts'
import { defineGuestVm, eventually, guestCounters, op, reapQemus, startTestDaemon } from '../helpers/daemon.ts'
import { makeGuestDisk } from '../helpers/guest.ts'
import { launchRawQemu, requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

t.test('a running VM survives a daemon restart and stays controllable', async (t) => {
  const stateDir = t.testdir()
  const first = await startTestDaemon(t, { stateDir })
  await defineGuestVm(first, 'keep')
  await op(first, 'keep', 'start')
  const before = (await first.api('GET', '/v1/vms/keep')).body
  const c1 = await guestCounters(first, 'keep')
  await first.close()
  t.ok(isAlive(before.pid), 'QEMU outlives the daemon')

  const second = await startTestDaemon(t, { stateDir })
  const after = (await second.api('GET', '/v1/vms/keep')).body
  t.equal(after.state, 'running')
  t.equal(after.pid, before.pid, 'same QEMU process')
  t.same(after.disks.map((d: any) => d.node), before.disks.map((d: any) => d.node))
  t.ok(await eventually(async () => (await guestCounters(second, 'keep')).counter > c1.counter), 'the guest kept counting')
  await op(second, 'keep', 'pause')
  const p = await guestCounters(second, 'keep')
  await new Promise((r) => setTimeout(r, 200))
  t.equal((await guestCounters(second, 'keep')).counter, p.counter, 'pause through the new daemon works')
  await op(second, 'keep', 'resume')

  // A crash while re-attached (QEMU is no longer our child) is still seen, with the signal.
  process.kill(before.pid, 'SIGKILL')
  t.ok(await eventually(async () => (await second.api('GET', '/v1/vms/keep')).body.state === 'crashed', 5000), 'crash seen')
  t.match((await second.api('GET', '/v1/vms/keep')).body.exit, { signal: 'SIGKILL' })
  const jobs = await second.api('GET', '/v1/jobs?vm=keep')
  t.same(jobs.body.jobs.map((j: any) => j.op), ['resume', 'pause', 'start'], 'job history persisted across restarts')
})

t.test('a QEMU that exits while the daemon is down is reported, not waited for', async (t) => {
  const stateDir = t.testdir()
  const first = await startTestDaemon(t, { stateDir })
  await defineGuestVm(first, 'gone')
  await op(first, 'gone', 'start')
  const { pid } = (await first.api('GET', '/v1/vms/gone')).body
  await first.close()
  process.kill(pid, 'SIGKILL')
  t.ok(await waitForExit(pid, 5000))
  const second = await startTestDaemon(t, { stateDir })
  const vm = (await second.api('GET', '/v1/vms/gone')).body
  t.not(vm.state, 'running')
  t.match(vm.reason, /while qmpd was not running/)
  t.equal((await op(second, 'gone', 'start')).state, 'succeeded', 'and it can be started again')
})

t.test('adopts a QEMU started elsewhere by its QMP socket', async (t) => {
  const dir = t.testdir()
  const disk = join(dir, 'boot.qcow2')
  await makeGuestDisk(disk, { format: 'qcow2', sizeMiB: 16, boot: true })
  const raw = await launchRawQemu({ dir, disks: [{ file: disk, format: 'qcow2' }], memoryMiB: 32 })
  t.teardown(() => raw.kill())
  await raw.qmp.cmd('cont')
  raw.qmp.close() // QEMU's monitor serves one client at a time
  const td = await startTestDaemon(t, { stateDir: join(dir, 'state'), config: { allowedDirs: [dirname(raw.socket)] } })
  const res = await td.api('POST', '/v1/vms', { name: 'adopted', adopt: { qmpSocket: raw.socket } })
  t.equal(res.status, 201, JSON.stringify(res.body))
  t.equal(res.body.adopted, true)
  t.equal(res.body.state, 'running')
  t.equal(res.body.pid, raw.pid, 'pid found from the socket path')
  t.equal(res.body.disks.length, 1)
  t.ok(await eventually(async () => (await guestCounters(td, 'adopted')).counter > 0))
  await op(td, 'adopted', 'pause')
  t.equal((await td.api('GET', '/v1/vms/adopted')).body.state, 'paused')
  const start = await td.api('POST', '/v1/vms/adopted/start')
  t.equal(start.status, 409, 'qmpd cannot start what it did not define')
  const stop = await op(td, 'adopted', 'stop', { force: true })
  t.equal(stop.state, 'succeeded')
  t.ok(await waitForExit(raw.pid, 5000), 'adopted QEMU quit')
  t.equal((await td.api('GET', '/v1/vms/adopted')).body.state, 'shutoff')
  const del = await td.api('DELETE', '/v1/vms/adopted')
  t.equal(del.status, 204)
})

t.test('adopting a socket nobody listens on fails cleanly and stores nothing', async (t) => {
  const td = await startTestDaemon(t)
  const sock = join(td.stateDir, 'dead.sock')
  writeFileSync(sock, '') // not a socket at all
  const res = await td.api('POST', '/v1/vms', { name: 'nobody', adopt: { qmpSocket: sock } })
  t.equal(res.status, 400, 'the client named something that is not a QMP socket: its error')
  t.equal(res.body.error.code, 'INVALID_INPUT')
  t.match(res.body.error.message, /not a unix socket/)
  const missing = await td.api('POST', '/v1/vms', { name: 'nobody', adopt: { qmpSocket: 'no/such/dir/qmp.sock' } })
  t.equal(missing.status, 400, 'a missing socket (under a VM directory that does not exist) is a 400, not a 500')
  t.match(missing.body.error.message, /does not exist/)
  t.equal((await td.api('GET', '/v1/vms/nobody')).status, 404, 'nothing stored')
  await reapQemus()
})
