// Managed save, save/restore to a chosen file, and the SSE event stream, against real QEMU.
import { execFile } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { promisify } from 'node:util'
import { request } from 'node:http'
import { join } from 'node:path'
import t from 'tap'
import { buildArgv } from '../../src/vm/argv.ts'
import { checkMigrationStream } from '../../src/state/ramfile.ts'
import { waitForExit } from '../../src/vm/proc.ts'
import { QemuImg } from '../../src/images/qemu-img.ts'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon } from '../helpers/daemon.ts'
import { GUEST_COUNTER_ADDR, parseCounters } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { restoreWithPlainQemu } from '../helpers/snap.ts'

const run = promisify(execFile)

t.before(() => {
  requireQemu(t)
})

t.test('managed save, daemon restart, start: the guest counts on from the saved counter', async (t) => {
  const stateDir = t.testdir()
  const first = await startTestDaemon(t, { stateDir })
  await defineGuestVm(first, 'ms', { disks: 1 })
  await op(first, 'ms', 'start')
  t.ok(await eventually(async () => (await guestCounters(first, 'ms')).counter > 50))
  const { pid } = (await first.api('GET', '/v1/vms/ms')).body
  const saved = await op(first, 'ms', 'managedsave')
  const file = join(stateDir, 'vms', 'ms', 'managed.save')
  t.match(saved.result, { state: 'saved', file })
  t.ok((await checkMigrationStream(file)) > 64 * 1024, `managed save file is a migration stream of ${statSync(file).size} bytes`)
  t.ok(await waitForExit(pid, 5000), 'QEMU exited')
  t.equal((await first.api('GET', '/v1/vms/ms')).body.state, 'saved')
  t.equal((await first.api('POST', '/v1/vms/ms/managedsave')).status, 409, 'nothing to save while saved')
  await first.close()

  const second = await startTestDaemon(t, { stateDir })
  t.equal((await second.api('GET', '/v1/vms/ms')).body.state, 'saved', 'still saved after a daemon restart')
  const started = await op(second, 'ms', 'start', { paused: true })
  t.match(started.result, { restoredFromManagedSave: true })
  const c = await guestCounters(second, 'ms')
  t.ok(c.counter > 50, `restored counter ${c.counter}`)
  t.notOk(existsSync(file), 'the managed save file is gone from its place once the restore succeeded')
  t.ok(await eventually(async () => !existsSync(`${file}.restored`)), 'and its renamed copy is deleted in the background')
  await op(second, 'ms', 'resume')
  t.ok(await eventually(async () => (await guestCounters(second, 'ms')).counter > c.counter + 20), 'counts on from there')

  // Discarding a managed save: the next start boots afresh.
  await op(second, 'ms', 'managedsave')
  t.equal((await second.api('DELETE', '/v1/vms/ms/managedsave')).status, 204)
  t.equal((await second.api('GET', '/v1/vms/ms')).body.state, 'shutoff')
  t.notOk(existsSync(file))
  await op(second, 'ms', 'start')
  t.ok(await eventually(async () => (await guestCounters(second, 'ms')).counter > 0))
})

t.test('save to a chosen file and restore it, with qmpd and with plain qemu-system-x86_64', async (t) => {
  const td = await startTestDaemon(t)
  const def = await defineGuestVm(td, 'sv', { disks: 1 })
  await op(td, 'sv', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 'sv')).counter > 50))
  const file = join(td.stateDir, 'vms', 'sv', 'my.state')
  const s = await op(td, 'sv', 'save', { file })
  t.match(s.result, { state: 'shutoff', file })
  t.ok(s.result && (s.result as any).bytes > 0)
  t.equal((await td.api('GET', '/v1/vms/sv')).body.state, 'shutoff')
  t.equal((await td.api('POST', '/v1/vms/sv/save', { file: 'other.state' })).status, 409, 'save of a shut-off VM')

  // Plain QEMU restores the file (on a throwaway overlay, so the VM's disk stays as saved).
  const dir = join(td.stateDir, 'plain')
  mkdirSync(dir)
  const overlay = join(dir, 'o.qcow2')
  await new QemuImg().create(overlay, 'qcow2', { backing: { file: def.definition.disks[0].file, format: 'qcow2' } })
  const argv = buildArgv({ ...def.definition, serialLog: false }, { accel: 'tcg', disks: [{ id: 'vda', file: overlay, format: 'qcow2', gen: 0 }] })
  const qmp = await restoreWithPlainQemu(t, dir, argv, file)
  t.pass('plain QEMU loaded the saved state')
  await qmp.cmd('pmemsave', { val: GUEST_COUNTER_ADDR, size: 16, filename: join(dir, 'c.bin') })
  const { readFile } = await import('node:fs/promises')
  const plain = parseCounters(await readFile(join(dir, 'c.bin')))
  t.ok(plain.counter > 50, `plain QEMU restored counter ${plain.counter}`)
  await qmp.cmd('quit').catch(() => {})

  const r = await op(td, 'sv', 'restore', { file })
  t.match(r.result, { state: 'running' })
  const c = await guestCounters(td, 'sv')
  t.ok(c.counter >= plain.counter, 'qmpd restores the same state')
  t.ok(existsSync(file), 'restore keeps the file (like virsh restore)')
})

t.test('a save that runs out of disk leaves no file and the VM running', async (t) => {
  const small = mkdtempSync(join(tmpdir(), 'qmpd-savefull-'))
  await run('mount', ['-t', 'tmpfs', '-o', 'size=512k', 'tmpfs', small])
  t.teardown(async () => {
    await run('umount', ['-l', small]).catch(() => {})
    rmSync(small, { recursive: true, force: true })
  })
  const td = await startTestDaemon(t, { config: { allowedDirs: [small] } })
  await defineGuestVm(td, 'full', { disks: 1, stampMiB: 4, memoryMiB: 32 })
  await op(td, 'full', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 'full')).counter > 20))
  const res = await td.api('POST', '/v1/vms/full/save?wait=true', { file: join(small, 'x.state') })
  t.equal(res.status, 507, 'the save fails: insufficient storage')
  t.equal(res.body.error.code, 'IO_ERROR')
  t.match(res.body.error.message, /no space left on device/i)
  t.same(readdirSync(small), [], 'no file (not even a partial one) is left')
  t.equal((await td.api('GET', '/v1/vms/full')).body.state, 'running', 'the VM runs on')
  const c = (await guestCounters(td, 'full')).counter
  t.ok(await eventually(async () => (await guestCounters(td, 'full')).counter > c + 10), 'and counts on')
})

t.test('GET /v1/events streams a job from queued to succeeded, filtered by VM and type', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'ev', { disks: 1 })
  await defineGuestVm(td, 'other', { disks: 1 })
  const address = await td.app.listen({ host: '127.0.0.1', port: 0 })
  const port = Number(new URL(address).port)
  const events: any[] = []
  const req = request({ host: '127.0.0.1', port, path: '/v1/events?vm=ev&types=job,vm' })
  req.end()
  const res = await new Promise<import('node:http').IncomingMessage>((r) => req.once('response', r))
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /text\/event-stream/)
  let buf = ''
  res.setEncoding('utf8')
  res.on('data', (d: string) => {
    buf += d
    let i
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i)
      buf = buf.slice(i + 2)
      const data = block.split('\n').find((l) => l.startsWith('data: '))
      if (data) events.push(JSON.parse(data.slice(6)))
    }
  })
  await op(td, 'other', 'start')
  const job = await op(td, 'ev', 'start')
  t.ok(await eventually(() => events.some((e) => e.type === 'job' && e.job.id === job.id && e.job.state === 'succeeded'), 5000))
  const states = events.filter((e) => e.type === 'job' && e.job.id === job.id).map((e) => e.job.state)
  t.same([states[0], states.at(-1)], ['queued', 'succeeded'], 'from queued to succeeded')
  t.ok(states.includes('running'))
  t.ok(events.some((e) => e.type === 'vm' && e.state === 'running'), 'VM state changes too')
  t.notOk(events.some((e) => e.vm !== 'ev'), 'only the VM asked for')
  t.notOk(events.some((e) => e.type === 'qmp'), 'only the types asked for')
  req.destroy()
  const bad = await td.api('GET', '/v1/events?types=bogus')
  t.equal(bad.status, 400)
})
