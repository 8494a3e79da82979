// Paths checked where they are used (issue 10, item 3), against real QEMU: hostile backing files,
// symlinks and FIFOs planted after define, over-long paths and missing directories.
import { execFileSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, symlinkSync } from 'node:fs'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { defineGuestVm, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { makeGuestDisk } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

const img = (...args: string[]): string => execFileSync('qemu-img', args, { encoding: 'utf8' })
const sha = (f: string): string => createHash('sha256').update(readFileSync(f)).digest('hex')

async function setup(t: Test, config = {}): Promise<{ td: TestDaemon; state: string; out: string; vmDir: (vm: string) => string }> {
  const root = t.testdir({ state: {}, outside: {} })
  const td = await startTestDaemon(t, { stateDir: `${root}/state`, config })
  return { td, state: `${root}/state`, out: `${root}/outside`, vmDir: (vm) => join(root, 'state', 'vms', vm) }
}

/** Asserts a start was refused with 400 INVALID_PATH and no QEMU was ever spawned for the VM. */
async function startRefused(t: Test, td: TestDaemon, dir: string, vm: string, message: RegExp): Promise<void> {
  const t0 = performance.now()
  const res = await td.api('POST', `/v1/vms/${vm}/start?wait=true&timeoutSec=60`)
  t.equal(res.status, 400, `start of ${vm} refused with 400 (${Math.round(performance.now() - t0)} ms)`)
  t.match(res.body.error, { code: 'INVALID_PATH', message })
  const view = (await td.api('GET', `/v1/vms/${vm}`)).body
  t.equal(view.state, 'shutoff', 'the VM stays shut off')
  t.notOk(view.pid, 'no QEMU runs')
  t.notOk(existsSync(join(dir, 'qemu.log')), 'QEMU was never spawned (launch opens qemu.log first)')
}

t.test('a hostile backing file in a qcow2 header: define refused; planted after define, start refused', async (t) => {
  const { td, out, vmDir } = await setup(t)
  await makeGuestDisk(`${out}/secret.raw`, { format: 'raw', sizeMiB: 1, boot: true })
  const before = sha(`${out}/secret.raw`)
  mkdirSync(vmDir('h'), { recursive: true })
  img('create', '-q', '-f', 'qcow2', '-b', `${out}/secret.raw`, '-F', 'raw', `${vmDir('h')}/hostile.qcow2`)
  const res = await td.api('POST', '/v1/vms', { name: 'h', memoryMiB: 32, disks: [{ id: 'vda', file: 'hostile.qcow2' }] })
  t.equal(res.status, 400, 'define refused')
  t.match(res.body.error, { code: 'INVALID_PATH', message: /disks\[0\]\.file \(backing file .*secret\.raw, layer 1\) .* outside the allowed directories/ })
  t.equal((await td.api('GET', '/v1/vms/h')).status, 404, 'nothing stored')

  // A chain of three whose bottom layer is outside: refused at define too.
  img('create', '-q', '-f', 'qcow2', '-b', `${out}/secret.raw`, '-F', 'raw', `${vmDir('h')}/l1.qcow2`)
  img('create', '-q', '-f', 'qcow2', '-b', 'l1.qcow2', '-F', 'qcow2', `${vmDir('h')}/l2.qcow2`)
  img('create', '-q', '-f', 'qcow2', '-b', 'l2.qcow2', '-F', 'qcow2', `${vmDir('h')}/l3.qcow2`)
  const chain = await td.api('POST', '/v1/vms', { name: 'h', memoryMiB: 32, disks: [{ id: 'vda', file: 'l3.qcow2' }] })
  t.equal(chain.status, 400, 'a chain of 3 with the bottom outside: define refused')
  t.match(chain.body.error, { code: 'INVALID_PATH', message: /layer 3\) .* outside/ })

  // Planted after define: the good disk is replaced by an image naming the outside file.
  await defineGuestVm(td, 'late')
  const disk = `${vmDir('late')}/disk0.qcow2`
  rmSync(disk)
  img('create', '-q', '-f', 'qcow2', '-b', `${out}/secret.raw`, '-F', 'raw', disk)
  await startRefused(t, td, vmDir('late'), 'late', /backing file .*secret\.raw.* outside/)
  // And as the bottom of a chain of three planted after define.
  rmSync(disk)
  img('create', '-q', '-f', 'qcow2', '-b', `${vmDir('h')}/l2.qcow2`, '-F', 'qcow2', disk)
  await startRefused(t, td, vmDir('late'), 'late', /layer 3\) .* outside/)
  t.equal(sha(`${out}/secret.raw`), before, 'the outside file is untouched')
})

t.test('a symlink swapped into the VM directory after define is not followed at start', async (t) => {
  const { td, out, vmDir } = await setup(t)
  await defineGuestVm(td, 'sym')
  await makeGuestDisk(`${out}/target.qcow2`, { format: 'qcow2', sizeMiB: 16, boot: true })
  const before = { hash: sha(`${out}/target.qcow2`), mtime: statSync(`${out}/target.qcow2`).mtimeMs }
  const disk = `${vmDir('sym')}/disk0.qcow2`
  rmSync(disk)
  symlinkSync(`${out}/target.qcow2`, disk)
  await startRefused(t, td, vmDir('sym'), 'sym', /outside the allowed directories/)
  t.same({ hash: sha(`${out}/target.qcow2`), mtime: statSync(`${out}/target.qcow2`).mtimeMs }, before, 'the outside file is untouched')

  // A dangling symlink where qmpd is to create a disk (sizeMiB): nothing is created outside.
  const made = await td.api('POST', '/v1/vms', { name: 'mk', memoryMiB: 16, disks: [{ id: 'vda', file: 'made.qcow2', sizeMiB: 8 }] })
  t.equal(made.status, 201)
  mkdirSync(vmDir('mk'), { recursive: true })
  symlinkSync(`${out}/created.qcow2`, `${vmDir('mk')}/made.qcow2`)
  await startRefused(t, td, vmDir('mk'), 'mk', /outside the allowed directories/)
  t.notOk(existsSync(`${out}/created.qcow2`), 'no file was created through the symlink')
})

t.test('a FIFO as disk: define refused at once; planted after define, GET /v1/vms still answers fast', async (t) => {
  const { td, vmDir } = await setup(t)
  mkdirSync(vmDir('f'), { recursive: true })
  execFileSync('mkfifo', [`${vmDir('f')}/disk.qcow2`])
  let t0 = performance.now()
  const res = await td.api('POST', '/v1/vms', { name: 'f', memoryMiB: 16, disks: [{ id: 'vda', file: 'disk.qcow2' }] })
  const defineMs = performance.now() - t0
  t.equal(res.status, 400)
  t.match(res.body.error, { code: 'INVALID_PATH', message: /is a FIFO; a regular file is needed/ })
  t.ok(defineMs < 1000, `define refused in ${Math.round(defineMs)} ms`)

  await defineGuestVm(td, 'fl')
  const disk = `${vmDir('fl')}/disk0.qcow2`
  rmSync(disk)
  execFileSync('mkfifo', [disk])
  t0 = performance.now()
  const list = await td.api('GET', '/v1/vms')
  const listMs = performance.now() - t0
  t.equal(list.status, 200)
  t.ok(listMs < 1000, `GET /v1/vms answered in ${Math.round(listMs)} ms (qemu-img info would block 30 s on the FIFO)`)
  t.match(list.body.vms.find((v: { name: string }) => v.name === 'fl').disks[0], { chain: [], chainError: /a FIFO/ })
  await startRefused(t, td, vmDir('fl'), 'fl', /is a FIFO/)
})

t.test('a FIFO as restore file: 400 at once, and five at a time leave the daemon serving', async (t) => {
  const { td, vmDir } = await setup(t)
  await defineGuestVm(td, 'r')
  execFileSync('mkfifo', [`${vmDir('r')}/state.fifo`])
  let t0 = performance.now()
  const one = await td.api('POST', '/v1/vms/r/restore', { file: 'state.fifo' })
  t.equal(one.status, 400)
  t.match(one.body.error, { code: 'INVALID_PATH', message: /is a FIFO/ })
  t.ok(performance.now() - t0 < 1000, `refused in ${Math.round(performance.now() - t0)} ms`)
  // Before, each such request held a libuv thread in open() for good: four of them starved every
  // other file operation of the daemon.
  t0 = performance.now()
  const five = await Promise.all(Array.from({ length: 5 }, () => td.api('POST', '/v1/vms/r/restore', { file: 'state.fifo' })))
  const fiveMs = performance.now() - t0
  t.same(five.map((r) => r.status), [400, 400, 400, 400, 400])
  t.ok(fiveMs < 1000, `five concurrent refused in ${Math.round(fiveMs)} ms`)
  t0 = performance.now()
  const health = await td.api('GET', '/healthz')
  t.equal(health.status, 200)
  t.ok(performance.now() - t0 < 200, `/healthz answered in ${Math.round(performance.now() - t0)} ms`)
  const list = await td.api('GET', '/v1/vms')
  t.equal(list.status, 200, 'GET /v1/vms (thread-pool work: qemu-img, stat) still answers')
  t.equal((await td.api('POST', '/v1/vms/r/restore', { file: '/dev/zero' })).status, 400, 'a device as restore file: 400')
  t.equal((await td.api('POST', '/v1/vms/r/restore', { file: '.' })).status, 400, 'a directory as restore file: 400')
})

t.test('a path over PATH_MAX once made absolute: 400, the store stays readable, the daemon restarts', async (t) => {
  const { td, state } = await setup(t)
  const long = Array.from({ length: 1024 }, () => 'abc').join('/') + 'x'
  t.equal(long.length, 4096, 'the longest path the request schema accepts')
  const res = await td.api('POST', '/v1/vms', { name: 'long', memoryMiB: 16, disks: [{ id: 'vda', file: long, sizeMiB: 1 }] })
  t.equal(res.status, 400)
  t.match(res.body.error, { code: 'INVALID_PATH', message: /disks\[0\]\.file is \d+ bytes long as an absolute path; the limit is 4095/ })
  t.equal((await td.api('POST', '/v1/vms', { name: 'long', memoryMiB: 16, disks: [{ id: 'vda', file: `${'n'.repeat(256)}.qcow2` }] })).status, 400, 'a component over 255 bytes: 400')
  t.equal((await td.api('POST', '/v1/vms', { name: 'long', memoryMiB: 16, kernel: long })).status, 400, 'the kernel path too')
  t.equal((await td.api('GET', '/v1/vms')).status, 200, 'GET /v1/vms still 200')
  await td.close()
  const again = await startTestDaemon(t, { stateDir: state })
  const list = await again.api('GET', '/v1/vms')
  t.equal(list.status, 200, 'the daemon restarts on the same store')
  t.same(list.body.vms, [], 'and nothing was stored')
})

t.test('files to be created need an existing directory: 400, nothing changes', async (t) => {
  const root = t.testdir({ extra: {} })
  const { td, vmDir } = await setup(t, { allowedDirs: [`${root}/extra`] })
  const def = await td.api('POST', '/v1/vms', { name: 'nd', memoryMiB: 16, disks: [{ id: 'vda', file: `${root}/extra/nodir/d.qcow2`, sizeMiB: 8 }] })
  t.equal(def.status, 400, 'a disk to create in a missing directory outside the VM directory')
  t.match(def.body.error, { code: 'INVALID_PATH', message: /the directory .*extra\/nodir does not exist/ })
  const sub = await td.api('POST', '/v1/vms', { name: 'nd', memoryMiB: 16, disks: [{ id: 'vda', file: 'sub/d.qcow2', sizeMiB: 8 }] })
  t.equal(sub.status, 201, 'under the VM directory qmpd makes the directories itself')

  await defineGuestVm(td, 'run')
  await op(td, 'run', 'start')
  const save = await td.api('POST', '/v1/vms/run/save', { file: 'nodir/x.state' })
  t.equal(save.status, 400, 'save into a missing directory')
  t.match(save.body.error, { code: 'INVALID_PATH', message: /does not exist/ })
  const snap = await td.api('POST', '/v1/vms/run/snapshots', { name: 's1', kind: 'external', memory: true, vmstateFile: 'nodir/s1.vmstate' })
  t.equal(snap.status, 400, 'a checkpoint whose RAM state file has no directory')
  const overlay = await td.api('POST', '/v1/vms/run/snapshots', { name: 's1', kind: 'external', memory: false, disks: { vda: { file: 'nodir/o.qcow2' } } })
  t.equal(overlay.status, 400, 'an overlay without a directory')
  const copy = await td.api('POST', '/v1/vms/run/disks/vda/copy', { dest: 'nodir/c.qcow2' })
  t.equal(copy.status, 400, 'a copy without a directory')
  const fifo = `${vmDir('run')}/fifo`
  execFileSync('mkfifo', [fifo])
  const fifoCopy = await td.api('POST', '/v1/vms/run/disks/vda/copy', { dest: 'fifo' })
  t.equal(fifoCopy.status, 400, 'a FIFO as copy target: 400')
  t.match(fifoCopy.body.error, { code: 'INVALID_PATH', message: /a FIFO/ })
  t.equal((await td.api('POST', '/v1/vms/run/save', { file: 'fifo' })).status, 400, 'a FIFO as save target: 400')
  t.equal((await td.api('POST', '/v1/vms/run/snapshots', { name: 's1', kind: 'external', memory: true, vmstateFile: 'fifo' })).status, 400, 'a FIFO as RAM state file: 400')
  t.equal((await td.api('POST', '/v1/vms/run/snapshots', { name: 's1', kind: 'external', memory: false, disks: { vda: { file: 'fifo' } } })).status, 400, 'a FIFO as overlay: 400')
  t.equal((await td.api('POST', '/v1/vms/run/save', { file: 'disk0.qcow2' })).status, 409, 'a regular file in the way stays 409 FILE_EXISTS')
  const view = (await td.api('GET', '/v1/vms/run')).body
  t.equal(view.state, 'running', 'the VM runs on')
  t.same((await td.api('GET', '/v1/vms/run/snapshots')).body.snapshots, [], 'no snapshot was made')
  t.same((await td.api('GET', '/v1/jobs?vm=run')).body.jobs.map((j: { op: string }) => j.op), ['start'], 'no job was made')
  t.notOk(existsSync(`${vmDir('run')}/nodir`), 'no directory was made')
  await op(td, 'run', 'stop', { force: true })
})
