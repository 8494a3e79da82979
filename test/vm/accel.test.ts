// The accelerator and CPU choice without QEMU: chooseMachine on given probe verdicts, the cpu
// field's validation, and the -cpu/-smp arguments it becomes.
import t from 'tap'
import { QmpdError } from '../../src/errors.ts'
import { chooseMachine } from '../../src/vm/accel.ts'
import type { AccelProbe } from '../../src/vm/accel-probe.ts'
import { buildArgv } from '../../src/vm/argv.ts'
import { VmDefinition } from '../../src/vm/definition.ts'

const broken: AccelProbe = { binary: 'q', qemuVersion: 'QEMU emulator version 7.2.22', kvm: { usable: false, reason: '-cpu host: QEMU exited with status 134: failed to set MSR 0x10a' }, ms: 5 }
const working: AccelProbe = { binary: 'q', kvm: { usable: true, cpuModel: 'host', notes: [] }, ms: 5 }
const probeOf = (p: AccelProbe) => {
  const calls: string[] = []
  return { calls, probe: async (binary: string) => (calls.push(binary), p) }
}

t.test('auto falls back to TCG with qemu64 and the probe reason when KVM cannot run the guest', async (t) => {
  const { probe, calls } = probeOf(broken)
  const m = await chooseMachine({}, { accel: 'auto', qemuBinary: 'q' }, probe)
  t.same(calls, ['q'], 'the probe of the daemon\'s binary was asked')
  t.equal(m.accel, 'tcg')
  t.equal(m.cpuModel, 'qemu64')
  t.match(m.reason, /failed to set MSR 0x10a/, 'the reason carries the probe\'s')
  t.equal(m.qemuVersion, 'QEMU emulator version 7.2.22')
})

t.test('auto takes KVM with the probed model where the probe ran its guest', async (t) => {
  const m = await chooseMachine({}, { accel: 'auto', qemuBinary: 'q' }, probeOf(working).probe)
  t.same([m.accel, m.cpuModel], ['kvm', 'host'])
  const named = await chooseMachine({ cpu: { model: 'Nehalem' } }, { accel: 'auto', qemuBinary: 'q' }, probeOf(working).probe)
  t.equal(named.cpuModel, 'Nehalem', 'a model the definition names wins')
})

t.test('explicit kvm on a host where the probe failed is refused with the probe reason', async (t) => {
  for (const [def, daemon] of [[{ accel: 'kvm' as const }, 'tcg' as const], [{}, 'kvm' as const]] as const) {
    const err = await chooseMachine(def, { accel: daemon, qemuBinary: 'q' }, probeOf(broken).probe).catch((e: unknown) => e)
    t.ok(err instanceof QmpdError, 'a QmpdError')
    t.equal((err as QmpdError).code, 'NOT_SUPPORTED')
    t.match((err as QmpdError).message, /KVM cannot run this guest on this host.*failed to set MSR 0x10a/)
  }
})

t.test('tcg never asks the probe, and refuses -cpu host', async (t) => {
  const { probe, calls } = probeOf(working)
  const m = await chooseMachine({ accel: 'tcg', cpu: { model: 'max' } }, { accel: 'auto', qemuBinary: 'q' }, probe)
  t.same([m.accel, m.cpuModel, calls.length], ['tcg', 'max', 0])
  t.match(m.reason, /definition asks for tcg/)
  const err = await chooseMachine({ cpu: { model: 'host' } }, { accel: 'tcg', qemuBinary: 'q' }, probe).catch((e: unknown) => e)
  t.equal((err as QmpdError).code, 'NOT_SUPPORTED')
  t.match((err as QmpdError).message, /host needs KVM/)
})

t.test('the cpu field: topology must match cpus, models carry no options', async (t) => {
  const base = { name: 'a' }
  t.ok(VmDefinition.safeParse({ ...base, cpus: 4, cpu: { sockets: 1, cores: 2, threads: 2 } }).success, 'cpus equal to sockets*cores*threads')
  t.ok(VmDefinition.safeParse({ ...base, cpu: { cores: 2 } }).success, 'cpus left out')
  const bad = VmDefinition.safeParse({ ...base, cpus: 2, cpu: { sockets: 2, cores: 2 } })
  t.notOk(bad.success, 'cpus 2 with 2x2 refused')
  t.match(JSON.stringify(bad.error?.issues), /sockets\*cores\*threads is 4 but cpus is 2/)
  t.notOk(VmDefinition.safeParse({ ...base, cpu: { sockets: 8, cores: 8, threads: 2 } }).success, '128 vCPUs refused')
  for (const model of ['qemu64,+vmx', 'host,migratable=off', 'a b', '-cpu']) {
    t.notOk(VmDefinition.safeParse({ ...base, cpu: { model } }).success, `model ${JSON.stringify(model)} refused`)
  }
  t.notOk(VmDefinition.safeParse({ ...base, accel: 'hvf' }).success, 'unknown accel refused')
})

t.test('argv gets -cpu and a full -smp topology, or the plain count', async (t) => {
  const def = VmDefinition.parse({ name: 'a', cpu: { sockets: 1, cores: 2, threads: 1 } })
  const argv = buildArgv(def, { accel: 'tcg', cpuModel: 'qemu64', disks: [] })
  t.equal(argv[argv.indexOf('-cpu') + 1], 'qemu64')
  t.equal(argv[argv.indexOf('-smp') + 1], 'cpus=2,sockets=1,cores=2,threads=1')
  const plain = buildArgv(VmDefinition.parse({ name: 'a', cpus: 3 }), { accel: 'kvm', cpuModel: 'host', disks: [] })
  t.equal(plain[plain.indexOf('-smp') + 1], '3')
  t.equal(plain[plain.indexOf('-accel') + 1], 'kvm')
})
