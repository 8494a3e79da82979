// External system checkpoints (RAM state file + disk overlays from one instant) and memory-only
// checkpoints, against real QEMU: what comes back is exactly the captured instant.
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { buildArgv } from '../../src/vm/argv.ts'
import { QemuImg } from '../../src/images/qemu-img.ts'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { checkDiskAgainstCounter, checkStampsAgainstCounter, GUEST_COUNTER_ADDR, parseCounters } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { diskBytes, dumpRam, maxSlot, restoreWithPlainQemu, revert, slotsOf, snap, stampsOf, type RamImage } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

/** After a paused revert: RAM and every disk describe one and the same guest instant. */
async function checkInstant(t: Test, td: TestDaemon, vm: string, label: string): Promise<RamImage> {
  const ram = await dumpRam(td, vm)
  const { counter, pending, errors } = ram.counters
  t.ok(counter > 0, `${label}: restored counter ${counter}`)
  t.equal(errors, 0, `${label}: no guest disk errors`)
  t.same(checkStampsAgainstCounter(stampsOf(ram), counter, pending), [], `${label}: every stamped page matches the counter`)
  const disks = td.daemon.vms.record(vm).runtime.disks
  for (const [i, d] of disks.entries()) {
    t.same(checkDiskAgainstCounter(slotsOf(await diskBytes(d.file)), counter, pending, i), [], `${label}: disk ${d.id} is from the RAM's instant`)
  }
  return ram
}

const modes = [
  { live: true, method: 'background-snapshot' },
  { live: true, method: 'precopy' },
  { live: false, method: 'paused' },
] as const
for (const { live, method } of modes) {
  t.test(`external checkpoint (${method}): RAM and disks from one instant, revert twice gives the same bytes`, async (t) => {
    const td = await startTestDaemon(t, method === 'precopy' ? { hooks: { snapshots: { backgroundSnapshot: false } } } : {})
    await defineGuestVm(td, 'cp', { disks: 2, stampMiB: 1 })
    await op(td, 'cp', 'start')
    t.ok(await eventually(async () => (await guestCounters(td, 'cp')).counter > 50))
    const before = (await guestCounters(td, 'cp')).counter
    const r = await snap(td, 'cp', { name: 'c1', kind: 'external', memory: true, live })
    const after = (await guestCounters(td, 'cp')).counter
    t.equal(r.snapshot.memory, true)
    t.ok(r.snapshot.vmstateFile && r.snapshot.sizeBytes > 1024 * 1024, 'RAM state file written')
    t.ok(r.downtimeMs > 0, `the guest paused ${r.downtimeMs} ms`)
    if (live) t.ok(r.downtimeMs < 1000, `a live checkpoint pauses the guest briefly (${r.downtimeMs} ms)`)
    // Where the host kernel lacks userfaultfd write-protect, qmpd falls back to pre-copy by itself.
    if (method === 'background-snapshot') t.match(r.snapshot.ramMethod, /^(background-snapshot|precopy)$/)
    else t.equal(r.snapshot.ramMethod, method)
    t.equal((await td.api('GET', '/v1/vms/cp')).body.state, 'running', 'the guest runs after the checkpoint')
    t.ok(await eventually(async () => (await guestCounters(td, 'cp')).counter > after + 50), 'and counts on')

    const first = await revert(td, 'cp', 'c1', { state: 'paused' })
    t.equal(first.state, 'paused')
    const a = await checkInstant(t, td, 'cp', 'first revert')
    t.ok(a.counters.counter >= before && a.counters.counter <= after, `restored counter ${a.counters.counter} lies between ${before} and ${after}`)
    const frozen = r.snapshot.disks.map((d: any) => d.file)
    t.same(
      await Promise.all(td.daemon.vms.record('cp').runtime.disks.map((d) => diskBytes(d.file))),
      await Promise.all(frozen.map((f: string) => diskBytes(f))),
      'disks read what the checkpoint froze',
    )
    await op(td, 'cp', 'resume')
    t.ok(await eventually(async () => (await guestCounters(td, 'cp')).counter > a.counters.counter + 50), 'the guest counts on from the restored counter')
    await revert(td, 'cp', 'c1', { state: 'paused' })
    const b = await checkInstant(t, td, 'cp', 'second revert')
    t.same(b.counters, a.counters, 'second revert restores the same counters')
    t.ok(b.stamps.equals(a.stamps), 'and the same stamped pages, byte for byte')
    const running = await revert(td, 'cp', 'c1')
    t.equal(running.state, 'running', 'a checkpoint reverts to running by default')
  })
}

t.test('memory-only checkpoint: RAM comes back, the revert warns that disks did not', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'mo', { disks: 1, stampMiB: 1 })
  await op(td, 'mo', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 'mo')).counter > 50))
  const r = await snap(td, 'mo', { name: 'm1', kind: 'external', memory: true, disks: { vda: { exclude: true } } })
  t.same(r.snapshot.disks.map((d: any) => d.mode), ['excluded'])
  const rev = await revert(td, 'mo', 'm1', { state: 'paused' })
  t.match(rev.warnings.join(' '), /memory-only checkpoint: disks were not rolled back/)
  const a = await dumpRam(td, 'mo')
  t.same(checkStampsAgainstCounter(stampsOf(a), a.counters.counter, a.counters.pending), [])
  await op(td, 'mo', 'resume')
  t.ok(await eventually(async () => (await guestCounters(td, 'mo')).counter > a.counters.counter + 20))
  await revert(td, 'mo', 'm1', { state: 'paused' })
  const b = await dumpRam(td, 'mo')
  t.same(b.counters, a.counters, 'RAM restored to the same instant again')
  t.ok(b.stamps.equals(a.stamps))
})

t.test('the RAM state file is a plain migration stream: plain qemu-system-x86_64 restores it with -incoming exec:cat', async (t) => {
  const td = await startTestDaemon(t)
  const def = await defineGuestVm(td, 'plain', { disks: 2, stampMiB: 1 })
  await op(td, 'plain', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 'plain')).counter > 50))
  const r = await snap(td, 'plain', { name: 'p1', kind: 'external', memory: true, live: true })
  await op(td, 'plain', 'stop', { force: true })

  // No qmpd from here: fresh overlays on the frozen images, QEMU reads the RAM file through cat.
  const dir = join(td.stateDir, 'plain-restore')
  mkdirSync(dir)
  const img = new QemuImg()
  const disks = []
  for (const [i, d] of r.snapshot.disks.entries()) {
    const file = join(dir, `d${i}.qcow2`)
    await img.create(file, 'qcow2', { backing: { file: d.file, format: d.format } })
    disks.push({ id: d.id, file, format: 'qcow2' as const, gen: 0 })
  }
  const argv = buildArgv({ ...def.definition, serialLog: false }, { accel: 'tcg', disks })
  const qmp = await restoreWithPlainQemu(t, dir, argv, r.snapshot.vmstateFile)
  t.pass('plain QEMU loaded the RAM state')
  const file = join(dir, 'c.bin')
  await qmp.cmd('pmemsave', { val: GUEST_COUNTER_ADDR, size: 16, filename: file })
  const { readFile } = await import('node:fs/promises')
  const c = parseCounters(await readFile(file))
  for (const [i, d] of disks.entries()) {
    t.same(checkDiskAgainstCounter(slotsOf(await diskBytes(d.file)), c.counter, c.pending, i), [], `disk ${d.id} matches the RAM restored by plain QEMU`)
  }
  await qmp.cmd('cont')
  const file2 = join(dir, 'c2.bin')
  t.ok(await eventually(async () => {
    await qmp.cmd('pmemsave', { val: GUEST_COUNTER_ADDR, size: 16, filename: file2 })
    return parseCounters(await readFile(file2)).counter > c.counter + 10
  }), 'and the guest counts on under plain QEMU')
  t.ok(maxSlot(slotsOf(await diskBytes(r.snapshot.disks[0].file))) > 0)
})
