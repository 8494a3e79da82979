// Internal and external snapshots on one VM against real QEMU: tags in the image active at their
// instant, reverts in several orders read back exactly, deletes keep every tag or refuse (409).
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { checkDiskAgainstCounter, checkStampsAgainstCounter } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { diskBytes, dumpRam, revert, slotsOf, snap, stampsOf } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

const VM = 'mix'
const files = (td: TestDaemon) => td.daemon.vms.record(VM).runtime.disks.map((d) => d.file)
const now = (td: TestDaemon) => Promise.all(files(td).map((f) => diskBytes(f)))
const tagsOf = async (file: string) => {
  const { QemuImg } = await import('../../src/images/qemu-img.ts')
  return ((await new QemuImg().info(file, { forceShare: true })).snapshots ?? []).map((s) => s.name).sort()
}

async function runOn(t: Test, td: TestDaemon, by = 40): Promise<void> {
  const c = (await guestCounters(td, VM)).counter
  t.ok(await eventually(async () => (await guestCounters(td, VM)).counter > c + by), 'the guest ran on')
}

t.test('mixed internal/external snapshots revert exactly', async (t) => {
  const started = performance.now()
  const td = await startTestDaemon(t)
  const dir = join(td.stateDir, 'vms', VM)
  await defineGuestVm(td, VM, { disks: 2, stampMiB: 1 })
  await op(td, VM, 'start')
  await runOn(t, td)
  const seen: Record<string, Buffer[]> = {}
  const where: Record<string, string[]> = {}
  // int1 (in the base images), ext1, int2 (in ext1's overlays), ext2, a checkpoint ck (in ext2's overlays).
  for (const body of [
    { name: 'int1', kind: 'internal', memory: false },
    { name: 'ext1', kind: 'external', memory: false },
    { name: 'int2', kind: 'internal', memory: false },
    { name: 'ext2', kind: 'external', memory: false },
    { name: 'ck', kind: 'internal', memory: true },
  ]) {
    const before = files(td)
    const r = await snap(td, VM, body)
    where[body.name] = r.snapshot.disks.map((d: any) => d.file)
    t.same(where[body.name], before, `${body.name} records the images active at its instant`)
    seen[body.name] = await Promise.all(where[body.name]!.map((f) => diskBytes(f, body.kind === 'internal' ? { internal: body.name } : {})))
    await runOn(t, td)
  }
  t.same(where.int1, [join(dir, 'disk0.qcow2'), join(dir, 'disk1.qcow2')])
  t.same(where.int2, [join(dir, 'vda-ext1.qcow2'), join(dir, 'vdb-ext1.qcow2')], 'int2 is in the overlays of ext1')
  t.same(where.ck, [join(dir, 'vda-ext2.qcow2'), join(dir, 'vdb-ext2.qcow2')], 'ck is in the overlays of ext2')
  t.same(await tagsOf(where.int1![0]!), ['int1'])
  t.same(await tagsOf(where.int2![0]!), ['int2'])
  t.same(await tagsOf(where.ck![0]!), ['ck'])
  // A pull into the active layer would change what ck's tag reads through its backing.
  const pull = await td.api('POST', `/v1/vms/${VM}/disks/vda/pull?wait=true`, {})
  t.equal(pull.status, 409, 'a pull under a tag is refused')
  t.same(pull.body.error.details.tags, ['ck'], 'naming the tag')
  t.same(files(td), where.ck, 'nothing moved')
  const ckSlots = slotsOf(seen.ck![0]!)
  t.ok(ckSlots.some((s) => s), 'the guest had written before ck')

  // int1 from a running VM: its images are frozen (ext1 froze them): a copy goes on top.
  await revert(td, VM, 'int1')
  t.same(await now(td), seen.int1, 'int1 reads back exactly')
  t.same(files(td), [join(dir, 'vda-int1-r1.qcow2'), join(dir, 'vdb-int1-r1.qcow2')], 'the disks run on copies of the tagged images')
  t.same(await tagsOf(files(td)[0]!), [], 'the copy holds no tag')
  t.same(await Promise.all(where.ext1!.map((f) => diskBytes(f))), seen.ext1, 'the frozen images still read as ext1 froze them')
  t.same(await Promise.all(where.int1!.map((f) => diskBytes(f, { internal: 'int1' }))), seen.int1, 'the int1 tags are untouched')

  // ck: its images are off the chain and nothing reads their current state: back on top, snapshot-load.
  await revert(td, VM, 'ck', { state: 'paused' })
  t.same(files(td), where.ck, 'ck\'s images are the active layers again')
  t.notOk(existsSync(join(dir, 'vda-int1-r1.qcow2')), 'the copy with the discarded state is gone')
  const a = await dumpRam(td, VM)
  t.same(checkStampsAgainstCounter(stampsOf(a), a.counters.counter, a.counters.pending), [], 'RAM stamps match the restored counter')
  for (const [i, f] of files(td).entries()) {
    t.same(checkDiskAgainstCounter(slotsOf(await diskBytes(f)), a.counters.counter, a.counters.pending, i), [], `disk ${i} is from the RAM's instant`)
  }
  t.same(await now(td), seen.ck, 'ck\'s disks read back exactly')
  await op(td, VM, 'resume')
  await runOn(t, td)
  await op(td, VM, 'stop', { force: true })

  // int2 offline: in ext1's overlays, which ext2 froze: a copy again.
  await revert(td, VM, 'int2')
  t.same(await now(td), seen.int2, 'int2 reads back exactly')
  await revert(td, VM, 'ext1')
  t.same(await now(td), seen.ext1, 'ext1 reads back exactly')
  const cold = await revert(td, VM, 'ck', { state: 'paused' })
  t.equal(cold.state, 'paused')
  const b = await dumpRam(td, VM)
  t.same(b.counters, a.counters, 'ck\'s RAM comes back the same from shutoff')
  t.ok(b.stamps.equals(a.stamps), 'byte for byte')
  t.same(await now(td), seen.ck, 'and its disks too')
  await op(td, VM, 'stop', { force: true })
  await revert(td, VM, 'ext2')
  t.same(await now(td), seen.ext2, 'ext2 reads back exactly')
  await revert(td, VM, 'int1')
  t.same(await now(td), seen.int1, 'int1 again')
  await revert(td, VM, 'int2')
  t.same(await now(td), seen.int2, 'int2 again')

  // Deletes: a tag in a backing file goes offline and the images above read the same.
  const del = (name: string) => td.api('DELETE', `/v1/vms/${VM}/snapshots/${name}?wait=true&timeoutSec=120`)
  t.equal((await del('int2')).status, 200, 'int2 deleted (its tag was in a frozen image)')
  t.same(await tagsOf(where.int2![0]!), [], 'the tag is gone from ext1\'s overlay')
  t.same(await Promise.all(where.ext2!.map((f) => diskBytes(f))), seen.ext2, 'what ext2 froze reads the same')
  t.same(await Promise.all(where.ck!.map((f) => diskBytes(f, { internal: 'ck' }))), seen.ck, 'ck above it reads the same')
  // ext2's image has one child that holds ck: committing it would lose ck.
  const listBefore = (await td.api('GET', `/v1/vms/${VM}/snapshots`)).body.snapshots.map((s: any) => s.name)
  const filesBefore = files(td)
  const refused = await del('ext2')
  t.equal(refused.status, 409, 'a delete that would lose a tag is refused')
  t.match(refused.body.error.message, /would lose internal snapshot ck/)
  t.same(refused.body.error.details.tags, ['ck'], 'the refusal names the tag')
  t.same((await td.api('GET', `/v1/vms/${VM}/snapshots`)).body.snapshots.map((s: any) => s.name), listBefore, 'no snapshot went')
  t.same(files(td), filesBefore, 'no disk moved')
  t.same(await tagsOf(where.ck![0]!), ['ck'], 'ck is still there')
  // Live, a tag in a backing file of the running chain cannot be deleted (QEMU holds it read-only).
  // Paused: a guest booted afresh on ext2 would write its slots before the stop below, and the
  // deletes further down compare the disks with what ext2 froze.
  await revert(td, VM, 'ext2', { state: 'paused' })
  const live = await del('int1')
  t.equal(live.status, 409, 'int1 live: refused')
  t.match(live.body.error.message, /backing file of the running VM/)
  t.same(await tagsOf(where.int1![0]!), ['int1'], 'nothing changed')
  await op(td, VM, 'stop', { force: true })
  t.equal((await del('int1')).status, 200, 'int1 deleted offline')
  t.same(await tagsOf(where.int1![0]!), [])
  t.same(await Promise.all(where.ext1!.map((f) => diskBytes(f))), seen.ext1, 'what ext1 froze reads the same')
  t.equal((await del('ck')).status, 200, 'ck deleted')
  t.equal((await del('ext2')).status, 200, 'ext2 deletes once no tag depends on it')
  t.same(await now(td), seen.ext2, 'the disks still read what ext2 froze')
  t.equal((await del('ext1')).status, 200, 'ext1 deleted')
  t.same(await now(td), seen.ext2, 'and after ext1 went too')
  await op(td, VM, 'start')
  await runOn(t, td)
  t.comment(`took ${Math.round((performance.now() - started) / 1000)} s`)
})
