// VM clones from disk snapshots against real QEMU: linked and full clones of a middle snapshot
// (external and internal) hold its disk and boot from it; linked clones keep what they read.
import { execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { checkDiskAgainstCounter, checkStampsAgainstCounter } from '../helpers/guest.ts'
import { diskBytes, dumpRam, revert, slotsOf, snap, stampsOf } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

async function runOn(t: Test, td: TestDaemon, vm: string, by = 40): Promise<void> {
  const c = (await guestCounters(td, vm)).counter
  t.ok(await eventually(async () => (await guestCounters(td, vm)).counter > c + by, 30_000), `${vm}: the guest ran on`)
}

async function clone(t: Test, td: TestDaemon, body: Record<string, unknown>): Promise<any> {
  const res = await td.api('POST', '/v1/vms', body)
  t.equal(res.status, 201, `clone ${JSON.stringify(body)}: ${res.status === 201 ? 'defined' : JSON.stringify(res.body)}`)
  return res.body
}

/** Starts a clone, checks its guest counts (it booted from the cloned boot sector), stops it. */
async function bootsAndCounts(t: Test, td: TestDaemon, vm: string): Promise<void> {
  await op(td, vm, 'start')
  t.ok(await eventually(async () => (await guestCounters(td, vm)).counter > 5, 30_000), `${vm} boots from its cloned disk and counts`)
  await op(td, vm, 'stop', { force: true })
}

t.test('linked and full clones of a middle external snapshot, taken while the source runs', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'src', { disks: 1 })
  await td.api('PATCH', '/v1/vms/src', { nics: [{ id: 'net0', model: 'virtio', user: {} }] })
  await op(td, 'src', 'start')
  const seen: Record<string, Buffer> = {}
  const frozen: Record<string, string> = {}
  for (const name of ['s1', 's2', 's3']) {
    await runOn(t, td, 'src')
    const r = await snap(td, 'src', { name, kind: 'external', memory: false })
    frozen[name] = r.snapshot.disks[0].file
    seen[name] = await diskBytes(frozen[name]!)
  }
  t.notSame(seen['s2'], seen['s3'], 's2 and s3 differ')
  const srcMac = (await td.api('GET', '/v1/vms/src')).body.definition.nics[0].mac

  const lc = await clone(t, td, { name: 'lc', clone: { vm: 'src', snapshot: 's2', linked: true } })
  const fc = await clone(t, td, { name: 'fc', clone: { vm: 'src', snapshot: 's2', linked: false }, labels: { role: 'test' } })
  t.equal(lc.state, 'shutoff', 'a clone is defined stopped')
  t.equal((await td.api('GET', '/v1/vms/src')).body.state, 'running', 'the source ran on')
  t.not(lc.definition.nics[0].mac, srcMac, 'the linked clone\'s NIC has a new MAC')
  t.not(fc.definition.nics[0].mac, srcMac, 'so has the full clone\'s')
  t.same(fc.definition.labels, { role: 'test' }, 'labels come from the request')
  const lcDisk = lc.disks[0].file
  const fcDisk = fc.disks[0].file
  t.equal(lcDisk, join(td.stateDir, 'vms', 'lc', 'vda.qcow2'), 'the clone\'s disk is in its own directory')
  t.equal(lc.disks[0].chain[1]?.file, frozen['s2'], 'the linked clone is backed by s2\'s frozen image')
  t.equal(fc.disks[0].chain.length, 1, 'the full clone is one standalone image')
  t.same(await diskBytes(lcDisk), seen['s2'], 'the linked clone reads what s2 froze')
  t.same(await diskBytes(fcDisk), seen['s2'], 'the full clone reads what s2 froze')
  await bootsAndCounts(t, td, 'lc')
  await bootsAndCounts(t, td, 'fc')
  t.notSame(await diskBytes(lcDisk), seen['s2'], 'the linked clone\'s guest wrote its own disk')
  const fcBooted = await diskBytes(fcDisk)
  t.same(await diskBytes(frozen['s2']!), seen['s2'], 's2\'s frozen image is untouched by the clone')

  // The source keeps what the linked clone reads.
  for (const name of ['s2', 's1']) {
    const del = await td.api('DELETE', `/v1/vms/src/snapshots/${name}?wait=true`)
    t.equal(del.status, 409, `deleting ${name} (which lc reads through) is refused`)
    t.match(del.body.error.message, /linked clones .*\(lc\)/, 'naming the clone')
  }
  t.equal((await td.api('DELETE', '/v1/vms/src/snapshots/s2?metadataOnly=true&wait=true')).status, 409, 'forgetting it too')
  t.equal((await td.api('DELETE', '/v1/vms/src/snapshots/s3?wait=true')).status, 200, 'a snapshot above it may go')
  t.same(await diskBytes(frozen['s2']!), seen['s2'], 's2 still reads the same')
  await op(td, 'src', 'stop', { force: true })
  const vmDel = await td.api('DELETE', '/v1/vms/src?deleteStorage=true')
  t.equal(vmDel.status, 409, 'deleting the source VM\'s storage is refused while lc exists')
  t.match(vmDel.body.error.message, /lc/)
  t.equal((await td.api('DELETE', '/v1/vms/lc?deleteStorage=true')).status, 204, 'the linked clone goes')
  t.notOk(existsSync(lcDisk), 'with its overlay')
  t.ok(existsSync(frozen['s2']!), 'but not the source\'s image')
  t.notOk(td.daemon.repos.snapshots.get('src', 's2')?.clones?.includes('lc'), 'and s2 no longer pins its name')
  // A new VM reusing the name is no clone: it pins nothing.
  await defineGuestVm(td, 'lc', { disks: 1 })
  t.equal((await td.api('DELETE', '/v1/vms/src/snapshots/s2?wait=true')).status, 200, 'then s2 may be deleted')
  t.same(await diskBytes(fcDisk), fcBooted, 'the full clone never depended on it: it reads what its own guest left')
  await bootsAndCounts(t, td, 'fc')
})

t.test('linked and full clones of a middle internal snapshot; bad requests change nothing', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'isrc', { disks: 1 })
  await op(td, 'isrc', 'start')
  for (const name of ['i1', 'i2', 'i3']) {
    await runOn(t, td, 'isrc')
    await snap(td, 'isrc', { name, kind: 'internal', memory: false })
  }
  const disk = td.daemon.vms.record('isrc').runtime.disks[0]!.file
  const lic = await clone(t, td, { name: 'lic', clone: { vm: 'isrc', snapshot: 'i2', linked: true } })
  const fic = await clone(t, td, { name: 'fic', clone: { vm: 'isrc', snapshot: 'i2' } })
  await runOn(t, td, 'isrc')
  await snap(td, 'isrc', { name: 'cp', kind: 'internal', memory: true })
  await op(td, 'isrc', 'stop', { force: true })
  const truth = await diskBytes(disk, { internal: 'i2' })
  t.notSame(await diskBytes(disk), truth, 'the source moved on from i2')
  t.equal(lic.disks[0].chain[1]?.file, join(td.stateDir, 'vms', 'lic', 'vda-base.qcow2'), 'the internal linked clone sits on a base of its own, exported from the tag')
  t.same(await diskBytes(lic.disks[0].file), truth, 'the linked clone reads what i2 holds')
  t.same(await diskBytes(fic.disks[0].file), truth, 'the full clone reads what i2 holds')
  await bootsAndCounts(t, td, 'lic')
  await bootsAndCounts(t, td, 'fic')
  t.equal((await td.api('DELETE', '/v1/vms/isrc/snapshots/i2?wait=true')).status, 200, 'an internal snapshot is not pinned by its clones (they have their own base)')

  // Bad input: a clear error, no VM and no directory made.
  const bad: Array<[unknown, number, RegExp]> = [
    [{ name: 'x1', clone: { vm: 'nope', snapshot: 'i1' } }, 404, /no VM named nope/],
    [{ name: 'x1', clone: { vm: 'isrc', snapshot: 'nope' } }, 404, /no snapshot nope/],
    [{ name: 'lic', clone: { vm: 'isrc', snapshot: 'i1' } }, 409, /already exists/],
    [{ name: 'x1', clone: { vm: 'isrc', snapshot: 'cp', linked: true } }, 409, /internal checkpoint: its fork is a full copy/],
    [{ name: 'x1', clone: { vm: 'isrc', snapshot: 'i1', linked: 'yes' } }, 400, /linked|union|clone/i],
    [{ name: 'x1', clone: { vm: 'isrc', snapshot: 'i1' }, memoryMiB: 64 }, 400, /memoryMiB|union|unrecognized/i],
    [{ name: '../x', clone: { vm: 'isrc', snapshot: 'i1' } }, 400, /name|union/i],
  ]
  for (const [body, status, msg] of bad) {
    const res = await td.api('POST', '/v1/vms', body)
    t.equal(res.status, status, `${JSON.stringify(body)} -> ${status}`)
    t.match(JSON.stringify(res.body.error), msg)
  }
  t.notOk(existsSync(join(td.stateDir, 'vms', 'x1')), 'no directory for a refused clone')
  t.equal((await td.api('GET', '/v1/vms/x1')).status, 404, 'and no VM')

  // start: true starts the clone once defined.
  const started = await clone(t, td, { name: 'x2', clone: { vm: 'isrc', snapshot: 'i1' }, start: true })
  t.equal(started.state, 'running', 'start: true answers with the clone running')
  t.equal(started.clone.start?.state, 'succeeded', 'and its start job\'s outcome')
  t.ok(await eventually(async () => (await guestCounters(td, 'x2')).counter > 5, 30_000), 'x2 boots from its cloned disk and counts')
  await op(td, 'x2', 'stop', { force: true })
})

t.test('a clone of an external checkpoint runs on from its RAM state: a fork', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'csrc', { disks: 1, stampMiB: 1, memoryMiB: 32 })
  await op(td, 'csrc', 'start')
  await runOn(t, td, 'csrc')
  await snap(td, 'csrc', { name: 'cp', kind: 'external', memory: true })
  await runOn(t, td, 'csrc')
  const fork = await clone(t, td, { name: 'fork', clone: { vm: 'csrc', snapshot: 'cp', linked: true } })
  t.equal(fork.state, 'saved', 'the fork waits to load the checkpoint\'s RAM state at its first start')
  t.equal(fork.clone.ramState, true)
  const t0 = Date.now()
  await op(td, 'fork', 'start', { paused: true })
  t.comment(`the fork's first start (load of the RAM state) took ${Date.now() - t0} ms`)
  const forkRam = await dumpRam(td, 'fork', 1)
  // The truth: the source reverted to the same checkpoint.
  await revert(td, 'csrc', 'cp', { state: 'paused' })
  const srcRam = await dumpRam(td, 'csrc', 1)
  const c = forkRam.counters.counter
  t.ok(c > 0, `the fork's guest RAM holds the checkpoint's counter (${c})`)
  t.same(forkRam.counters, srcRam.counters, 'the fork\'s counters are the checkpoint\'s (the source reverted to it)')
  t.ok(forkRam.stamps.equals(srcRam.stamps), 'and so is every stamped page')
  t.same(checkStampsAgainstCounter(stampsOf(forkRam), c, forkRam.counters.pending), [], 'the stamps agree with the counter')
  const forkDisk = td.daemon.vms.record('fork').runtime.disks[0]!.file
  t.same(checkDiskAgainstCounter(slotsOf(await diskBytes(forkDisk)), c, forkRam.counters.pending, 0), [], 'the fork\'s disk is from the same instant as its RAM')
  await op(td, 'fork', 'resume')
  t.ok(await eventually(async () => (await guestCounters(td, 'fork')).counter > c + 20, 30_000), 'the fork runs on from there')
  t.notOk(existsSync(join(td.stateDir, 'vms', 'fork', 'managed.save')), 'its copy of the RAM state went once loaded')
  await op(td, 'fork', 'stop', { force: true })
  // start: true on a fork: it runs on from the checkpoint's counter, not from a fresh boot.
  const f2 = await clone(t, td, { name: 'fork2', clone: { vm: 'csrc', snapshot: 'cp' }, start: true })
  t.equal(f2.state, 'running', 'a fork with start: true answers running')
  const c2 = (await guestCounters(td, 'fork2')).counter
  t.ok(c2 >= c, `its guest's counter (${c2}) starts at the checkpoint's (${c}), not at a fresh boot's 0`)
  await op(td, 'fork2', 'stop', { force: true })
  await op(td, 'csrc', 'stop', { force: true })
})

t.test('a clone of an internal checkpoint is a fork: whole copies keep the tag, a revert to it runs on from its RAM', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'isrc', { disks: 1, stampMiB: 1, memoryMiB: 32 })
  await op(td, 'isrc', 'start')
  await runOn(t, td, 'isrc')
  await snap(td, 'isrc', { name: 'early', kind: 'internal', memory: false })
  await runOn(t, td, 'isrc')
  await snap(td, 'isrc', { name: 'icp', kind: 'internal', memory: true })
  await runOn(t, td, 'isrc')
  const running = await td.api('POST', '/v1/vms', { name: 'ifork', clone: { vm: 'isrc', snapshot: 'icp' } })
  t.equal(running.status, 409, 'refused while the source\'s QEMU has the images open')
  t.match(running.body.error.message, /stop it first/)
  t.notOk(existsSync(join(td.stateDir, 'vms', 'ifork')), 'and nothing made')
  await op(td, 'isrc', 'stop', { force: true })
  const srcDisk = td.daemon.vms.record('isrc').runtime.disks[0]!.file
  const srcBefore = await diskBytes(srcDisk)
  const t0 = Date.now()
  const fork = await clone(t, td, { name: 'ifork', clone: { vm: 'isrc', snapshot: 'icp' } })
  t.comment(`the fork's copy took ${Date.now() - t0} ms`)
  t.equal(fork.state, 'shutoff', 'the fork is defined stopped')
  t.match(fork.clone.warnings.join(' '), /revert to it/, 'the answer says how to run it from the RAM state')
  const forkDisk = fork.disks[0].file
  t.equal(forkDisk, join(td.stateDir, 'vms', 'ifork', 'vda.qcow2'))
  const tags = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', forkDisk], { encoding: 'utf8' })).snapshots.map((x: { name: string }) => x.name)
  t.same(tags, ['icp'], 'the copy keeps only the checkpoint\'s tag')
  t.same((await td.api('GET', '/v1/vms/ifork/snapshots')).body.snapshots.map((x: { name: string }) => x.name), ['icp'], 'the fork lists the checkpoint as its own snapshot')
  t.same(await diskBytes(srcDisk), srcBefore, 'the source\'s image is untouched')

  await revert(td, 'ifork', 'icp', { state: 'paused' })
  const forkRam = await dumpRam(td, 'ifork', 1)
  await revert(td, 'isrc', 'icp', { state: 'paused' })
  const srcRam = await dumpRam(td, 'isrc', 1)
  const c = forkRam.counters.counter
  t.ok(c > 0, `the fork's guest RAM holds the checkpoint's counter (${c})`)
  t.same(forkRam.counters, srcRam.counters, 'the fork\'s counters are the checkpoint\'s (the source reverted to it)')
  t.ok(forkRam.stamps.equals(srcRam.stamps), 'and so is every stamped page')
  t.same(checkStampsAgainstCounter(stampsOf(forkRam), c, forkRam.counters.pending), [], 'the stamps agree with the counter')
  t.same(checkDiskAgainstCounter(slotsOf(await diskBytes(forkDisk)), c, forkRam.counters.pending, 0), [], 'the fork reads the checkpoint\'s disk, of the same instant as its RAM')
  await op(td, 'ifork', 'resume')
  t.ok(await eventually(async () => (await guestCounters(td, 'ifork')).counter > c + 20, 30_000), 'the fork runs on from there')
  await op(td, 'ifork', 'stop', { force: true })
  await op(td, 'isrc', 'stop', { force: true })

  // start: true: the fork runs at once, from the checkpoint's counter.
  const f2 = await clone(t, td, { name: 'ifork2', clone: { vm: 'isrc', snapshot: 'icp' }, start: true })
  t.equal(f2.state, 'running', 'start: true answers with the fork running')
  t.equal(f2.clone.start?.state, 'succeeded')
  const c2 = (await guestCounters(td, 'ifork2')).counter
  t.ok(c2 >= c, `its counter (${c2}) starts at the checkpoint's (${c}), not at a fresh boot's 0`)
  await op(td, 'ifork2', 'stop', { force: true })
  t.equal((await td.api('DELETE', '/v1/vms/ifork2?deleteStorage=true')).status, 204, 'a fork is deleted like any VM')
  t.notOk(existsSync(join(td.stateDir, 'vms', 'ifork2', 'vda.qcow2')), 'with its copy')
})
