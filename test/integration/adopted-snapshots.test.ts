// Snapshots of QEMUs qmpd adopted, launched here as an integration suite would (-blockdev with node
// names, and -drive): every in-place kind, proved by the guest's RAM and disk sectors; what would
// need a new QEMU is refused with 409 ADOPTED_NEEDS_RELAUNCH.
import { existsSync } from 'node:fs'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { waitForExit } from '../../src/vm/proc.ts'
import { eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { checkDiskAgainstCounter, makeGuestDisk } from '../helpers/guest.ts'
import { launchRawQemu, requireQemu, type RawQemu } from '../helpers/qemu.ts'
import { diskBytes, dumpRam, liveDiskBytes, maxSlot, revert, slotsOf, snap } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

type Mode = 'blockdev' | 'drive'

/** The device id qmpd should find for the boot disk in each mode. */
const DISK_ID: Record<Mode, string> = { blockdev: 'vda', drive: 'drv0' }

/**
 * Starts the counting guest on `disk` the way a test suite would, QMP socket in `sockDir`:
 * -blockdev with node names and a -device id, or a plain -drive (generated node names, no qdev
 * id) plus an empty CD-ROM drive that qmpd must leave out. Returns it running, monitor released.
 */
async function launchGuest(t: Test, mode: Mode, sockDir: string, disk: string): Promise<RawQemu> {
  const extraArgs =
    mode === 'blockdev'
      ? [
          '-blockdev', JSON.stringify({ 'node-name': 'boot-file', driver: 'file', filename: disk }),
          '-blockdev', JSON.stringify({ 'node-name': 'boot', driver: 'qcow2', file: 'boot-file' }),
          '-device', 'virtio-blk-pci,drive=boot,id=vda,bootindex=1',
        ]
      : ['-drive', `file=${disk},format=qcow2,if=virtio,id=drv0`, '-drive', 'if=ide,media=cdrom,id=cd0']
  const raw = await launchRawQemu({ dir: sockDir, disks: [], memoryMiB: 32, extraArgs })
  t.teardown(() => raw.kill())
  await raw.qmp.cmd('cont')
  raw.qmp.close() // QEMU's monitor serves one client at a time: qmpd's, from now on
  return raw
}

/** Pauses the guest, reads its counters and the disk as QEMU sees it, resumes. */
async function pausedInstant(td: TestDaemon, vm: string, disk: string): Promise<{ counter: number; pending: number; problems: string[] }> {
  await op(td, vm, 'pause')
  const { counters } = await dumpRam(td, vm, 0)
  const problems = checkDiskAgainstCounter(slotsOf(await liveDiskBytes(td, vm, disk)), counters.counter, counters.pending, 0)
  await op(td, vm, 'resume')
  return { counter: counters.counter, pending: counters.pending, problems }
}

/** The image a frozen layer holds is one whole guest instant: the slots of some counter, none torn. */
function frozenProblems(bytes: Buffer): { counter: number; problems: string[] } {
  const slots = slotsOf(bytes)
  const counter = maxSlot(slots)
  return { counter, problems: checkDiskAgainstCounter(slots, counter, counter, 0) }
}

for (const mode of ['blockdev', 'drive'] as const) {
  t.test(`adopted QEMU (${mode}): external snapshot, live checkpoint, internal checkpoint reverted in place, deletes`, async (t) => {
    const dir = t.testdir()
    // The QMP socket in a short directory of its own, the only one qmpd is allowed besides its
    // state dir; the disk outside both: qmpd never opens it, the adopted QEMU has it open.
    const sockDir = await mkdtemp(join(tmpdir(), 'qmpd-adopt-'))
    t.teardown(() => rm(sockDir, { recursive: true, force: true }))
    const disk = join(dir, 'boot.qcow2')
    await makeGuestDisk(disk, { format: 'qcow2', sizeMiB: 16, boot: true })
    const raw = await launchGuest(t, mode, sockDir, disk)
    const td = await startTestDaemon(t, { stateDir: join(dir, 'state'), config: { allowedDirs: [sockDir] } })
    const id = DISK_ID[mode]

    const adopted = await td.api('POST', '/v1/vms', { name: 'a', adopt: { qmpSocket: raw.socket } })
    t.equal(adopted.status, 201, `adopted (${adopted.body?.error?.message ?? 'no error'})`)
    t.same(td.daemon.vms.record('a').runtime.disks, [{ id, file: disk, format: 'qcow2', gen: 0 }], `qmpd found disk ${id} (the CD-ROM left out)`)
    t.ok(await eventually(async () => (await guestCounters(td, 'a')).counter > 30, 30_000), 'the guest counts')

    // 1. External disk-only snapshot: the base freezes, the guest writes on in qmpd's overlay.
    const before = (await guestCounters(td, 'a')).counter
    const t0 = performance.now()
    const e1 = await snap(td, 'a', { name: 'e1', kind: 'external', memory: false })
    const after = (await guestCounters(td, 'a')).counter
    t.comment(`external disk snapshot of the adopted QEMU: ${Math.round(performance.now() - t0)} ms`)
    const overlay1 = join(td.stateDir, 'vms', 'a', `${id}-e1.qcow2`)
    t.same(e1.snapshot.disks.map((d: any) => [d.file, d.overlay]), [[disk, overlay1]], 'the overlay goes in the VM directory, on the adopted disk')
    t.ok(await eventually(async () => (await guestCounters(td, 'a')).counter > after + 30, 30_000), 'the guest counts on, on the overlay')
    const frozen = frozenProblems(await diskBytes(disk))
    t.same(frozen.problems, [], `the frozen base is one instant (counter ${frozen.counter})`)
    t.ok(frozen.counter >= before - 1 && frozen.counter <= after, `and that instant is the snapshot's: ${before - 1} <= ${frozen.counter} <= ${after}`)
    const live1 = await pausedInstant(td, 'a', id)
    t.same(live1.problems, [], `QEMU's disk matches the guest's counter ${live1.counter}`)
    t.ok(live1.counter > frozen.counter, 'and moved past the frozen base')

    // 2. Live external checkpoint: RAM state file (streamed through qmpd's receiver to a QEMU
    // whose cwd is not the VM directory) and a second overlay.
    const c1 = await snap(td, 'a', { name: 'c1', kind: 'external', memory: true, live: true })
    t.equal(c1.snapshot.memory, true)
    t.ok(c1.snapshot.sizeBytes >= 512 * 1024, `RAM state written (${c1.snapshot.sizeBytes} bytes, ${c1.snapshot.ramMethod}, downtime ${c1.downtimeMs} ms)`)
    t.equal((await readFile(c1.snapshot.vmstateFile)).subarray(0, 4).toString('latin1'), 'QEVM', 'the file is a QEMU migration stream')
    t.equal((await td.api('GET', '/v1/vms/a')).body.state, 'running', 'the guest runs after the live checkpoint')
    const cFrozen = frozenProblems(await diskBytes(overlay1))
    t.same(cFrozen.problems, [], `the checkpoint's frozen layer is one instant (counter ${cFrozen.counter})`)
    const check0 = await td.api('GET', '/v1/vms/a/check')
    t.same(check0.body.problems, [], 'store, QEMU and files agree with both overlays in place')

    // What would need a new QEMU process is refused, and says why.
    for (const name of ['e1', 'c1']) {
      const r = await td.api('POST', `/v1/vms/a/snapshots/${name}/revert?wait=true`, {})
      t.equal(r.status, 409, `revert of external ${name} refused`)
      t.equal(r.body.error.code, 'ADOPTED_NEEDS_RELAUNCH')
      t.match(r.body.error.message, /needs a new QEMU process/)
    }
    const restore = await td.api('POST', '/v1/vms/a/restore', { file: c1.snapshot.vmstateFile })
    t.equal(restore.status, 409, 'restore refused')
    t.equal(restore.body.error.code, 'ADOPTED_NEEDS_RELAUNCH')
    const managed = await td.api('POST', '/v1/vms/a/managedsave')
    t.equal(managed.status, 409, 'managed save refused (only a new QEMU could restore it)')
    t.equal((await td.api('POST', '/v1/vms/a/start')).body.error.code, 'ADOPTED_NEEDS_RELAUNCH', 'start refused')

    // Deletes merge qmpd's overlays away; the guest runs on, its disk whole.
    for (const name of ['c1', 'e1']) {
      const r = await td.api('DELETE', `/v1/vms/a/snapshots/${name}?wait=true&timeoutSec=120`)
      t.equal(r.status, 200, `delete ${name}: ${JSON.stringify(r.body?.error ?? '')}`)
    }
    t.same((await td.api('GET', '/v1/vms/a/snapshots')).body.snapshots ?? [], [], 'no snapshot left')
    t.notOk(existsSync(c1.snapshot.vmstateFile), 'the RAM state file is gone')
    const live2 = await pausedInstant(td, 'a', id)
    t.same(live2.problems, [], `after the deletes QEMU's disk matches counter ${live2.counter}`)
    t.ok(live2.counter > live1.counter, 'the guest counted on through the deletes')
    const check1 = await td.api('GET', '/v1/vms/a/check')
    t.same(check1.body.problems, [], 'store, QEMU and files agree after the external snapshots')

    // 3. Internal checkpoint in the adopted disk, reverted in place (snapshot-load).
    const ib = (await guestCounters(td, 'a')).counter
    const i1 = await snap(td, 'a', { name: 'i1', kind: 'internal', memory: true })
    const ia = (await guestCounters(td, 'a')).counter
    t.equal(i1.snapshot.kind, 'internal')
    t.ok(await eventually(async () => (await guestCounters(td, 'a')).counter > ia + 50, 30_000), 'the guest counts on after the checkpoint')
    const i2 = await snap(td, 'a', { name: 'i2', kind: 'internal', memory: false })
    t.equal(i2.snapshot.memory, false, 'an internal disk-only snapshot, live')
    const r2 = await td.api('POST', '/v1/vms/a/snapshots/i2/revert?wait=true', {})
    t.equal(r2.status, 409, 'revert of an internal disk-only snapshot refused')
    t.match(r2.body.error.message, /rolls an open disk back/)
    const rOff = await td.api('POST', '/v1/vms/a/snapshots/i1/revert?wait=true', { state: 'shutoff' })
    t.equal(rOff.status, 409, 'revert of the checkpoint to shutoff refused')

    const t1 = performance.now()
    const rv = await revert(td, 'a', 'i1', { state: 'paused' })
    t.comment(`in-place revert of the internal checkpoint: ${Math.round(performance.now() - t1)} ms`)
    t.equal(rv.state, 'paused')
    const { counters } = await dumpRam(td, 'a', 0)
    t.ok(counters.counter >= ib && counters.counter <= ia, `the guest's RAM is the checkpoint's: ${ib} <= ${counters.counter} <= ${ia}`)
    t.same(checkDiskAgainstCounter(slotsOf(await liveDiskBytes(td, 'a', id)), counters.counter, counters.pending, 0), [], 'and its disk is from the same instant')
    t.equal(raw.pid, (await td.api('GET', '/v1/vms/a')).body.pid, 'the same QEMU process, reverted in place')
    await op(td, 'a', 'resume')
    t.ok(await eventually(async () => (await guestCounters(td, 'a')).counter > counters.counter + 30, 30_000), 'the guest counts on from the checkpoint')

    for (const name of ['i2', 'i1']) {
      const r = await td.api('DELETE', `/v1/vms/a/snapshots/${name}?wait=true&timeoutSec=120`)
      t.equal(r.status, 200, `delete ${name}: ${JSON.stringify(r.body?.error ?? '')}`)
    }
    const blocks = await td.api('POST', '/v1/vms/a/qmp', { execute: 'query-named-block-nodes', arguments: { flat: true } })
    const tags = (blocks.body.return as any[]).filter((n) => n.file === disk).flatMap((n) => (n.image.snapshots ?? []).map((s: any) => s.name))
    t.same(tags, [], 'the tags are gone from the adopted disk')
    const check2 = await td.api('GET', '/v1/vms/a/check')
    t.same(check2.body.problems, [], 'store, QEMU and files agree at the end')

    // 4. Mixed kinds: a checkpoint whose image an external snapshot froze needs a new QEMU.
    await snap(td, 'a', { name: 'i3', kind: 'internal', memory: true })
    await snap(td, 'a', { name: 'x1', kind: 'external', memory: false })
    const rMixed = await td.api('POST', '/v1/vms/a/snapshots/i3/revert?wait=true', { state: 'paused' })
    t.equal(rMixed.status, 409, 'revert of a checkpoint in a frozen image refused')
    t.equal(rMixed.body.error.code, 'ADOPTED_NEEDS_RELAUNCH')
    t.match(rMixed.body.error.message, /no longer the active layer/)
    const dMixed = await td.api('DELETE', '/v1/vms/a/snapshots/i3?wait=true')
    t.equal(dMixed.status, 409, 'its tag, in a backing file QEMU holds read-only, is not deleted live')
    t.equal(raw.pid, (await td.api('GET', '/v1/vms/a')).body.pid, 'the same QEMU process runs on')
  })
}

/** The files of a VM's disk chain as QEMU reports them, top first. */
async function chainOf(td: TestDaemon, vm: string): Promise<string[]> {
  return (await td.api('GET', `/v1/vms/${vm}`)).body.disks[0].chain.map((l: any) => l.file)
}

t.test('adopted QEMU: commit, pull and copy with pivot, and a memory-only checkpoint, in place', async (t) => {
  const dir = t.testdir()
  const sockDir = await mkdtemp(join(tmpdir(), 'qmpd-adopt-'))
  t.teardown(() => rm(sockDir, { recursive: true, force: true }))
  const disk = join(dir, 'boot.qcow2')
  await makeGuestDisk(disk, { format: 'qcow2', sizeMiB: 16, boot: true })
  const raw = await launchGuest(t, 'blockdev', sockDir, disk)
  const td = await startTestDaemon(t, { stateDir: join(dir, 'state'), config: { allowedDirs: [sockDir] } })
  t.equal((await td.api('POST', '/v1/vms', { name: 'b', adopt: { qmpSocket: raw.socket } })).status, 201)
  t.ok(await eventually(async () => (await guestCounters(td, 'b')).counter > 20, 30_000), 'the guest counts')
  const vmDir = join(td.stateDir, 'vms', 'b')
  const job = async (what: string, body: unknown): Promise<void> => {
    const r = await td.api('POST', `/v1/vms/b/disks/vda/${what}?wait=true&timeoutSec=120`, body)
    t.equal(r.status, 200, `${what}: ${r.body?.error?.message ?? 'done'}`)
  }

  await snap(td, 'b', { name: 'b0', kind: 'external', memory: false })
  t.equal((await td.api('DELETE', '/v1/vms/b/snapshots/b0?wait=true&metadataOnly=true')).status, 200, 'b0 forgotten, its overlay kept')
  const ov0 = join(vmDir, 'vda-b0.qcow2')
  t.same(await chainOf(td, 'b'), [ov0, disk])
  await job('commit', {})
  t.same(await chainOf(td, 'b'), [disk], 'active commit pivoted QEMU back onto the adopted disk')
  t.notOk(existsSync(ov0), 'the merged overlay qmpd made is removed')

  await snap(td, 'b', { name: 'b1', kind: 'external', memory: false })
  const ov1 = join(vmDir, 'vda-b1.qcow2')
  await job('pull', {})
  t.same(await chainOf(td, 'b'), [ov1], 'pull made the overlay standalone')
  t.ok(existsSync(disk), "the adopted disk is the snapshot's and the owner's: kept")

  await job('copy', { dest: 'copy.qcow2', pivot: true })
  t.same(await chainOf(td, 'b'), [join(vmDir, 'copy.qcow2')], 'copy with pivot: QEMU runs on the copy in the VM directory')
  const inst = await pausedInstant(td, 'b', 'vda')
  t.same(inst.problems, [], `after commit, pull and copy QEMU's disk matches counter ${inst.counter}`)

  const m1 = await snap(td, 'b', { name: 'm1', kind: 'external', memory: true, disks: { vda: { exclude: true } } })
  t.same(m1.snapshot.disks.map((d: any) => d.mode), ['excluded'], 'memory-only checkpoint')
  t.equal((await readFile(m1.snapshot.vmstateFile)).subarray(0, 4).toString('latin1'), 'QEVM', 'its RAM state is a migration stream')
  t.ok(await eventually(async () => (await guestCounters(td, 'b')).counter > inst.counter + 20, 30_000), 'the guest counts on')
  t.same((await td.api('GET', '/v1/vms/b/check')).body.problems, [], 'store, QEMU and files agree')
  for (const name of ['m1', 'b1']) t.equal((await td.api('DELETE', `/v1/vms/b/snapshots/${name}?wait=true&timeoutSec=120`)).status, 200, `delete ${name}`)
  t.notOk(existsSync(m1.snapshot.vmstateFile), 'the RAM state file is gone')

  await snap(td, 'b', { name: 'b2', kind: 'external', memory: false })
  // A save writes RAM through the adopted QEMU (whose cwd is not the VM directory) and quits it.
  const saved = await td.api('POST', '/v1/vms/b/save?wait=true&timeoutSec=120', { file: 'b.state' })
  t.equal(saved.status, 200, `save: ${saved.body?.error?.message ?? 'done'}`)
  t.ok(await waitForExit(raw.pid, 10_000), 'the adopted QEMU quit after the save')
  t.equal((await readFile(join(vmDir, 'b.state'))).subarray(0, 4).toString('latin1'), 'QEVM', 'the saved state is a migration stream')
  t.ok(await eventually(async () => (await td.api('GET', '/v1/vms/b')).body.state === 'shutoff'), 'the VM is shut off')
  const off = await td.api('POST', '/v1/vms/b/snapshots', { name: 'late', kind: 'external', memory: false })
  t.equal(off.status, 409, 'no snapshot of an adopted VM without its QEMU')
  t.equal(off.body.error.code, 'ADOPTED_NEEDS_RELAUNCH')
  const restore = await td.api('POST', '/v1/vms/b/restore', { file: 'b.state' })
  t.equal(restore.body.error.code, 'ADOPTED_NEEDS_RELAUNCH', 'and no restore: it needs a new QEMU')
  const del = await td.api('DELETE', '/v1/vms/b/snapshots/b2')
  t.equal(del.status, 409, 'no delete that would run qemu-img on the files of an adopted VM without its QEMU')
  t.equal(del.body.error.code, 'ADOPTED_NEEDS_RELAUNCH')
  t.equal((await td.api('DELETE', '/v1/vms/b/snapshots/b2?metadataOnly=true&wait=true')).status, 200, 'forgetting it touches no file: allowed')
})
