// The stopped VMs' chain cache (src/vm/chain-cache.ts) as GET /v1/vms/{vm} shows it: every qmpd
// operation that changes a chain, and qemu-img run behind qmpd's back, show in the next GET.
import { execFile } from 'node:child_process'
import { rename } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t, { type Test } from 'tap'
import { defineGuestVm, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

const run = promisify(execFile)

t.before(() => {
  requireQemu(t)
})

/** The chain of `file` as qemu-img reads it now (files and virtual sizes, top first). */
async function truth(file: string): Promise<Array<[string, number]>> {
  const { stdout } = await run('qemu-img', ['info', '-U', '--backing-chain', '--output=json', file])
  return (JSON.parse(stdout) as Array<{ filename: string; 'virtual-size': number }>).map((l) => [l.filename, l['virtual-size']])
}

async function shown(td: TestDaemon, vm: string): Promise<Array<[string, number]>> {
  const res = await td.api('GET', `/v1/vms/${vm}`)
  if (res.status !== 200) throw new Error(JSON.stringify(res.body))
  return res.body.disks[0].chain.map((l: { file: string; virtualSize: number }) => [l.file, l.virtualSize])
}

/** GET shows what qemu-img reads now; returns the files. */
async function check(t: Test, td: TestDaemon, vm: string, label: string): Promise<string[]> {
  const active = td.daemon.vms.record(vm).runtime.disks[0]!.file
  const want = await truth(active)
  t.same(await shown(td, vm), want, `${label}: GET shows the chain qemu-img reads (${want.length} layers)`)
  const runs = td.daemon.vms.chainInspections
  await shown(td, vm)
  t.equal(td.daemon.vms.chainInspections, runs, `${label}: the next GET runs no qemu-img`)
  return want.map(([f]) => f)
}

t.test('qemu-img behind qmpd\'s back: new overlays, rebase, a resized lower layer', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'bb')
  const dir = join(td.stateDir, 'vms', 'bb')
  const disk = join(dir, 'disk0.qcow2')
  t.equal((await check(t, td, 'bb', 'defined')).length, 1)
  // The disk becomes an overlay on what it was (same path, new inode).
  await rename(disk, join(dir, 'base.qcow2'))
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(dir, 'base.qcow2'), '-F', 'qcow2', disk])
  t.same(await check(t, td, 'bb', 'qemu-img create -b'), [disk, join(dir, 'base.qcow2')])
  await rename(disk, join(dir, 'mid.qcow2'))
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(dir, 'mid.qcow2'), '-F', 'qcow2', disk])
  t.equal((await check(t, td, 'bb', 'a second overlay')).length, 3)
  // The top header now names the base: mid drops out.
  await run('qemu-img', ['commit', '-q', '-d', join(dir, 'mid.qcow2')])
  await run('qemu-img', ['rebase', '-q', '-u', '-f', 'qcow2', '-b', join(dir, 'base.qcow2'), '-F', 'qcow2', disk])
  t.same(await check(t, td, 'bb', 'qemu-img commit + rebase -u'), [disk, join(dir, 'base.qcow2')])
  // Only the lowest layer changes: its size shows.
  await run('qemu-img', ['resize', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '32M'])
  t.equal((await shown(td, 'bb'))[1]![1], 32 * 1024 * 1024, 'a resized base layer shows its new size')
})

t.test('qmpd\'s own offline operations: snapshot create, commit, revert, delete, PATCH disks', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'qo')
  await check(t, td, 'qo', 'defined')
  for (const name of ['x1', 'x2']) t.equal((await td.api('POST', '/v1/vms/qo/snapshots?wait=true', { name, kind: 'external' })).status, 200, `snapshot ${name}`)
  for (const name of ['x2', 'x1']) t.equal((await td.api('DELETE', `/v1/vms/qo/snapshots/${name}?wait=true&metadataOnly=true`)).status, 200, `forget ${name}`)
  const before = await check(t, td, 'qo', 'after 2 offline snapshots')
  t.equal(before.length, 3)
  const cm = await td.api('POST', '/v1/vms/qo/disks/vda/commit?wait=true', { top: before[1] })
  t.equal(cm.status, 200, `offline intermediate commit: ${cm.status === 200 ? '' : JSON.stringify(cm.body)}`)
  t.same(await check(t, td, 'qo', 'after an offline commit'), [before[0], before[2]])
  for (const name of ['a', 'b', 'c']) {
    const r = await td.api('POST', '/v1/vms/qo/snapshots?wait=true', { name, kind: 'external' })
    t.equal(r.status, 200, `offline external snapshot ${name}: ${r.status === 200 ? '' : JSON.stringify(r.body)}`)
  }
  t.equal((await check(t, td, 'qo', 'after 3 more offline snapshots')).length, 5)
  const rv = await td.api('POST', '/v1/vms/qo/snapshots/b/revert?wait=true', {})
  t.equal(rv.status, 200, 'revert to b')
  await check(t, td, 'qo', 'after revert')
  const del = await td.api('DELETE', '/v1/vms/qo/snapshots/a?wait=true')
  t.equal(del.status, 200, 'delete a')
  await check(t, td, 'qo', 'after delete')
  for (const s of ['b', 'c']) t.equal((await td.api('DELETE', `/v1/vms/qo/snapshots/${s}?wait=true`)).status, 200, `delete ${s}`)
  await check(t, td, 'qo', 'after deleting the others')
  const other = join(td.stateDir, 'vms', 'qo', 'other.qcow2')
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', other, '24M'])
  const p = await td.api('PATCH', '/v1/vms/qo', { disks: [{ id: 'vda', file: other, format: 'qcow2', bus: 'virtio' }] })
  t.equal(p.status, 200, `PATCH disks: ${p.status === 200 ? '' : JSON.stringify(p.body)}`)
  t.same(await check(t, td, 'qo', 'after PATCH disks'), [other])
})
