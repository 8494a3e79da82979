// Snapshot failures leave nothing behind; bad requests are refused and change nothing; the tree
// survives a daemon restart.
import { readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { checkDiskAgainstCounter, checkStampsAgainstCounter } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { diskBytes, dumpRam, liveDiskBytes, slotsOf, stampsOf } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

const vmFiles = (td: TestDaemon, vm: string) => readdirSync(join(td.stateDir, 'vms', vm)).filter((f) => !f.startsWith('ram-')).sort()

async function chainLengths(td: TestDaemon, vm: string): Promise<number[]> {
  return (await td.api('GET', `/v1/vms/${vm}`)).body.disks.map((d: any) => d.chain.length)
}

async function nothingChanged(t: Test, td: TestDaemon, vm: string, files: string[], what: string): Promise<void> {
  t.same(vmFiles(td, vm), files, `${what}: no file created or removed`)
  t.same((await td.api('GET', `/v1/vms/${vm}/snapshots`)).body.snapshots, [], `${what}: no metadata written`)
  t.same(await chainLengths(td, vm), [1, 1], `${what}: QEMU's graph is as before`)
  t.same(td.daemon.repos.journal.pending(), [], `${what}: no journal entry left`)
}

t.test('a transaction that fails in QEMU, or an overlay that cannot be created, leaves nothing behind', async (t) => {
  let inject = false
  const td = await startTestDaemon(t, {
    hooks: {
      snapshots: {
        transaction: (actions) => {
          if (inject) actions.push({ type: 'blockdev-snapshot-sync', data: { 'node-name': 'no-such-node', 'snapshot-file': '/nonexistent/x.qcow2', format: 'qcow2' } })
        },
      },
    },
  })
  await defineGuestVm(td, 'f', { disks: 2 })
  await op(td, 'f', 'start')
  const files = vmFiles(td, 'f')
  const disksBefore = td.daemon.vms.record('f').runtime.disks

  inject = true
  for (const memory of [false, true]) {
    const res = await td.api('POST', '/v1/vms/f/snapshots?wait=true', { name: 'x', kind: 'external', memory })
    t.equal(res.status, 502, `memory=${memory}: QEMU refused the transaction`)
    t.match(res.body.error.message, /no-such-node|Cannot find/i)
    await nothingChanged(t, td, 'f', files, `failed transaction, memory=${memory}`)
    t.same(td.daemon.vms.record('f').runtime.disks, disksBefore)
    t.equal((await td.api('GET', '/v1/vms/f')).body.state, 'running', 'the guest runs on')
  }
  inject = false

  const res = await td.api('POST', '/v1/vms/f/snapshots?wait=true', { name: 'y', kind: 'external', memory: false, disks: { vdb: { file: 'no-such-dir/vdb.qcow2' } } })
  t.equal(res.status, 400)
  t.equal(res.body.error.code, 'INVALID_PATH')
  await nothingChanged(t, td, 'f', files, 'overlay path that cannot be created')

  const ok = await td.api('POST', '/v1/vms/f/snapshots?wait=true', { name: 'z', kind: 'external', memory: false })
  t.equal(ok.status, 200, 'and a correct snapshot still works afterwards')
  t.same(await chainLengths(td, 'f'), [2, 2])
})

t.test('a store that refuses the metadata (the commit step fails): what the creation made is undone, the guest runs on', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'm', { disks: 2 })
  await op(td, 'm', 'start')
  const files = vmFiles(td, 'm')
  const everyFile = readdirSync(join(td.stateDir, 'vms', 'm')).sort()
  const disksBefore = td.daemon.vms.record('m').runtime.disks
  // A real SQLite failure inside the commit's transaction, as a full disk gives one (on this connection only).
  td.daemon.db.exec("CREATE TEMP TRIGGER refuse_snapshot BEFORE INSERT ON snapshots BEGIN SELECT RAISE(ABORT, 'store refuses the snapshot'); END")
  const kinds = [
    { kind: 'external', memory: false },
    { kind: 'external', memory: true },
    { kind: 'external', memory: true, live: true },
    { kind: 'internal', memory: false },
    { kind: 'internal', memory: true },
  ]
  for (const body of kinds) {
    const what = JSON.stringify(body)
    const res = await td.api('POST', '/v1/vms/m/snapshots?wait=true&timeoutSec=120', { name: 'x', ...body })
    t.equal(res.status, 500, `${what}: the job fails (${JSON.stringify(res.body?.error)})`)
    t.match(res.body?.error?.message, /store refuses the snapshot/, `${what}: with the store's error`)
    await nothingChanged(t, td, 'm', files, what)
    t.same(readdirSync(join(td.stateDir, 'vms', 'm')).sort(), everyFile, `${what}: no RAM state file is left either`)
    t.same(td.daemon.vms.record('m').runtime.disks, disksBefore, `${what}: the store names the disks it named`)
    t.same((await td.api('GET', '/v1/vms/m/check')).body.problems, [], `${what}: store, QEMU and files agree`)
    t.equal((await td.api('GET', '/v1/vms/m')).body.state, 'running', `${what}: the guest runs on`)
  }
  td.daemon.db.exec('DROP TRIGGER refuse_snapshot')
  // The guest's writes while it ran on the removed overlays were merged back: its disk is current.
  t.equal((await op(td, 'm', 'pause')).state, 'succeeded')
  const c = await guestCounters(td, 'm')
  t.same(checkDiskAgainstCounter(slotsOf(await liveDiskBytes(td, 'm', 'vda')), c.counter, c.pending, 0), [], 'the disk holds every write the guest made')
  t.equal((await op(td, 'm', 'resume')).state, 'succeeded')
  const ok = await td.api('POST', '/v1/vms/m/snapshots?wait=true&timeoutSec=120', { name: 'x', kind: 'external', memory: true })
  t.equal(ok.status, 200, `the same name works once the store takes it (${JSON.stringify(ok.body?.error)})`)
})

t.test('bad snapshot requests are refused with a clear status and change nothing', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'b', { disks: 2 })
  await op(td, 'b', 'start')
  const files = vmFiles(td, 'b')
  writeFileSync(join(td.stateDir, 'vms', 'b', 'taken.qcow2'), 'mine')
  const all = [...files, 'taken.qcow2'].sort()
  const cases: Array<[string, unknown, number, RegExp]> = [
    ['bad name', { name: '../x' }, 400, /name/],
    ['name with space', { name: 'a b' }, 400, /name/],
    ['unknown field', { name: 'a', color: 'red' }, 400, /color/],
    ['disk the VM lacks', { name: 'a', disks: { vdz: { exclude: true } } }, 400, /vdz/],
    ['file outside the allowed dirs', { name: 'a', kind: 'external', memory: false, disks: { vda: { file: '/tmp/evil.qcow2' } } }, 400, /outside/],
    ['file with ..', { name: 'a', kind: 'external', memory: false, disks: { vda: { file: '../b/x.qcow2' } } }, 400, /\.\./],
    ['existing file', { name: 'a', kind: 'external', memory: false, disks: { vda: { file: 'taken.qcow2' } } }, 409, /exists/],
    ['existing vmstate file', { name: 'a', kind: 'external', memory: true, vmstateFile: 'taken.qcow2' }, 409, /exists/],
    ['quiesce without agent', { name: 'a', kind: 'external', memory: false, quiesce: true }, 409, /guest agent/],
    ['live without memory', { name: 'a', kind: 'external', memory: false, live: true }, 400, /live/],
    ['nothing to snapshot', { name: 'a', kind: 'external', memory: false, disks: { vda: { exclude: true }, vdb: { exclude: true } } }, 400, /nothing/],
  ]
  for (const [what, body, status, msg] of cases) {
    const res = await td.api('POST', '/v1/vms/b/snapshots', body)
    t.equal(res.status, status, what)
    t.match(res.body.error.message, msg, what)
  }
  t.same(vmFiles(td, 'b'), all, 'no file created')
  t.same((await td.api('GET', '/v1/vms/b/snapshots')).body.snapshots, [])
  t.equal((await td.api('POST', '/v1/vms/none/snapshots', { name: 'a' })).status, 404)
  t.equal((await td.api('GET', '/v1/vms/b/snapshots/none')).status, 404)
  t.equal((await td.api('POST', '/v1/vms/b/snapshots/none/revert')).status, 404)
  t.equal((await td.api('DELETE', '/v1/vms/b/snapshots/none')).status, 404)

  t.equal((await td.api('POST', '/v1/vms/b/snapshots?wait=true', { name: 'one', kind: 'external', memory: false })).status, 200)
  const dup = await td.api('POST', '/v1/vms/b/snapshots', { name: 'one', kind: 'external', memory: false })
  t.equal(dup.status, 409)
  t.equal(dup.body.error.code, 'SNAPSHOT_EXISTS')
  // Internal after external is allowed (snapshot-mixed.test.ts), never under a name in use.
  const mixDup = await td.api('POST', '/v1/vms/b/snapshots', { name: 'one', kind: 'internal', memory: false })
  t.equal(mixDup.status, 409, 'an internal snapshot under the external one\'s name')
  t.equal(mixDup.body.error.code, 'SNAPSHOT_EXISTS')
  await op(td, 'b', 'stop', { force: true })
  const mem = await td.api('POST', '/v1/vms/b/snapshots', { name: 'three', kind: 'external', memory: true })
  t.equal(mem.status, 409, 'memory of a shut-off VM')
  t.match(mem.body.error.message, /running or paused/)

  // Internal needs qcow2: a raw disk is named.
  const td2 = await startTestDaemon(t, { stateDir: join(t.testdir(), 'second') }) // one daemon per state directory
  await defineGuestVm(td2, 'raw', { disks: 1, format: 'raw' })
  const raw = await td2.api('POST', '/v1/vms/raw/snapshots', { name: 'r', kind: 'internal' })
  t.equal(raw.status, 409)
  t.match(raw.body.error.message, /disk vda is raw/)
})

t.test('the snapshot tree and the current snapshot survive a daemon restart; revert works after it', async (t) => {
  const stateDir = t.testdir()
  const first = await startTestDaemon(t, { stateDir })
  await defineGuestVm(first, 'r', { disks: 1, stampMiB: 1 })
  await op(first, 'r', 'start')
  t.ok(await eventually(async () => (await guestCounters(first, 'r')).counter > 50))
  const created = await first.api('POST', '/v1/vms/r/snapshots?wait=true', { name: 'before', kind: 'external', memory: true, live: true })
  t.equal(created.status, 200)
  await first.api('POST', '/v1/vms/r/snapshots?wait=true', { name: 'later', kind: 'external', memory: false })
  const tree = (await first.api('GET', '/v1/vms/r/snapshots')).body.snapshots
  await first.close()

  const second = await startTestDaemon(t, { stateDir })
  const again = (await second.api('GET', '/v1/vms/r/snapshots')).body.snapshots
  t.same(again.map((s: any) => [s.name, s.parent ?? null, s.current]), tree.map((s: any) => [s.name, s.parent ?? null, s.current]))
  t.equal(again.find((s: any) => s.current).name, 'later')
  const rev = await second.api('POST', '/v1/vms/r/snapshots/before/revert?wait=true', { state: 'paused' })
  t.equal(rev.status, 200, 'revert through the new daemon')
  const ram = await dumpRam(second, 'r')
  t.same(checkStampsAgainstCounter(stampsOf(ram), ram.counters.counter, ram.counters.pending), [])
  const disk = td2file(second, 'r')
  t.same(checkDiskAgainstCounter(slotsOf(await diskBytes(disk)), ram.counters.counter, ram.counters.pending, 0), [], 'RAM and disk of "before" came back together')
})

function td2file(td: TestDaemon, vm: string): string {
  return td.daemon.vms.record(vm).runtime.disks[0]!.file
}

t.test('a start and a checkpoint queued back to back both run, in order', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'q', { disks: 1 })
  const start = await td.api('POST', '/v1/vms/q/start')
  const cp = await td.api('POST', '/v1/vms/q/snapshots', { name: 'c', kind: 'external', memory: true })
  t.equal(cp.status, 202, 'the checkpoint is queued behind the start, not refused for the VM being off now')
  const [a, b] = await Promise.all([td.daemon.jobs.wait(start.body.id, 60_000), td.daemon.jobs.wait(cp.body.id, 60_000)])
  t.equal(a.state, 'succeeded')
  t.equal(b.state, 'succeeded')
  t.equal((b.result as any).snapshot.memory, true)
  const bad = await td.api('POST', '/v1/vms/q/snapshots?wait=true', { name: 'd', kind: 'external', memory: true, disks: { vda: { file: '/etc/x.qcow2' } } })
  t.equal(bad.status, 400, 'with an idle queue, bad input is still refused before any job')
})
