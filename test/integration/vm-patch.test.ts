// PATCH /v1/vms/{vm} on real QEMU: the next start runs the patched definition, and a snapshot
// taken before the patch reverts to the definition it was taken under (RAM and disks its own).
import { existsSync } from 'node:fs'
import { dirname, join } from 'node:path'
import t from 'tap'
import { deviceId } from '../../src/images/graph.ts'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { checkDiskAgainstCounter, checkStampsAgainstCounter, makeGuestDisk } from '../helpers/guest.ts'
import { launchRawQemu, requireQemu } from '../helpers/qemu.ts'
import { diskBytes, dumpRam, revert, slotsOf, snap, stampsOf } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

async function qmp(td: TestDaemon, vm: string, execute: string): Promise<any> {
  const r = await td.api('POST', `/v1/vms/${vm}/qmp`, { execute })
  if (r.status !== 200) throw new Error(`${execute}: ${r.status} ${JSON.stringify(r.body)}`)
  return r.body.return
}

/** What QEMU itself says: RAM size in MiB and the guest-visible block devices. */
async function qemuSees(td: TestDaemon, vm: string): Promise<{ memoryMiB: number; devices: string[] }> {
  const mem = await qmp(td, vm, 'query-memory-size-summary')
  const blocks = (await qmp(td, vm, 'query-block')) as Array<{ device?: string; qdev?: string }>
  return { memoryMiB: mem['base-memory'] / (1024 * 1024), devices: blocks.map(deviceId).filter((d) => d !== '').sort() }
}

const definitionOf = async (td: TestDaemon, vm: string): Promise<any> => (await td.api('GET', `/v1/vms/${vm}`)).body.definition

t.test('PATCH changes a shut-off VM; an internal checkpoint from before reverts to the old definition, RAM and disk', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'pv', { memoryMiB: 32, stampMiB: 1 })
  await op(td, 'pv', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 'pv')).counter > 30), 'the guest counts')

  const running = await td.api('PATCH', '/v1/vms/pv', { memoryMiB: 64 }, { 'content-type': 'application/merge-patch+json' })
  t.equal(running.status, 409, 'PATCH of a running VM is refused')
  t.equal(running.body.error.code, 'INVALID_STATE')
  t.equal((await definitionOf(td, 'pv')).memoryMiB, 32, 'and changed nothing')

  const before = (await guestCounters(td, 'pv')).counter
  const k1 = await snap(td, 'pv', { name: 'k1', kind: 'internal' })
  const after = (await guestCounters(td, 'pv')).counter
  t.equal(k1.snapshot.definition.memoryMiB, 32, 'the checkpoint recorded the definition')
  t.same(k1.snapshot.definition.disks.map((d: any) => d.id), ['vda'])
  const diskFile = td.daemon.vms.record('pv').runtime.disks[0]!.file
  const tagBytes = await diskBytes(diskFile, { internal: 'k1' })
  await op(td, 'pv', 'stop', { force: true })

  const t0 = performance.now()
  const res = await td.api('PATCH', '/v1/vms/pv', { memoryMiB: 64, disks: [...k1.snapshot.definition.disks, { id: 'vdb', file: 'extra.qcow2', sizeMiB: 8 }] }, { 'content-type': 'application/merge-patch+json' })
  t.comment(`PATCH answered in ${Math.round(performance.now() - t0)} ms`)
  t.equal(res.status, 200, `PATCH answers 200: ${JSON.stringify(res.body?.error ?? '')}`)
  t.equal(res.body.definition.memoryMiB, 64, 'the view shows the new memory')
  t.same(res.body.definition.disks.map((d: any) => d.id), ['vda', 'vdb'], 'and the added disk')
  const extra = join(td.stateDir, 'vms', 'pv', 'extra.qcow2')
  t.equal(res.body.definition.disks[1].file, extra, 'its relative path resolved under the VM directory')
  t.same((await td.api('GET', '/v1/vms/pv/snapshots/k1')).body.definition.memoryMiB, 32, 'the snapshot keeps the definition it was taken under')

  await op(td, 'pv', 'start')
  t.same(await qemuSees(td, 'pv'), { memoryMiB: 64, devices: ['vda', 'vdb'] }, 'the next start runs 64 MiB and both disks (QEMU says so)')
  t.ok(existsSync(extra), 'qmpd created the added disk at start')

  // Live revert to a checkpoint of the old machine: QEMU is relaunched with the old definition.
  const r = await revert(td, 'pv', 'k1', { state: 'paused' })
  t.equal(r.state, 'paused')
  t.equal((await definitionOf(td, 'pv')).memoryMiB, 32, 'GET shows the old memory again')
  t.same((await definitionOf(td, 'pv')).disks.map((d: any) => d.id), ['vda'], 'and the old disks')
  t.same(await qemuSees(td, 'pv'), { memoryMiB: 32, devices: ['vda'] }, 'QEMU runs the old machine')
  const ram = await dumpRam(td, 'pv')
  t.ok(ram.counters.counter >= before && ram.counters.counter <= after, `the RAM is the checkpoint's (counter ${ram.counters.counter} in [${before}, ${after}])`)
  t.same(checkStampsAgainstCounter(stampsOf(ram), ram.counters.counter, ram.counters.pending), [], 'stamps match the restored counter')
  const now = await diskBytes(diskFile)
  t.ok(now.equals(tagBytes), 'the disk reads what the checkpoint held')
  t.same(checkDiskAgainstCounter(slotsOf(now), ram.counters.counter, ram.counters.pending, 0), [], 'the disk is from the RAM\'s instant')
  t.ok(existsSync(extra), 'the disk the old definition lacks keeps its file')
  await op(td, 'pv', 'resume')
  const c = (await guestCounters(td, 'pv')).counter
  t.ok(await eventually(async () => (await guestCounters(td, 'pv')).counter > c + 10), 'the guest runs on')
  t.same((await td.api('GET', '/v1/vms/pv/check')).body.problems, [], 'store, QEMU and files agree')
})

t.test('an external snapshot from before a PATCH reverts to the old definition (offline)', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'pe', { memoryMiB: 32 })
  await snap(td, 'pe', { name: 's1', kind: 'external' })
  const patched = await td.api('PATCH', '/v1/vms/pe', { memoryMiB: 48, cpus: 2 })
  t.equal(patched.status, 200, 'application/json is accepted too')
  t.same([patched.body.definition.memoryMiB, patched.body.definition.cpus], [48, 2])
  await revert(td, 'pe', 's1', { state: 'running' })
  const def = await definitionOf(td, 'pe')
  t.same([def.memoryMiB, def.cpus], [32, 1], 'the revert brought back the old memory and CPUs')
  t.same((await qemuSees(td, 'pe')).memoryMiB, 32, 'and QEMU started with them')
  const smp = (await qmp(td, 'pe', 'query-cpus-fast')) as unknown[]
  t.equal(smp.length, 1, 'one vCPU')
})

t.test('a bad patch is a 400 and changes nothing', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'pb', { memoryMiB: 32 })
  const was = (await td.api('GET', '/v1/vms/pb')).body
  const cases: Array<[string, unknown, string]> = [
    ['invalid memory', { memoryMiB: 3 }, 'INVALID_INPUT'],
    ['memory of the wrong type', { memoryMiB: '64' }, 'INVALID_INPUT'],
    ['a disk outside the allowed roots', { disks: [...was.definition.disks, { id: 'vdb', file: '/etc/passwd', format: 'raw' }] }, 'INVALID_PATH'],
    ['a kernel outside the allowed roots', { kernel: '/boot/vmlinuz' }, 'INVALID_PATH'],
    ['a name change', { name: 'other' }, 'INVALID_INPUT'],
    ['an unknown field', { colour: 'red' }, 'INVALID_INPUT'],
    ['a patch that is not an object', [{ memoryMiB: 64 }], 'INVALID_INPUT'],
  ]
  for (const [what, body, code] of cases) {
    const r = await td.api('PATCH', '/v1/vms/pb', body, { 'content-type': 'application/merge-patch+json' })
    t.equal(r.status, 400, `${what}: 400`)
    t.equal(r.body?.error?.code, code, `${what}: ${code} (${r.body?.error?.message})`)
  }
  const bad = await td.app.inject({ method: 'PATCH', url: '/v1/vms/pb', headers: { 'content-type': 'application/merge-patch+json' }, payload: '{"memoryMiB": ' })
  t.equal(bad.statusCode, 400, 'malformed JSON under the merge-patch type: 400')
  const now = (await td.api('GET', '/v1/vms/pb')).body
  t.same(now.definition, was.definition, 'the definition is as it was')
  t.equal(now.updatedAt, was.updatedAt, 'the row was not written')
  t.same(td.daemon.vms.record('pb').runtime.disks, [{ id: 'vda', file: was.definition.disks[0].file, format: 'qcow2', gen: 0 }], 'nor the runtime disks')
  t.equal((await td.api('PATCH', '/v1/vms/nosuch', { memoryMiB: 64 })).status, 404, 'an unknown VM: 404')
})

t.test('PATCH of an adopted VM is 409: qmpd does not hold its definition', async (t) => {
  const dir = t.testdir()
  const disk = join(dir, 'boot.qcow2')
  await makeGuestDisk(disk, { format: 'qcow2', sizeMiB: 16, boot: true })
  const raw = await launchRawQemu({ dir, disks: [{ file: disk, format: 'qcow2' }], memoryMiB: 32 })
  t.teardown(() => raw.kill())
  raw.qmp.close() // QEMU's monitor serves one client at a time
  const td = await startTestDaemon(t, { stateDir: join(dir, 'state'), config: { allowedDirs: [dirname(raw.socket)] } })
  t.equal((await td.api('POST', '/v1/vms', { name: 'ad', adopt: { qmpSocket: raw.socket } })).status, 201)
  const r = await td.api('PATCH', '/v1/vms/ad', { memoryMiB: 64 })
  t.equal(r.status, 409)
  t.equal(r.body.error.code, 'NOT_SUPPORTED')
  t.same((await definitionOf(td, 'ad')).adopt, { qmpSocket: raw.socket }, 'the stored adoption is unchanged')
})
