// GET /v1/vms/{vm}/check against real QEMU: a clean VM checks ok, every disagreement the check
// knows is detected when produced, and reconcile (at start, and POST repair) does what it says.
import { execFile } from 'node:child_process'
import { existsSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t from 'tap'
import { openDb } from '../../src/store/db.ts'
import { VmRepo } from '../../src/store/vms.ts'
import { waitForExit } from '../../src/vm/proc.ts'
import { defineGuestVm, eventually, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { snap } from '../helpers/snap.ts'

const run = promisify(execFile)

t.before(() => {
  requireQemu(t)
})

async function check(td: TestDaemon, vm: string): Promise<any> {
  const res = await td.api('GET', `/v1/vms/${vm}/check`)
  if (res.status !== 200) throw new Error(`check ${vm}: ${res.status} ${JSON.stringify(res.body)}`)
  return res.body
}

async function repair(td: TestDaemon, vm: string): Promise<any> {
  const res = await td.api('POST', `/v1/vms/${vm}/repair`)
  if (res.status !== 200) throw new Error(`repair ${vm}: ${res.status} ${JSON.stringify(res.body)}`)
  return res.body
}

const codes = (report: any): string[] => report.problems.map((p: any) => p.code).sort()

async function qmp(td: TestDaemon, vm: string, execute: string, args?: Record<string, unknown>): Promise<any> {
  const res = await td.api('POST', `/v1/vms/${vm}/qmp`, { execute, ...(args ? { arguments: args } : {}) })
  if (res.status !== 200) throw new Error(`${execute}: ${res.status} ${JSON.stringify(res.body)}`)
  return res.body.return
}

/** The node QEMU's device `disk` is attached to now. */
async function topNode(td: TestDaemon, vm: string, disk: string): Promise<string> {
  return ((await td.api('GET', `/v1/vms/${vm}`)).body.disks as any[]).find((d) => d.id === disk).node
}

/** The format node QEMU has for `file`. */
async function nodeOf(td: TestDaemon, vm: string, file: string): Promise<string> {
  const nodes = (await qmp(td, vm, 'query-named-block-nodes', { flat: true })) as any[]
  return nodes.find((n) => n.file === file && n.drv === 'qcow2')['node-name']
}

t.test('a clean VM with internal or external snapshots checks ok, running and off', async (t) => {
  const td = await startTestDaemon(t)
  // qmpd keeps internal and external snapshots on separate VMs.
  await defineGuestVm(td, 'int', { disks: 2 })
  await defineGuestVm(td, 'ext', { disks: 2 })
  t.same(codes(await check(td, 'int')), [], 'defined, never started')
  await op(td, 'int', 'start')
  await op(td, 'ext', 'start')
  await snap(td, 'int', { name: 'i1', kind: 'internal', memory: true })
  await snap(td, 'int', { name: 'i2', kind: 'internal', memory: false })
  await snap(td, 'ext', { name: 'e1', kind: 'external', memory: false })
  await snap(td, 'ext', { name: 'e2', kind: 'external', memory: true })
  writeFileSync(join(td.stateDir, 'vms', 'ext', 'pmem-1.bin'), 'a test file') // not qmpd's naming
  for (const vm of ['int', 'ext']) {
    const running = await check(td, vm)
    t.same(running.problems, [], `${vm} running: no problem`)
    t.equal(running.ok, true)
    t.equal(running.state, 'running')
    t.match(running.checked, { processes: 1, disks: 2, snapshots: 2 })
  }
  t.ok((await check(td, 'ext')).checked.images >= 4, 'the image graph was checked')
  for (const vm of ['int', 'ext']) {
    await op(td, vm, 'stop', { force: true })
    const off = await check(td, vm)
    t.same(off.problems, [], `${vm} off: no problem`)
    t.equal(off.ok, true)
    t.equal(off.state, 'shutoff')
  }
  t.equal((await td.api('GET', '/v1/vms/nope/check')).status, 404)
  t.equal((await td.api('GET', '/v1/vms/nope/check')).body.error.code, 'VM_NOT_FOUND')
})

t.test('offline disagreements are detected; repair fixes what is certain and flags the rest', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'off', { disks: 2 })
  await defineGuestVm(td, 'tags')
  const dir = join(td.stateDir, 'vms', 'off')
  await op(td, 'off', 'start')
  await op(td, 'tags', 'start')
  const i1 = (await snap(td, 'tags', { name: 'i1', kind: 'internal', memory: true })).snapshot
  const e1 = (await snap(td, 'off', { name: 'e1', kind: 'external', memory: false })).snapshot
  const e2 = (await snap(td, 'off', { name: 'e2', kind: 'external', memory: true })).snapshot
  await op(td, 'off', 'stop', { force: true })
  await op(td, 'tags', 'stop', { force: true })
  t.same(codes(await check(td, 'off')), [])
  t.same(codes(await check(td, 'tags')), [])

  // An internal tag removed behind qmpd's back (offline, so qemu-img may write).
  await run('qemu-img', ['snapshot', '-d', 'i1', i1.disks[0].file])
  t.match((await check(td, 'tags')).problems, [{ code: 'SNAPSHOT_TAG_MISSING', store: 'i1', message: /vda/ }])

  // Temporary files of qmpd's naming, an image nobody references, and a file of a test's own.
  writeFileSync(join(dir, '.x.vmstate.partial-1234'), 'half a RAM file')
  writeFileSync(join(dir, 'mig-abcd.sock'), '')
  writeFileSync(join(dir, 'vda-stray.qcow2'), '')
  writeFileSync(join(dir, 'pmem-7.bin'), '')
  let r = await check(td, 'off')
  t.same(codes(r), ['ORPHAN_FILE', 'ORPHAN_FILE', 'ORPHAN_FILE'])
  t.same(r.problems.map((p: any) => p.actual).sort(), [join(dir, '.x.vmstate.partial-1234'), join(dir, 'mig-abcd.sock'), join(dir, 'vda-stray.qcow2')])
  t.match(r.problems.find((p: any) => p.actual.endsWith('.sock')).repair, /^removes /)

  // The RAM state file of an external checkpoint deleted.
  rmSync(e2.vmstateFile)
  r = await check(td, 'off')
  t.match(r.problems.find((p: any) => p.code === 'VMSTATE_MISSING'), { store: e2.vmstateFile })

  // 'saved' written without a managed-save file.
  td.daemon.vms.updateRuntime('off', { state: 'saved' })
  r = await check(td, 'off')
  t.match(r.problems.find((p: any) => p.code === 'MANAGED_SAVE_MISSING'), { repair: /becomes shutoff/ })

  // A snapshot's frozen image deleted (vdb's base: the chain below the active layer breaks too).
  const frozen = e1.disks.find((d: any) => d.id === 'vdb').file
  rmSync(frozen)
  r = await check(td, 'off')
  t.match(r.problems.find((p: any) => p.code === 'SNAPSHOT_FILE_MISSING'), { store: frozen })
  t.ok(codes(r).includes('IMAGE_FILE_MISSING'), 'the image graph row of the deleted file')
  t.ok(codes(r).includes('CHAIN_UNREADABLE'), 'vdb\'s chain no longer opens')
  t.notOk(r.problems.some((p: any) => String(p.actual).includes('pmem-7.bin')), 'a file of another naming is not an orphan')

  // Repair: the temporary files go, the state follows the files; the rest flags the VM.
  const after = await repair(td, 'off')
  t.notOk(existsSync(join(dir, '.x.vmstate.partial-1234')), 'partial RAM file removed')
  t.notOk(existsSync(join(dir, 'mig-abcd.sock')), 'socket removed')
  t.ok(existsSync(join(dir, 'vda-stray.qcow2')), 'an unattributed image is never deleted')
  t.ok(existsSync(join(dir, 'pmem-7.bin')))
  t.equal(after.state, 'shutoff', 'saved without a file became shutoff')
  t.equal(after.ok, false)
  t.ok(codes(after).includes('NEEDS_REPAIR'))
  t.notOk(codes(after).includes('MANAGED_SAVE_MISSING'))
  t.match(after.needsRepair, { reason: /SNAPSHOT_FILE_MISSING/ })
  const view = (await td.api('GET', '/v1/vms/off')).body
  t.match(view.repair, { reason: /VMSTATE_MISSING/, at: String })

  // A managed-save file while the store says shutoff: the VM becomes saved.
  writeFileSync(join(dir, 'managed.save'), '')
  t.ok(codes(await check(td, 'off')).includes('MANAGED_SAVE_UNRECORDED'))
  t.equal((await repair(td, 'off')).state, 'saved')
})

t.test('running: a changed active file, an orphaned QEMU job, a busy queue', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'live')
  await op(td, 'live', 'start')
  const e1 = (await snap(td, 'live', { name: 'e1', kind: 'external', memory: false })).snapshot
  const overlay = e1.disks[0].overlay
  const base = e1.disks[0].file
  t.same(codes(await check(td, 'live')), [])
  const stored = () => td.daemon.vms.record('live').runtime.disks[0]!

  // The store names the layer below QEMU's: reachable, so the store follows QEMU.
  const gen = stored().gen
  td.daemon.vms.updateRuntime('live', { disks: [{ ...stored(), file: base }] })
  let r = await check(td, 'live')
  t.same(codes(r), ['DISK_TOP_MISMATCH'])
  t.match(r.problems[0], { store: base, actual: overlay, repair: /the store follows QEMU/ })
  r = await repair(td, 'live')
  t.equal(r.ok, true, JSON.stringify(r.problems))
  t.equal(stored().file, overlay, 'the store names QEMU\'s file again')
  t.ok(stored().gen > gen, 'node generation bumped')

  // QEMU moved on to a layer made behind qmpd's back while the store names an unrelated image:
  // nothing connects the two, so the VM is flagged and the store left alone.
  const dir = join(td.stateDir, 'vms', 'live')
  const side = join(dir, 'side.qcow2')
  await qmp(td, 'live', 'blockdev-snapshot-sync', { 'node-name': await topNode(td, 'live', 'vda'), 'snapshot-file': side, 'snapshot-node-name': 'side', format: 'qcow2', mode: 'absolute-paths' })
  const other = join(dir, 'other.img')
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', other, '16M'])
  td.daemon.vms.updateRuntime('live', { disks: [{ ...stored(), file: other }] })
  r = await check(td, 'live')
  t.match(r.problems, [{ code: 'DISK_TOP_MISMATCH', store: other, actual: side, repair: /needs-repair/ }])
  r = await repair(td, 'live')
  t.equal(r.ok, false)
  t.equal(stored().file, other, 'the store is left as it was')
  t.match((await td.api('GET', '/v1/vms/live')).body.repair, { reason: /DISK_TOP_MISMATCH/ })
  // The operator puts the store back on the overlay; QEMU's layer lies on top of it, so repair
  // follows QEMU the rest of the way and clears the flag.
  td.daemon.vms.updateRuntime('live', { disks: [{ ...stored(), file: overlay }] })
  r = await repair(td, 'live')
  t.equal(r.ok, true, JSON.stringify(r.problems))
  t.equal(stored().file, side, 'the store follows QEMU onto the layer made behind its back')
  t.equal((await td.api('GET', '/v1/vms/live')).body.repair, undefined, 'flag cleared')

  // A QEMU job with qmpd's prefix that no qmpd job drives.
  const target = join(td.stateDir, 'mirror-target.qcow2')
  await qmp(td, 'live', 'drive-mirror', { 'job-id': 'qmpd-orphan', device: await topNode(td, 'live', 'vda'), target, format: 'qcow2', sync: 'full', mode: 'absolute-paths' })
  r = await check(td, 'live')
  t.match(r.problems, [{ code: 'QEMU_JOB_ORPHANED', actual: { id: 'qmpd-orphan' } }])
  await qmp(td, 'live', 'block-job-cancel', { device: 'qmpd-orphan', force: true })
  t.ok(await eventually(async () => ((await qmp(td, 'live', 'query-jobs')) as any[]).length === 0), 'the job is gone')
  t.same(codes(await check(td, 'live')), [])

  // Repair waits for nothing: refused while the VM's queue has work (a stop waiting on a guest
  // that ignores the ACPI powerdown).
  const stop = await td.api('POST', '/v1/vms/live/stop', { timeoutSec: 2 })
  t.equal(stop.status, 202)
  const busy = await td.api('POST', '/v1/vms/live/repair')
  t.equal(busy.status, 409)
  t.equal(busy.body.error.code, 'BUSY')
  t.equal((await check(td, 'live')).busy, true, 'the check says the VM was busy')
  await td.daemon.jobs.wait(stop.body.id, 30_000)
  t.same(codes(await check(td, 'live')), [])
})

t.test('reconcile at start: the store follows pivots done behind its back', async (t) => {
  const stateDir = t.testdir()
  const first = await startTestDaemon(t, { stateDir })
  await defineGuestVm(first, 'piv')
  await op(first, 'piv', 'start')
  await snap(first, 'piv', { name: 'e1', kind: 'external', memory: false })
  const dir = join(stateDir, 'vms', 'piv')

  // An external snapshot through the escape hatch, with the node name qmpd would pick next.
  const behind = join(dir, 'behind.qcow2')
  const nextName = `vda-f${first.daemon.vms.record('piv').runtime.disks[0]!.gen + 1}`
  await qmp(first, 'piv', 'blockdev-snapshot-sync', { 'node-name': await topNode(first, 'piv', 'vda'), 'snapshot-file': behind, 'snapshot-node-name': nextName, format: 'qcow2', mode: 'absolute-paths' })
  t.match((await check(first, 'piv')).problems, [{ code: 'DISK_TOP_MISMATCH', actual: behind, repair: /follows QEMU/ }])
  await first.close()

  const second = await startTestDaemon(t, { stateDir })
  t.equal(second.daemon.vms.record('piv').runtime.disks[0]!.file, behind, 'reconcile at start: the store names QEMU\'s file')
  let r = await check(second, 'piv')
  t.same(r.problems, [], 'and the check is ok')
  t.equal((await second.api('GET', '/v1/vms/piv')).body.repair, undefined)
  // qmpd's next snapshot does not collide with the node name used behind its back.
  const e2 = (await snap(second, 'piv', { name: 'e2', kind: 'external', memory: false })).snapshot
  t.equal(e2.disks[0].file, behind)
  t.same(codes(await check(second, 'piv')), [])

  // An active commit through the escape hatch: QEMU pivots down to the layer below.
  const top = await topNode(second, 'piv', 'vda')
  await qmp(second, 'piv', 'block-commit', { 'job-id': 'user-commit', device: top, 'base-node': await nodeOf(second, 'piv', behind) })
  t.ok(await eventually(async () => ((await qmp(second, 'piv', 'query-block-jobs')) as any[]).some((j) => j.ready), 20_000), 'commit ready')
  await qmp(second, 'piv', 'job-complete', { id: 'user-commit' })
  t.ok(await eventually(async () => ((await qmp(second, 'piv', 'query-jobs')) as any[]).length === 0, 20_000), 'commit done')
  t.match((await check(second, 'piv')).problems, [{ code: 'DISK_TOP_MISMATCH', store: e2.disks[0].overlay, actual: behind }])
  await second.close()

  const third = await startTestDaemon(t, { stateDir })
  t.equal(third.daemon.vms.record('piv').runtime.disks[0]!.file, behind, 'the store followed the commit')
  r = await check(third, 'piv')
  t.same(r.problems, [], 'check ok after the commit pivot')
})

t.test('reconcile at start flags a QEMU the store does not know of; repair clears it once gone', async (t) => {
  const stateDir = t.testdir()
  const first = await startTestDaemon(t, { stateDir })
  await defineGuestVm(first, 'stray')
  const pid = (await op(first, 'stray', 'start')).result as { pid: number }
  await first.close()
  // The store loses the running QEMU (as if a stop had been recorded but QEMU lived on).
  const db = openDb(join(stateDir, 'qmpd.db'))
  const repo = new VmRepo(db)
  const rec = repo.get('stray')!
  const rt = { ...rec.runtime, state: 'shutoff' as const }
  delete rt.pid
  delete rt.pidStartTime
  repo.updateRuntime('stray', rt)
  db.close()

  const second = await startTestDaemon(t, { stateDir })
  const r = await check(second, 'stray')
  t.match(r.problems, [{ code: 'PROCESS_UNRECORDED', actual: [pid.pid] }, { code: 'NEEDS_REPAIR' }])
  t.match((await second.api('GET', '/v1/vms/stray')).body.repair, { reason: /PROCESS_UNRECORDED/ })
  process.kill(pid.pid, 'SIGKILL')
  t.ok(await waitForExit(pid.pid, 5000))
  const fixed = await repair(second, 'stray')
  t.equal(fixed.ok, true, JSON.stringify(fixed.problems))
  t.equal((await second.api('GET', '/v1/vms/stray')).body.repair, undefined)
})
