// Backing-chain jobs against real QEMU: commit (active with pivot, intermediate), pull, copy with
// cancel/complete, job control, ENOSPC; every result read back by sectors.
import { execFile } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t, { type Test } from 'tap'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { checkDiskAgainstCounter } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { diskBytes, liveDiskBytes, slotsOf } from '../helpers/snap.ts'

const run = promisify(execFile)

t.before(() => {
  requireQemu(t)
})

const files = (td: TestDaemon, vm: string) => td.daemon.vms.record(vm).runtime.disks.map((d) => d.file)
const chainOf = async (td: TestDaemon, vm: string, i = 0) => (await td.api('GET', `/v1/vms/${vm}`)).body.disks[i].chain.map((l: any) => l.file)

/** Builds a chain of `n` overlays on every disk (external snapshots whose metadata is then forgotten). */
async function buildChain(td: TestDaemon, vm: string, n: number): Promise<void> {
  for (let i = 1; i <= n; i++) {
    const c = (await guestCounters(td, vm)).counter
    await eventually(async () => (await guestCounters(td, vm)).counter > c + 70)
    const r = await td.api('POST', `/v1/vms/${vm}/snapshots?wait=true`, { name: `l${i}`, kind: 'external', memory: false })
    if (r.status !== 200) throw new Error(JSON.stringify(r.body))
  }
  for (let i = n; i >= 1; i--) await td.api('DELETE', `/v1/vms/${vm}/snapshots/l${i}?wait=true&metadataOnly=true`)
}

/** Pauses the guest and checks that every disk reads what its RAM counter says was written. */
async function diskMatchesGuest(t: Test, td: TestDaemon, vm: string, label: string): Promise<void> {
  await op(td, vm, 'pause')
  const c = await guestCounters(td, vm)
  for (const [i, f] of files(td, vm).entries()) {
    t.same(checkDiskAgainstCounter(slotsOf(await diskBytes(f)), c.counter, c.pending, i), [], `${label}: disk ${i} holds what the guest wrote (counter ${c.counter})`)
  }
  await op(td, vm, 'resume')
}

t.test('active commit with pivot while the guest writes; intermediate commit and pull keep what the guest sees', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'bc', { disks: 1 })
  await op(td, 'bc', 'start')
  await buildChain(td, 'bc', 3)
  const chain = await chainOf(td, 'bc')
  t.equal(chain.length, 4, 'base + 3 overlays')

  // Intermediate commit: l2's overlay into l1's, with the guest paused so the view can be compared.
  await op(td, 'bc', 'pause')
  const before = await liveDiskBytes(td, 'bc', 'vda')
  const ic = await td.api('POST', '/v1/vms/bc/disks/vda/commit?wait=true', { top: chain[1], base: chain[2] })
  t.equal(ic.status, 200, 'intermediate commit')
  t.equal(ic.body.result.pivoted, false)
  t.same(ic.body.result.removed, [chain[1]], 'the merged file is removed')
  t.notOk(existsSync(chain[1]))
  t.same(await chainOf(td, 'bc'), [chain[0], chain[2], chain[3]], 'QEMU\'s chain lost the merged layer')
  t.ok((await liveDiskBytes(td, 'bc', 'vda')).equals(before), 'the guest sees the same bytes')

  // Pull into the active layer from the base: everything between goes.
  const pl = await td.api('POST', '/v1/vms/bc/disks/vda/pull?wait=true', { base: chain[3] })
  t.equal(pl.status, 200, 'pull')
  t.same(await chainOf(td, 'bc'), [chain[0], chain[3]])
  t.ok((await liveDiskBytes(td, 'bc', 'vda')).equals(before), 'still the same bytes after the pull')
  await op(td, 'bc', 'resume')

  // Active commit with pivot while the guest keeps writing.
  await eventually(async () => true)
  const ac = await td.api('POST', '/v1/vms/bc/disks/vda/commit?wait=true', {})
  t.equal(ac.status, 200, 'active commit')
  t.equal(ac.body.result.pivoted, true)
  t.same(await chainOf(td, 'bc'), [chain[3]], 'the VM runs on its base image now')
  t.same(files(td, 'bc'), [chain[3]], 'and qmpd\'s record agrees')
  const c = (await guestCounters(td, 'bc')).counter
  t.ok(await eventually(async () => (await guestCounters(td, 'bc')).counter > c + 50), 'the guest writes on')
  await diskMatchesGuest(t, td, 'bc', 'after pivot')
})

t.test('copy: cancel after ready keeps a point-in-time copy; complete pivots the VM onto the copy', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'cp', { disks: 1 })
  await op(td, 'cp', 'start')
  const dest = join(td.stateDir, 'vms', 'cp', 'copy1.qcow2')
  const job = (await td.api('POST', '/v1/vms/cp/disks/vda/copy', { dest })).body
  t.ok(await eventually(async () => (await td.api('GET', `/v1/jobs/${job.id}`)).body.state === 'ready', 30_000), 'the mirror becomes ready')
  t.equal((await td.api('POST', '/v1/vms/cp/snapshots', { name: 'x', kind: 'external', memory: false })).status, 409, 'snapshots wait for the block job: 409')
  t.equal((await td.api('POST', '/v1/vms/cp/disks/vda/commit', {})).status, 409, 'a second block job on the disk: 409')
  await op(td, 'cp', 'pause')
  const cancel = await td.api('POST', `/v1/jobs/${job.id}/cancel`)
  t.equal(cancel.status, 200)
  const done = await td.daemon.jobs.wait(job.id, 30_000)
  t.equal(done.state, 'succeeded', 'cancel after ready ends the copy job well')
  t.match(done.result, { pivoted: false, dest })
  t.ok((await diskBytes(dest)).equals(await liveDiskBytes(td, 'cp', 'vda')), 'the copy equals the disk at the moment of the cancel')
  t.not(files(td, 'cp')[0], dest, 'the VM stays on its original')
  await op(td, 'cp', 'resume')

  const dest2 = join(td.stateDir, 'vms', 'cp', 'copy2.qcow2')
  const j2 = (await td.api('POST', '/v1/vms/cp/disks/vda/copy', { dest: dest2 })).body
  t.ok(await eventually(async () => (await td.api('GET', `/v1/jobs/${j2.id}`)).body.state === 'ready', 30_000))
  const comp = await td.api('POST', `/v1/jobs/${j2.id}/complete`)
  t.equal(comp.status, 200)
  const d2 = await td.daemon.jobs.wait(j2.id, 30_000)
  t.match(d2.result, { pivoted: true })
  t.same(await chainOf(td, 'cp'), [dest2], 'the VM runs on the copy')
  const c = (await guestCounters(td, 'cp')).counter
  t.ok(await eventually(async () => (await guestCounters(td, 'cp')).counter > c + 50))
  await diskMatchesGuest(t, td, 'cp', 'after pivot to the copy')
  const again = await td.api('POST', `/v1/jobs/${j2.id}/complete`)
  t.equal(again.status, 409, 'control of a finished job')
})

t.test('pause, resume and speed of a running pull show in its progress', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'sp', { disks: 2 })
  const data = files(td, 'sp')[1]!
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 15M', data])
  await op(td, 'sp', 'start')
  await buildChain(td, 'sp', 1)
  await op(td, 'sp', 'pause')
  const view = await liveDiskBytes(td, 'sp', 'vdb')
  const job = (await td.api('POST', '/v1/vms/sp/disks/vdb/pull', { speedBytesPerSec: 1024 * 1024 })).body
  const prog = async () => (await td.api('GET', `/v1/jobs/${job.id}`)).body
  t.ok(await eventually(async () => ((await prog()).progress?.current ?? 0) > 0, 10_000), 'progress shows')
  const p1 = (await prog()).progress
  t.ok(p1.current < p1.total, `throttled to 1 MiB/s: ${p1.current} of ${p1.total}`)
  t.equal((await td.api('POST', `/v1/jobs/${job.id}/complete`)).status, 409, 'complete on a job that is not ready: 409')
  t.equal((await td.api('POST', `/v1/jobs/${job.id}/pause`)).status, 200)
  t.ok(await eventually(async () => (await prog()).state === 'paused', 5000), 'job shows paused')
  const a = (await prog()).progress.current
  await new Promise((r) => setTimeout(r, 1500))
  const b = (await prog()).progress.current
  t.equal(b, a, 'no progress while paused')
  t.ok(b < p1.total, 'and it is not done')
  t.equal((await td.api('POST', `/v1/jobs/${job.id}/resume`)).status, 200)
  const patch = await td.api('PATCH', `/v1/jobs/${job.id}`, { speedBytesPerSec: 0 })
  t.equal(patch.status, 200)
  t.equal(patch.body.speedBytesPerSec, 0)
  const done = await td.daemon.jobs.wait(job.id, 30_000)
  t.equal(done.state, 'succeeded', 'unthrottled, the pull finishes')
  t.equal((await chainOf(td, 'sp', 1)).length, 1, 'the active layer is standalone')
  t.ok((await liveDiskBytes(td, 'sp', 'vdb')).equals(view), 'and reads the same bytes (through QEMU, over NBD)')
  t.equal((await td.api('POST', `/v1/jobs/${job.id}/pause`)).status, 409, 'control of a finished job: 409')
})

t.test('ENOSPC during a copy fails the job cleanly; the VM runs on', async (t) => {
  // A 4 MiB tmpfs outside the test directory (tap removes that before late teardowns run).
  const small = mkdtempSync(join(tmpdir(), 'qmpd-enospc-'))
  await run('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', small])
  t.teardown(async () => {
    await run('umount', ['-l', small]).catch(() => {})
    rmSync(small, { recursive: true, force: true })
  })
  const full = await startTestDaemon(t, { config: { allowedDirs: [small] } })
  await defineGuestVm(full, 'sp', { disks: 2 })
  const data = files(full, 'sp')[1]!
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 15M', data])
  await op(full, 'sp', 'start')
  t.ok(await eventually(async () => (await guestCounters(full, 'sp')).counter > 20), 'the guest writes')
  const fail = await full.api('POST', '/v1/vms/sp/disks/vdb/copy?wait=true', { dest: join(small, 'big.qcow2'), format: 'raw' })
  t.equal(fail.status, 507, 'the copy fails with 507 Insufficient Storage')
  t.equal(fail.body.error.code, 'IO_ERROR')
  t.match(fail.body.error.message, /filesystem is full.*No space left on device/)
  t.equal(fail.body.error.details.file, join(small, 'big.qcow2'), 'naming the file')
  t.notOk(existsSync(join(small, 'big.qcow2')), 'no partial copy left')
  t.equal((await full.api('GET', '/v1/vms/sp')).body.state, 'running', 'the VM runs on')
  t.same(await chainOf(full, 'sp', 1), [data], 'on its original chain')
  await diskMatchesGuest(t, full, 'sp', 'after the failed copy')
  // Offline, qemu-img convert meets the full filesystem: 507 as well.
  await op(full, 'sp', 'stop', { force: true })
  const off = await full.api('POST', '/v1/vms/sp/disks/vdb/copy?wait=true', { dest: join(small, 'big-off.qcow2'), format: 'raw' })
  t.equal(off.status, 507, 'an offline copy to a full filesystem: 507')
  t.equal(off.body.error.code, 'IO_ERROR')
  t.match(off.body.error.message, /No space left on device/)
})

t.test('offline commit, pull and copy with qemu-img', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'off', { disks: 1 })
  await op(td, 'off', 'start')
  await buildChain(td, 'off', 3)
  await op(td, 'off', 'stop', { force: true })
  const chain = await chainOf(td, 'off')
  const view = await diskBytes(chain[0])
  const ic = await td.api('POST', '/v1/vms/off/disks/vda/commit?wait=true', { top: chain[1] })
  t.equal(ic.status, 200, 'offline intermediate commit')
  t.same(await chainOf(td, 'off'), [chain[0], chain[2], chain[3]])
  t.ok((await diskBytes(chain[0])).equals(view))
  const pl = await td.api('POST', '/v1/vms/off/disks/vda/pull?wait=true', { base: chain[3] })
  t.equal(pl.status, 200, 'offline pull')
  t.same(await chainOf(td, 'off'), [chain[0], chain[3]])
  t.ok((await diskBytes(chain[0])).equals(view))
  t.same(pl.body.progress, { current: 100, total: 100 }, 'qemu-img progress reported')
  const dest = join(td.stateDir, 'vms', 'off', 'offcopy.qcow2')
  const cp = await td.api('POST', '/v1/vms/off/disks/vda/copy?wait=true', { dest, pivot: true })
  t.equal(cp.status, 200, 'offline copy')
  t.ok((await diskBytes(dest)).equals(view))
  t.same(files(td, 'off'), [dest])
  const ac = await td.api('POST', '/v1/vms/off/disks/vda/commit', {})
  t.equal(ac.status, 400, 'a standalone copy has nothing to commit into (refused at submit, offline)')
  t.equal((await td.api('POST', '/v1/vms/off/disks/vda/pull', { base: 'nowhere.qcow2' })).status, 400, 'offline: a base not in the chain, at submit')
  await op(td, 'off', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 'off')).counter > 10), 'boots from the copy')
})

t.test('bad block-job requests are refused and change nothing', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'bad', { disks: 1 })
  await op(td, 'bad', 'start')
  await buildChain(td, 'bad', 1)
  const chain = await chainOf(td, 'bad')
  writeFileSync(join(td.stateDir, 'vms', 'bad', 'exists.qcow2'), 'x')
  t.equal((await td.api('POST', '/v1/vms/bad/disks/vdz/commit', {})).status, 404, 'unknown disk')
  // Layer references are checked at submit time (no ?wait): refused before any job is made.
  const jobsBefore = (await td.api('GET', '/v1/jobs?vm=bad')).body.jobs.length
  const refused: Array<[string, unknown, number, RegExp]> = [
    ['commit', { top: chain[1], base: chain[0] }, 400, /is not below top/],
    ['commit', { top: '/etc/passwd' }, 400, /./],
    ['commit', { top: 'no-such-layer.qcow2' }, 400, /is not in the chain/],
    ['commit', { base: 'nosnap' }, 400, /is not in the chain/],
    ['commit', { top: chain[1] }, 400, /no backing image to commit into/],
    ['pull', { base: chain[1] }, 400, /nothing between/],
    ['pull', { base: 'missing.qcow2' }, 400, /is not in the chain/],
    ['pull', { base: '../../x' }, 400, /\.\./],
  ]
  for (const [what, body, status, msg] of refused) {
    const res = await td.api('POST', `/v1/vms/bad/disks/vda/${what}`, body)
    t.equal(res.status, status, `${what} ${JSON.stringify(body)}: ${status} at submit`)
    t.match(res.body.error.message, msg)
    t.notOk(res.headers['location'], 'no job, no Location')
  }
  t.equal((await td.api('GET', '/v1/jobs?vm=bad')).body.jobs.length, jobsBefore, 'no job was created')
  t.equal((await td.api('POST', '/v1/vms/bad/disks/vda/copy', { dest: 'exists.qcow2' })).status, 409, 'dest exists')
  t.equal((await td.api('POST', '/v1/vms/bad/disks/vda/copy', { dest: '/tmp/out.qcow2' })).status, 400, 'dest outside')
  t.same(await chainOf(td, 'bad'), chain, 'chain unchanged by the refusals')
  // A snapshot's image is protected from being written by a commit, at submit time too.
  await td.api('POST', '/v1/vms/bad/snapshots?wait=true', { name: 'keep', kind: 'external', memory: false })
  const now = await chainOf(td, 'bad')
  const guarded = await td.api('POST', '/v1/vms/bad/disks/vda/commit', { top: now[0], base: now[1] })
  t.equal(guarded.status, 409)
  t.match(guarded.body.error.message, /image of snapshot keep/)
  t.same(await chainOf(td, 'bad'), now, 'chain unchanged')
  const notStream = join(td.stateDir, 'vms', 'bad', 'exists.qcow2')
  await op(td, 'bad', 'stop', { force: true })
  const rs = await td.api('POST', '/v1/vms/bad/restore', { file: notStream })
  t.equal(rs.status, 400, 'restore of a file that is not a migration stream')
  t.match(rs.body.error.message, /not a QEMU migration stream/)
  t.equal((await td.api('DELETE', '/v1/vms/bad/managedsave')).status, 409, 'no managed save to discard')
})

t.test('a block job left running by a daemon that stopped is ended by the next one', async (t) => {
  const stateDir = t.testdir()
  const first = await startTestDaemon(t, { stateDir })
  await defineGuestVm(first, 'orph', { disks: 1 })
  await op(first, 'orph', 'start')
  const job = (await first.api('POST', '/v1/vms/orph/disks/vda/copy', { dest: 'c1.qcow2' })).body
  t.ok(await eventually(async () => (await first.api('GET', `/v1/jobs/${job.id}`)).body.state === 'ready', 30_000))
  const t0 = Date.now()
  await first.close({ drainTimeoutMs: 500 }) // the daemon goes while QEMU keeps mirroring
  t.ok(Date.now() - t0 < 5000, 'shutdown does not wait for a job waiting in ready')
  const second = await startTestDaemon(t, { stateDir })
  const old = (await second.api('GET', `/v1/jobs/${job.id}`)).body
  t.equal(old.state, 'failed', 'the old job is over')
  t.match(old.error.code, /^(INTERRUPTED|QMP_DISCONNECTED)$/)
  const q = await second.api('POST', '/v1/vms/orph/qmp', { execute: 'query-jobs' })
  t.same(q.body.return, [], 'the orphaned QEMU job is gone')
  const again = await second.api('POST', '/v1/vms/orph/disks/vda/copy?wait=true', { dest: 'c2.qcow2', pivot: true })
  t.equal(again.status, 200, 'the disk is free for a new job')
})
