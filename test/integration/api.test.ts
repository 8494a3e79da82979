// The API's answers to bad input and QEMU faults, and the QMP escape hatch, against real QEMU.
import { readdirSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { defineGuestVm, op, startTestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

t.test('bad definitions are refused with 400 and change nothing', async (t) => {
  const td = await startTestDaemon(t)
  const cases: Array<[string, unknown, RegExp]> = [
    ['unknown field', { name: 'a', bogus: 1 }, /bogus/],
    ['wrong type', { name: 'a', memoryMiB: 'lots' }, /memoryMiB/],
    ['bad name', { name: '-a' }, /name/],
    ['name too long', { name: 'a'.repeat(65) }, /name/],
    ['name with slash', { name: 'a/b' }, /name/],
    ['path with ..', { name: 'a', disks: [{ id: 'vda', file: '../../etc/passwd' }] }, /\.\./],
    ['path with NUL', { name: 'a', disks: [{ id: 'vda', file: 'x\u0000y' }] }, /NUL/],
    ['duplicate disk id', { name: 'a', disks: [{ id: 'vda', file: 'a' }, { id: 'vda', file: 'b' }] }, /duplicate/],
    ['bad disk id', { name: 'a', disks: [{ id: 'VDA', file: 'a' }] }, /id/],
    ['initrd without kernel', { name: 'a', initrd: 'x' }, /kernel/],
    ['not an object', [1, 2], /./],
  ]
  for (const [what, body, msg] of cases) {
    const res = await td.api('POST', '/v1/vms', body)
    t.equal(res.status, 400, what)
    t.equal(res.body.error.code, 'INVALID_INPUT', what)
    t.match(res.body.error.message, msg, what)
  }
  const outside = await td.api('POST', '/v1/vms', { name: 'a', disks: [{ id: 'vda', file: '/etc/passwd' }] })
  t.equal(outside.status, 400)
  t.equal(outside.body.error.code, 'INVALID_PATH')
  const garbage = await td.app.inject({ method: 'POST', url: '/v1/vms', headers: { 'content-type': 'application/json' }, payload: '{"name":' })
  t.equal(garbage.statusCode, 400)
  t.equal(JSON.parse(garbage.body).error.code, 'INVALID_INPUT')
  t.same((await td.api('GET', '/v1/vms')).body.vms, [], 'no VM was stored')
  t.same(readdirSync(join(td.stateDir, 'vms')), [], 'no VM directory was created')
})

t.test('names, states and unknown things: 404 and 409', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'one')
  const dup = await td.api('POST', '/v1/vms', { name: 'one' })
  t.equal(dup.status, 409)
  t.equal(dup.body.error.code, 'VM_EXISTS')
  t.equal((await td.api('GET', '/v1/vms/none')).status, 404)
  t.equal((await td.api('POST', '/v1/vms/none/start')).status, 404)
  t.equal((await td.api('GET', '/v1/vms/bad%2Fname')).status, 400)
  t.equal((await td.api('GET', '/v1/jobs/00000000-0000-4000-8000-000000000000')).status, 404)
  t.equal((await td.api('GET', '/v1/jobs/not-a-uuid')).status, 400)
  t.equal((await td.api('GET', '/v1/nothing')).status, 404)
  t.equal((await td.api('POST', '/v1/vms/one/pause')).status, 409, 'pause of a shut-off VM')
  t.equal((await td.api('POST', '/v1/vms/one/stop', { force: 'yes' })).status, 400, 'stop with a wrong type')
  await op(td, 'one', 'start')
  const del = await td.api('DELETE', '/v1/vms/one')
  t.equal(del.status, 409, 'delete while running')
  t.equal(del.body.error.code, 'INVALID_STATE')
  t.equal((await td.api('POST', '/v1/vms/one/start')).status, 409, 'start while running')
  await op(td, 'one', 'stop', { force: true })
  t.equal((await td.api('DELETE', '/v1/vms/one')).status, 204)
  t.equal((await td.api('GET', '/v1/vms/one')).status, 404)
})

t.test('deleteStorage removes what qmpd created and nothing else', async (t) => {
  const td = await startTestDaemon(t)
  const res = await td.api('POST', '/v1/vms', { name: 'mk', memoryMiB: 16, disks: [{ id: 'vda', file: 'made.qcow2', sizeMiB: 8 }] })
  t.equal(res.status, 201)
  t.equal(res.body.definition.disks[0].file, join(td.stateDir, 'vms', 'mk', 'made.qcow2'))
  const started = await op(td, 'mk', 'start', { paused: true })
  t.equal(started.result && (started.result as any).state, 'paused', 'started paused on request')
  const vm = (await td.api('GET', '/v1/vms/mk')).body
  t.equal(vm.disks[0].chain[0].virtualSize, 8 * 1024 * 1024, 'disk created with the requested size')
  await op(td, 'mk', 'stop', { force: true })
  t.equal((await td.api('DELETE', '/v1/vms/mk?deleteStorage=true')).status, 204)
  t.same(readdirSync(join(td.stateDir, 'vms')), [], 'VM directory removed with the disk it created')
})

t.test('a missing disk file or QEMU binary fails the start with a clear error; the VM stays off', async (t) => {
  const td = await startTestDaemon(t, { config: { qemuBinary: '/nonexistent/qemu-system-x86_64' } })
  await defineGuestVm(td, 'nobin')
  const res = await td.api('POST', '/v1/vms/nobin/start?wait=true')
  t.equal(res.status, 503)
  t.equal(res.body.error.code, 'QEMU_NOT_FOUND')
  t.equal(res.body.job.state, 'failed')
  t.equal((await td.api('GET', '/v1/vms/nobin')).body.state, 'shutoff')

  const td2 = await startTestDaemon(t, { stateDir: join(t.testdir(), 'second') }) // one daemon per state directory
  await td2.api('POST', '/v1/vms', { name: 'nodisk', disks: [{ id: 'vda', file: 'missing.qcow2' }] })
  const r2 = await td2.api('POST', '/v1/vms/nodisk/start?wait=true')
  t.equal(r2.status, 409)
  t.match(r2.body.error.message, /missing\.qcow2 does not exist/)
  t.equal((await td2.api('GET', '/v1/vms/nodisk')).body.state, 'shutoff')
})

t.test('QEMU refusing to start reports its own message', async (t) => {
  const td = await startTestDaemon(t)
  // A raw disk declared as qcow2: refused at define (no qcow2 magic), before anything probes it.
  const { writeFileSync, mkdirSync } = await import('node:fs')
  mkdirSync(join(td.stateDir, 'vms', 'liar'), { recursive: true })
  writeFileSync(join(td.stateDir, 'vms', 'liar', 'x.qcow2'), Buffer.alloc(1024 * 1024))
  const liar = await td.api('POST', '/v1/vms', { name: 'liar', disks: [{ id: 'vda', file: 'x.qcow2', format: 'qcow2' }] })
  t.equal(liar.status, 400)
  t.match(liar.body.error.message, /not a qcow2 image/)
  // QEMU refusing to start (here: a qcow2 with an incompatible feature bit QEMU does not know) is
  // 502 with the end of qemu.log.
  const { execFileSync } = await import('node:child_process')
  const { openSync, writeSync, closeSync } = await import('node:fs')
  mkdirSync(join(td.stateDir, 'vms', 'nokernel'), { recursive: true })
  const odd = join(td.stateDir, 'vms', 'nokernel', 'odd.qcow2')
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', odd, '1M'])
  const fd = openSync(odd, 'r+')
  writeSync(fd, Buffer.from([0x80, 0, 0, 0, 0, 0, 0, 0]), 0, 8, 72) // incompatible_features bit 63
  closeSync(fd)
  t.equal((await td.api('POST', '/v1/vms', { name: 'nokernel', memoryMiB: 32, disks: [{ id: 'vda', file: 'odd.qcow2' }] })).status, 201)
  const res = await td.api('POST', '/v1/vms/nokernel/start?wait=true')
  t.equal(res.status, 502)
  t.equal(res.body.error.code, 'QEMU_START_FAILED')
  t.match(res.body.error.message, /feature/i, 'the message carries QEMU\'s own words')
  t.match((await td.api('GET', '/v1/vms/nokernel')).body, { state: 'shutoff', reason: 'failed to start' }, 'an exit with a code is no crash')
})

t.test('the QMP escape hatch passes commands and QEMU\'s errors through', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'esc')
  await op(td, 'esc', 'start')
  const st = await td.api('POST', '/v1/vms/esc/qmp', { execute: 'query-status' })
  t.equal(st.status, 200)
  t.equal(st.body.return.status, 'running')
  const hmp = await td.api('POST', '/v1/vms/esc/qmp', { execute: 'human-monitor-command', arguments: { 'command-line': 'info status' } })
  t.match(hmp.body.return, /running/)
  const bad = await td.api('POST', '/v1/vms/esc/qmp', { execute: 'no-such-command' })
  t.equal(bad.status, 422, 'QEMU refusing the client\'s own command is the client\'s error')
  t.equal(bad.body.error.code, 'QMP_COMMAND_REFUSED')
  t.equal(bad.body.error.details.qmpClass, 'CommandNotFound')
  const badArgs = await td.api('POST', '/v1/vms/esc/qmp', { execute: 'pmemsave', arguments: { val: 'x' } })
  t.equal(badArgs.status, 422)
  t.equal(badArgs.body.error.details.qmpClass, 'GenericError')
  const shell = await td.api('POST', '/v1/vms/esc/qmp', { execute: 'query-status; rm -rf /' })
  t.equal(shell.status, 400, 'not a command name')
  // A pause through the escape hatch is still seen by qmpd (from QEMU's STOP event).
  await td.api('POST', '/v1/vms/esc/qmp', { execute: 'stop' })
  const { eventually } = await import('../helpers/daemon.ts')
  t.ok(await eventually(async () => (await td.api('GET', '/v1/vms/esc')).body.state === 'paused', 3000))
})

t.test('?wait=true with a short timeout answers 202 with the running job', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'w')
  await op(td, 'w', 'start')
  const t0 = Date.now()
  const res = await td.api('POST', '/v1/vms/w/stop?wait=true&timeoutSec=1', { timeoutSec: 3 })
  t.equal(res.status, 202)
  t.ok(Date.now() - t0 < 2500)
  t.equal(res.body.state, 'running')
  const done = await td.daemon.jobs.wait(res.body.id, 20_000)
  t.equal(done.state, 'succeeded')
  t.equal((await td.api('GET', `/v1/jobs?vm=w&limit=1`)).body.jobs[0].id, res.body.id)
})
