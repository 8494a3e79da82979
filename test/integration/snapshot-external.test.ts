// External disk snapshots and checkpoints against real QEMU: chains, branches, revert, delete,
// atomicity, proven from outside (qemu-img for disks, pmemsave for RAM).
import { existsSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { checkDiskAgainstCounter } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { diskBytes, maxSlot, slotsOf, revert, snap } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

async function activeFiles(td: TestDaemon, vm: string): Promise<string[]> {
  return td.daemon.vms.record(vm).runtime.disks.map((d) => d.file)
}

/** Both disks' bytes as the snapshot froze them, checked to be one instant across the two disks. */
async function frozen(t: Test, s: any): Promise<Buffer[]> {
  const bytes = await Promise.all(s.disks.map((d: any) => diskBytes(d.file)))
  const c = maxSlot(slotsOf(bytes[1])) // disk 1 is written second in each iteration
  t.ok(c > 0, `snapshot ${s.name}: the guest had written`)
  t.same(checkDiskAgainstCounter(slotsOf(bytes[1]), c, c + 1, 1), [], `${s.name}: disk 1 consistent at counter ${c}`)
  t.same(checkDiskAgainstCounter(slotsOf(bytes[0]), c, c + 1, 0), [], `${s.name}: disk 0 is from the same instant as disk 1`)
  return bytes
}

t.test('external disk snapshots: a chain of three, revert to each, a branch, delete in the middle while running', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'ext', { disks: 2 })
  await op(td, 'ext', 'start')
  const seen: Record<string, Buffer[]> = {}
  const wait = async () => {
    const c = (await guestCounters(td, 'ext')).counter
    t.ok(await eventually(async () => (await guestCounters(td, 'ext')).counter > c + 70), 'the guest ran on')
  }
  for (const name of ['s1', 's2', 's3']) {
    await wait()
    const r = await snap(td, 'ext', { name, kind: 'external', memory: false })
    t.equal(r.snapshot.kind, 'external')
    t.equal(r.snapshot.memory, false)
    t.equal(r.snapshot.current, true)
    t.equal(r.downtimeMs, 0, 'a disk-only external snapshot does not pause the guest')
    seen[name] = await frozen(t, r.snapshot)
  }
  const list = (await td.api('GET', '/v1/vms/ext/snapshots')).body.snapshots
  t.same(list.map((s: any) => [s.name, s.parent ?? null, s.children]), [['s1', null, ['s2']], ['s2', 's1', ['s3']], ['s3', 's2', []]])
  const vm = (await td.api('GET', '/v1/vms/ext')).body
  t.equal(vm.disks[0].chain.length, 4, 'QEMU runs on base + 3 overlays')
  t.equal(vm.disks[0].chain[0].file, join(td.stateDir, 'vms', 'ext', 'vda-s3.qcow2'))

  // Revert to the oldest: QEMU stops, the disks read exactly what s1 froze.
  const r1 = await revert(td, 'ext', 's1')
  t.equal(r1.state, 'shutoff', 'disk-only revert leaves the VM off by default')
  const files = await activeFiles(td, 'ext')
  t.same(await Promise.all(files.map((f) => diskBytes(f))), seen['s1'], 'both disks read back what s1 froze')
  t.notOk(existsSync(join(td.stateDir, 'vms', 'ext', 'vda-s3.qcow2')), 'the overlay with the discarded state is gone')

  // A branch from s1.
  await op(td, 'ext', 'start')
  await wait()
  seen['b1'] = await frozen(t, (await snap(td, 'ext', { name: 'b1', kind: 'external', memory: false })).snapshot)
  t.equal((await td.api('GET', '/v1/vms/ext/snapshots/b1')).body.parent, 's1', 'b1 branches off s1')
  t.same((await td.api('GET', '/v1/vms/ext/snapshots/s1')).body.children.sort(), ['b1', 's2'])

  for (const name of ['s3', 's2', 'b1']) {
    await revert(td, 'ext', name, { state: 'paused' })
    t.equal((await td.api('GET', '/v1/vms/ext')).body.state, 'paused')
    t.same(await Promise.all((await activeFiles(td, 'ext')).map((f) => diskBytes(f))), seen[name], `${name} reads back exactly, on its branch`)
  }

  // Delete s2 (the middle of the s1-s2-s3 branch) while the VM runs on the b1 branch.
  await op(td, 'ext', 'resume')
  await wait()
  await op(td, 'ext', 'pause')
  const before = await Promise.all((await activeFiles(td, 'ext')).map((f) => diskBytes(f)))
  const del = await td.api('DELETE', '/v1/vms/ext/snapshots/s2?wait=true')
  t.equal(del.status, 200, 'deleting s2 succeeded')
  t.same(await Promise.all((await activeFiles(td, 'ext')).map((f) => diskBytes(f))), before, 'the current disks read the same after the delete')
  t.same((await td.api('GET', '/v1/vms/ext/snapshots/s3')).body.parent, 's1', 's3 now hangs off s1')
  for (const name of ['s3', 's1', 'b1']) {
    await revert(td, 'ext', name, { state: 'paused' })
    t.same(await Promise.all((await activeFiles(td, 'ext')).map((f) => diskBytes(f))), seen[name], `${name} still reads back exactly after s2 went`)
  }
  // Delete s1, which two branches (s3 and b1) share, while the VM runs on b1.
  await op(td, 'ext', 'resume')
  const d1 = await td.api('DELETE', '/v1/vms/ext/snapshots/s1?wait=true')
  t.equal(d1.status, 200, 'deleting s1 succeeded')
  t.match(JSON.stringify(d1.body.result), /streamed/, 'a shared image is streamed into each branch')
  for (const name of ['s3', 'b1']) {
    await revert(td, 'ext', name, { state: 'paused' })
    t.same(await Promise.all((await activeFiles(td, 'ext')).map((f) => diskBytes(f))), seen[name], `${name} reads back exactly after s1 went`)
  }
  // Everything qmpd created and still tracks exists; nothing else of ours lingers.
  const tracked = new Set(td.daemon.repos.snapshots.images('ext').map((i) => i.file))
  const leftovers = readdirSync(join(td.stateDir, 'vms', 'ext')).filter((f) => f.endsWith('.qcow2') && !tracked.has(join(td.stateDir, 'vms', 'ext', f)))
  t.same(leftovers, [], 'no untracked image files left behind')
})

t.test('live deletes after a restart of QEMU, and a delete whose image has a branch outside the running chain', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'rd', { disks: 1 })
  await op(td, 'rd', 'start')
  const seen: Record<string, Buffer[]> = {}
  const runOn = async () => {
    const c = (await guestCounters(td, 'rd')).counter
    await eventually(async () => (await guestCounters(td, 'rd')).counter > c + 70)
  }
  for (const name of ['s1', 's2', 's3']) {
    await runOn()
    const r = await snap(td, 'rd', { name, kind: 'external', memory: false })
    seen[name] = await Promise.all(r.snapshot.disks.map((d: any) => diskBytes(d.file)))
  }
  // QEMU restarted: the chain is now opened from the top overlay's header.
  await op(td, 'rd', 'stop', { force: true })
  await op(td, 'rd', 'start')
  await runOn()
  t.equal((await td.api('DELETE', '/v1/vms/rd/snapshots/s3?wait=true')).status, 200, 'live delete of s3 (active commit)')
  t.equal((await td.api('DELETE', '/v1/vms/rd/snapshots/s2?wait=true')).status, 200, 'then of s2: the commit left no stale node behind')
  await revert(td, 'rd', 's1', { state: 'paused' })
  t.same(await Promise.all((await activeFiles(td, 'rd')).map((f) => diskBytes(f))), seen['s1'], 's1 reads back exactly')

  // A branch: s4, s5 on top of s1, revert to s4 and run there, then delete s1 (whose image's child
  // is in the running chain) while s5 lives on another branch of that child.
  await op(td, 'rd', 'resume')
  for (const name of ['s4', 's5']) {
    await runOn()
    const r = await snap(td, 'rd', { name, kind: 'external', memory: false })
    seen[name] = await Promise.all(r.snapshot.disks.map((d: any) => diskBytes(d.file)))
  }
  await revert(td, 'rd', 's4', { state: 'running' })
  await runOn()
  t.equal((await td.api('DELETE', '/v1/vms/rd/snapshots/s1?wait=true')).status, 200, 'delete s1 while running on the s4 branch')
  for (const name of ['s5', 's4']) {
    await revert(td, 'rd', name, { state: 'paused' })
    t.same(await Promise.all((await activeFiles(td, 'rd')).map((f) => diskBytes(f))), seen[name], `${name} still reads back exactly`)
  }
})

t.test('disk-only snapshots of many VMs switch disks a few at a time (parallelDiskSnapshots)', async (t) => {
  let inFlight = 0
  let most = 0
  const td = await startTestDaemon(t, {
    config: { parallelDiskSnapshots: 2 },
    hooks: {
      snapshots: {
        // Runs inside the slot, right before the transaction goes to QEMU.
        transaction: async () => {
          most = Math.max(most, ++inFlight)
          await new Promise((r) => setTimeout(r, 150))
          inFlight--
        },
      },
    },
  })
  const vms = ['p0', 'p1', 'p2', 'p3', 'p4']
  for (const vm of vms) {
    await defineGuestVm(td, vm)
    await op(td, vm, 'start')
  }
  const results = await Promise.all(
    vms.map((vm, i) =>
      td.api('POST', `/v1/vms/${vm}/snapshots?wait=true`, { name: 's1', kind: i === 4 ? 'internal' : 'external', memory: false }),
    ),
  )
  t.same(
    results.map((r) => r.status),
    [200, 200, 200, 200, 200],
    'every snapshot succeeds',
  )
  t.equal(most, 2, 'never more than two transactions in QEMU at once, and two did run together')
  for (const vm of vms) t.equal((await td.api('GET', `/v1/vms/${vm}/snapshots`)).body.snapshots.length, 1, `${vm} has its snapshot`)
  const ext = (await td.api('GET', '/v1/vms/p0')).body.disks[0].chain.length
  t.equal(ext, 2, 'an external one put its overlay on top')
})
