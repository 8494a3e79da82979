// Accelerator and CPU per VM with a real QEMU: `auto` boots the Linux test guest on what the host
// probe allows, GET shows the accelerator, model and topology used, and QEMU really has them;
// explicit kvm where the probe fails, -cpu host under TCG and unknown models are refused.
import { existsSync, readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import t from 'tap'
import { probeAccel } from '../../src/vm/accel-probe.ts'
import { eventually, op, startTestDaemon } from '../helpers/daemon.ts'
import { ensureLinuxGuest, LINUX_GUEST_READY } from '../helpers/linux-guest.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

t.test('auto boots a Linux guest on what the probe allows; GET and QEMU show model and topology', async (t) => {
  const guest = await ensureLinuxGuest()
  const td = await startTestDaemon(t, { config: { accel: 'auto', allowedDirs: [dirname(guest.kernel)] } })
  const def = await td.api('POST', '/v1/vms', {
    name: 'lin',
    memoryMiB: 256,
    kernel: guest.kernel,
    initrd: guest.initrd,
    append: guest.append,
    cpu: { sockets: 1, cores: 2, threads: 1 },
  })
  t.equal(def.status, 201, 'defined')
  t.equal(def.body.definition.cpus, 2, 'cpus derived from the topology')
  const t0 = Date.now()
  await op(td, 'lin', 'start')
  const serial = join(td.stateDir, 'vms', 'lin', 'serial.log')
  t.ok(await eventually(() => existsSync(serial) && readFileSync(serial, 'utf8').includes(LINUX_GUEST_READY), 180_000, 250), 'the Linux guest booted')
  t.comment(`start to ${LINUX_GUEST_READY}: ${Date.now() - t0} ms`)

  const probe = await probeAccel('qemu-system-x86_64')
  const view = await td.api('GET', '/v1/vms/lin')
  const machine = view.body.machine
  t.comment(`machine: ${JSON.stringify(machine)}`)
  t.equal(machine.accel, probe.kvm.usable ? 'kvm' : 'tcg', 'the accelerator the probe allows')
  t.equal(machine.cpuModel, probe.kvm.usable ? probe.kvm.cpuModel : 'qemu64')
  if (!probe.kvm.usable) t.ok(machine.reason.includes(probe.kvm.reason), 'the reason says why not KVM')
  t.same(machine.topology, { cpus: 2, sockets: 1, cores: 2, threads: 1 })

  const qmp = (execute: string, args?: unknown) => td.api('POST', '/v1/vms/lin/qmp', { execute, ...(args ? { arguments: args } : {}) })
  const cpus = (await qmp('query-cpus-fast')).body.return as Array<{ 'qom-path': string; props: { 'core-id': number } }>
  t.equal(cpus.length, 2, 'QEMU runs two vCPUs')
  t.same(cpus.map((c) => c.props['core-id']).sort(), [0, 1], 'as two cores of one socket')
  const type = (await qmp('qom-get', { path: cpus[0]!['qom-path'], property: 'type' })).body.return
  t.equal(type, `${machine.cpuModel}-x86_64-cpu`, 'of the model GET shows')
  const accel = (await qmp('query-kvm')).body.return
  t.equal(accel.enabled, machine.accel === 'kvm', 'and under the accelerator GET shows')
})

t.test('explicit kvm where the probe fails, and -cpu host under TCG, fail the start with the reason', async (t) => {
  const td = await startTestDaemon(t)
  const probe = await probeAccel('qemu-system-x86_64')
  t.equal((await td.api('POST', '/v1/vms', { name: 'k', accel: 'kvm', memoryMiB: 32 })).status, 201)
  const k = await td.api('POST', '/v1/vms/k/start?wait=true&timeoutSec=60', {})
  if (probe.kvm.usable) {
    t.equal(k.status, 200, 'KVM works here: the VM starts under it')
    t.equal((await td.api('GET', '/v1/vms/k')).body.machine.accel, 'kvm')
  } else {
    t.equal(k.status, 409, 'refused')
    t.equal(k.body.error.code, 'NOT_SUPPORTED')
    t.ok(k.body.error.message.includes(probe.kvm.reason), 'with the probe\'s reason')
    const after = await td.api('GET', '/v1/vms/k')
    t.equal(after.body.state, 'shutoff', 'nothing started')
    t.equal(after.body.pid, undefined)
  }
  t.equal((await td.api('POST', '/v1/vms', { name: 'h', accel: 'tcg', cpu: { model: 'host' }, memoryMiB: 32 })).status, 201)
  const h = await td.api('POST', '/v1/vms/h/start?wait=true&timeoutSec=60', {})
  t.equal(h.status, 409, '-cpu host under TCG refused')
  t.match(h.body.error.message, /host needs KVM/)
})

t.test('an unknown CPU model is refused at define and nothing is defined', async (t) => {
  const td = await startTestDaemon(t)
  const res = await td.api('POST', '/v1/vms', { name: 'x', cpu: { model: 'Pentium9000' } })
  t.equal(res.status, 400)
  t.equal(res.body.error.code, 'INVALID_INPUT')
  t.match(res.body.error.message, /knows no CPU model Pentium9000/)
  t.equal((await td.api('GET', '/v1/vms/x')).status, 404, 'not defined')
  const ok = await td.api('POST', '/v1/vms', { name: 'y', cpu: { model: 'Nehalem' }, cpus: 2 })
  t.equal(ok.status, 201, 'a model QEMU lists is accepted')
})
