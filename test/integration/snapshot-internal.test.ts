// Internal disk snapshots and internal system checkpoints (inside the qcow2s), live and offline.
import t, { type Test } from 'tap'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { checkDiskAgainstCounter, checkStampsAgainstCounter } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { diskBytes, dumpRam, maxSlot, slotsOf, stampsOf, revert, snap } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

const files = (td: TestDaemon, vm: string) => td.daemon.vms.record(vm).runtime.disks.map((d) => d.file)

async function runOn(t: Test, td: TestDaemon, vm: string, by = 70): Promise<void> {
  const c = (await guestCounters(td, vm)).counter
  t.ok(await eventually(async () => (await guestCounters(td, vm)).counter > c + by), 'the guest ran on')
}

t.test('internal disk snapshots, live on two disks at once and offline; revert and delete', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'ids', { disks: 2 })
  await op(td, 'ids', 'start')
  await runOn(t, td, 'ids')
  const seen: Record<string, Buffer[]> = {}
  for (const name of ['i1', 'i2', 'i3']) {
    const r = await snap(td, 'ids', { name, kind: 'internal', memory: false })
    t.equal(r.downtimeMs, 0, 'no guest pause')
    // Read the tag's own data straight out of each qcow2.
    seen[name] = await Promise.all(files(td, 'ids').map((f) => diskBytes(f, { internal: name })))
    const c = maxSlot(slotsOf(seen[name][1]!))
    t.same(checkDiskAgainstCounter(slotsOf(seen[name][0]!), c, c + 1, 0), [], `${name}: both disks from one instant (atomic transaction)`)
    await runOn(t, td, 'ids')
  }
  t.same((await td.api('GET', '/v1/vms/ids/snapshots')).body.snapshots.map((s: any) => s.parent ?? null), [null, 'i1', 'i2'])
  const r2 = await revert(td, 'ids', 'i2')
  t.equal(r2.state, 'shutoff')
  t.same(await Promise.all(files(td, 'ids').map((f) => diskBytes(f))), seen['i2'], 'disks read back what i2 held')
  // Offline: take one more, then go back to i1 and forward to it.
  const off = await snap(td, 'ids', { name: 'off1', kind: 'internal' })
  t.equal(off.snapshot.memory, false, 'memory defaults to false for a shut-off VM')
  t.equal(off.snapshot.parent, 'i2')
  await revert(td, 'ids', 'i1', { state: 'running' })
  t.equal((await td.api('GET', '/v1/vms/ids')).body.state, 'running', 'booted after the revert on request')
  await op(td, 'ids', 'stop', { force: true })
  await revert(td, 'ids', 'off1')
  t.same(await Promise.all(files(td, 'ids').map((f) => diskBytes(f))), seen['i2'], 'off1 (taken right after reverting to i2) reads as i2')
  // Delete live and offline; the tags disappear from the qcow2s.
  await op(td, 'ids', 'start')
  t.equal((await td.api('DELETE', '/v1/vms/ids/snapshots/i2?wait=true')).status, 200)
  await op(td, 'ids', 'stop', { force: true })
  t.equal((await td.api('DELETE', '/v1/vms/ids/snapshots/i3?wait=true')).status, 200)
  const { QemuImg } = await import('../../src/images/qemu-img.ts')
  const tags = (await new QemuImg().chain(files(td, 'ids')[0]!))[0]!.snapshots!.map((s) => s.name)
  t.same(tags.sort(), ['i1', 'off1'], 'only the remaining tags are in the image')
  t.same((await td.api('GET', '/v1/vms/ids/snapshots/off1')).body.parent, 'i1', 'off1 re-parented onto i1')
  t.same(await Promise.all(files(td, 'ids').map((f) => diskBytes(f, { internal: 'i1' }))), seen['i1'], 'i1 is untouched')
})

t.test('internal system checkpoint: snapshot-save pauses the guest for the save; revert live and from shutoff', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'ick', { disks: 2, stampMiB: 1 })
  await op(td, 'ick', 'start')
  await runOn(t, td, 'ick', 50)
  const r = await snap(td, 'ick', { name: 'k1', kind: 'internal' })
  t.equal(r.snapshot.memory, true, 'memory defaults to true for a running VM')
  t.equal(r.snapshot.vmstateDisk, 'vda')
  t.ok(r.downtimeMs > 0, `the guest paused ${r.downtimeMs} ms for the save`)
  t.ok(r.snapshot.sizeBytes > 1024 * 1024, `vmstate of ${r.snapshot.sizeBytes} bytes inside the qcow2`)
  t.equal((await td.api('GET', '/v1/vms/ick')).body.state, 'running')
  await runOn(t, td, 'ick')

  const live = await revert(td, 'ick', 'k1', { state: 'paused' })
  t.ok(live.downtimeMs >= 0)
  const a = await dumpRam(td, 'ick')
  t.same(checkStampsAgainstCounter(stampsOf(a), a.counters.counter, a.counters.pending), [], 'stamps match the restored counter')
  for (const [i, f] of files(td, 'ick').entries()) {
    t.same(checkDiskAgainstCounter(slotsOf(await diskBytes(f)), a.counters.counter, a.counters.pending, i), [], `disk ${i} is from the RAM's instant`)
  }
  await op(td, 'ick', 'resume')
  await runOn(t, td, 'ick')
  await op(td, 'ick', 'stop', { force: true })
  const cold = await revert(td, 'ick', 'k1', { state: 'paused' })
  t.equal(cold.state, 'paused', 'a shut-off VM is started paused and loaded')
  const b = await dumpRam(td, 'ick')
  t.same(b.counters, a.counters, 'the same instant comes back from shutoff')
  t.ok(b.stamps.equals(a.stamps), 'byte for byte')
  await op(td, 'ick', 'resume')
  t.ok(await eventually(async () => (await guestCounters(td, 'ick')).counter > b.counters.counter + 20), 'counts on')
  t.equal((await td.api('DELETE', '/v1/vms/ick/snapshots/k1?wait=true')).status, 200)
  t.same((await td.api('GET', '/v1/vms/ick/snapshots')).body.snapshots, [])
})

t.test('delete with children=true removes the whole subtree; metadataOnly touches no file', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'tree', { disks: 1 })
  for (const name of ['a', 'b', 'c']) t.equal((await td.api('POST', '/v1/vms/tree/snapshots?wait=true', { name, kind: 'internal' })).status, 200, `offline ${name}`)
  await revert(td, 'tree', 'a')
  t.equal((await td.api('POST', '/v1/vms/tree/snapshots?wait=true', { name: 'a2', kind: 'internal' })).status, 200, 'a branch off a')
  const { QemuImg } = await import('../../src/images/qemu-img.ts')
  const tags = async () => ((await new QemuImg().chain(files(td, 'tree')[0]!))[0]!.snapshots ?? []).map((s) => s.name).sort()
  t.same(await tags(), ['a', 'a2', 'b', 'c'])
  const meta = await td.api('DELETE', '/v1/vms/tree/snapshots/a2?wait=true&metadataOnly=true')
  t.equal(meta.status, 200)
  t.same(await tags(), ['a', 'a2', 'b', 'c'], 'metadataOnly leaves the tag in the image')
  const sub = await td.api('DELETE', '/v1/vms/tree/snapshots/b?wait=true&children=true')
  t.equal(sub.status, 200)
  t.same(sub.body.result.deleted, ['c', 'b'], 'children first, then the snapshot')
  t.same(await tags(), ['a', 'a2'])
  t.same((await td.api('GET', '/v1/vms/tree/snapshots')).body.snapshots.map((s: any) => s.name), ['a'])
})
