// VM lifecycle against real qemu-system-x86_64 under TCG, with the counting boot-sector guest.
import t from 'tap'
import { procInfo, waitForExit } from '../../src/vm/proc.ts'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

t.test('define, start, pause, resume and stop a VM; the guest really runs and really stops', async (t) => {
  const td = await startTestDaemon(t)
  const def = await defineGuestVm(td, 'life', { disks: 2 })
  t.equal(def.state, 'shutoff')
  t.equal(def.definition.machine, 'q35')

  const started = await td.api('POST', '/v1/vms/life/start')
  t.equal(started.status, 202)
  t.match(started.headers['location'], new RegExp(`^/v1/jobs/${started.body.id}$`))
  const job = await td.api('GET', `/v1/jobs/${started.body.id}`)
  t.equal(job.status, 200)
  await td.daemon.jobs.wait(started.body.id, 60_000)
  const vm = await td.api('GET', '/v1/vms/life')
  t.equal(vm.body.state, 'running')
  t.ok(vm.body.pid > 0, 'has a pid')
  t.equal(procInfo(vm.body.pid)?.state !== undefined, true, 'the pid is a live process')
  t.same(vm.body.disks.map((d: any) => d.id), ['vda', 'vdb'])
  t.equal(vm.body.disks[0].node, 'vda-f0')
  t.equal(vm.body.disks[0].chain.length, 1)
  t.equal(vm.body.disks[0].chain[0].format, 'qcow2')

  t.ok(await eventually(async () => (await guestCounters(td, 'life')).counter > 5), 'guest counts')
  const a = await guestCounters(td, 'life')
  t.equal(a.errors, 0, 'guest disk writes succeed')
  t.equal(a.disks, 2, 'guest sees two disks')

  const paused = await op(td, 'life', 'pause')
  t.equal(paused.state, 'succeeded')
  t.equal((await td.api('GET', '/v1/vms/life')).body.state, 'paused')
  const p1 = await guestCounters(td, 'life')
  await new Promise((r) => setTimeout(r, 300))
  const p2 = await guestCounters(td, 'life')
  t.equal(p2.counter, p1.counter, 'a paused guest does not count')

  await op(td, 'life', 'resume')
  t.equal((await td.api('GET', '/v1/vms/life')).body.state, 'running')
  t.ok(await eventually(async () => (await guestCounters(td, 'life')).counter > p2.counter), 'counts again after resume')

  const bad = await td.api('POST', '/v1/vms/life/resume')
  t.equal(bad.status, 409, 'resume of a running VM is a conflict')
  t.equal(bad.body.error.code, 'INVALID_STATE')

  // The boot sector ignores ACPI: the powerdown times out and qmpd quits QEMU.
  const pid = vm.body.pid
  const stopped = await op(td, 'life', 'stop', { timeoutSec: 1 })
  t.match(stopped.result, { method: 'powerdown+quit', state: 'shutoff' })
  t.ok(await waitForExit(pid, 5000), 'QEMU process is gone')
  const off = await td.api('GET', '/v1/vms/life')
  t.equal(off.body.state, 'shutoff')
  t.notOk(off.body.pid, 'no pid when off')
  t.equal(off.body.disks[0].chain[0].format, 'qcow2', 'chain read with qemu-img while off')

  // Start again, then force stop.
  await op(td, 'life', 'start')
  const forced = await op(td, 'life', 'stop', { force: true })
  t.match(forced.result, { method: 'quit', state: 'shutoff' })
})

t.test('kill -9 of QEMU shows as crashed with the signal; the VM can start again', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'crashy')
  await op(td, 'crashy', 'start')
  const { pid } = (await td.api('GET', '/v1/vms/crashy')).body
  process.kill(pid, 'SIGKILL')
  t.ok(await eventually(async () => (await td.api('GET', '/v1/vms/crashy')).body.state === 'crashed', 5000), 'state becomes crashed')
  const vm = (await td.api('GET', '/v1/vms/crashy')).body
  t.match(vm.exit, { signal: 'SIGKILL', code: null })
  t.match(vm.reason, /SIGKILL/)
  const pause = await td.api('POST', '/v1/vms/crashy/pause')
  t.equal(pause.status, 409, 'a crashed VM cannot be paused')
  const again = await op(td, 'crashy', 'start')
  t.equal(again.state, 'succeeded')
  t.equal((await td.api('GET', '/v1/vms/crashy')).body.state, 'running')
})

t.test('a VM killed during a long stop job ends the job at once, not after its timeout', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'dying')
  await op(td, 'dying', 'start')
  const { pid } = (await td.api('GET', '/v1/vms/dying')).body
  const job = await td.api('POST', '/v1/vms/dying/stop', { timeoutSec: 60 })
  t.equal(job.status, 202)
  await eventually(async () => (await td.api('GET', '/v1/vms/dying')).body.state === 'stopping', 5000)
  const t0 = Date.now()
  process.kill(pid, 'SIGKILL')
  const done = await td.daemon.jobs.wait(job.body.id, 20_000)
  t.ok(Date.now() - t0 < 10_000, 'the job ended promptly')
  t.equal(done.state, 'succeeded')
  t.equal((await td.api('GET', '/v1/vms/dying')).body.state, 'crashed')
})

t.test('two VMs work in parallel while one VM\'s jobs stay in order', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'slow')
  await defineGuestVm(td, 'fast')
  await op(td, 'slow', 'start')
  await op(td, 'fast', 'start')
  // slow: a graceful stop that waits 2 s for a guest that ignores ACPI, then start, then pause,
  // queued back to back; fast: pause, resume, pause meanwhile.
  const slowIds = []
  for (const [action, body] of [['stop', { timeoutSec: 2 }], ['start', {}], ['pause', {}]] as const) {
    const r = await td.api('POST', `/v1/vms/slow/${action}`, body)
    t.equal(r.status, 202, `slow ${action} queued`)
    slowIds.push(r.body.id as string)
  }
  const fastIds = []
  for (const action of ['pause', 'resume', 'pause']) {
    const r = await td.api('POST', `/v1/vms/fast/${action}`, {})
    t.equal(r.status, 202, `fast ${action} queued`)
    fastIds.push(r.body.id as string)
  }
  const slow = await Promise.all(slowIds.map((id) => td.daemon.jobs.wait(id, 60_000)))
  const fast = await Promise.all(fastIds.map((id) => td.daemon.jobs.wait(id, 60_000)))
  t.ok([...slow, ...fast].every((j) => j.state === 'succeeded'), 'every job succeeded')
  const ms = (s?: string) => Date.parse(s!)
  for (let i = 1; i < slow.length; i++) {
    t.ok(ms(slow[i]!.startedAt) >= ms(slow[i - 1]!.finishedAt), `slow job ${i} started after job ${i - 1} finished`)
  }
  t.ok(ms(fast[2]!.finishedAt) < ms(slow[0]!.finishedAt), 'fast VM finished its jobs while the slow VM was still stopping')
  t.equal((await td.api('GET', '/v1/vms/slow')).body.state, 'paused')
  t.equal((await td.api('GET', '/v1/vms/fast')).body.state, 'paused')
})
