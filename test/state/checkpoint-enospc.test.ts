// A live checkpoint (background snapshot) whose RAM file runs out of space mid-stream: a clean
// 507, nothing left behind, and the guest's vCPUs run on afterwards (the boot-sector guest's
// counter advances; under QEMU 7.2 a background snapshot that does not complete leaves them
// asleep in userfaultfd), a second live checkpoint works, and a plain force stop ends QEMU.
import { execFile } from 'node:child_process'
import { mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t from 'tap'
import { isAlive } from '../../src/vm/proc.ts'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

const run = promisify(execFile)

t.before(() => {
  requireQemu(t)
})

t.test('ENOSPC during a live checkpoint: 507, and the guest runs on', async (t) => {
  // Outside the test directory: tap removes that before late teardowns run.
  const small = mkdtempSync(join(tmpdir(), 'qmpd-cpfull-'))
  try {
    await run('mount', ['-t', 'tmpfs', '-o', 'size=512k', 'tmpfs', small])
  } catch (err) {
    rmSync(small, { recursive: true, force: true })
    const why = `cannot mount a tmpfs on ${small} (needs root): ${String((err as { stderr?: string }).stderr ?? err).trim()}`
    if (process.env['CI'] === 'true') t.fail(why)
    else void t.skip(why, () => {})
    return
  }
  t.teardown(async () => {
    await run('umount', ['-l', small]).catch(() => {})
    rmSync(small, { recursive: true, force: true })
  })
  const td = await startTestDaemon(t, { config: { allowedDirs: [small], quitTimeoutMs: 5_000 } })
  // 4 MiB of stamped RAM: the stream is several times the 512 KiB the RAM file may take.
  await defineGuestVm(td, 'cp', { disks: 1, stampMiB: 4, memoryMiB: 32 })
  await op(td, 'cp', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 'cp')).counter > 20), 'the guest counts')

  const t0 = Date.now()
  const res = await td.api('POST', '/v1/vms/cp/snapshots?wait=true&timeoutSec=120', {
    name: 'full',
    kind: 'external',
    memory: true,
    live: true,
    vmstateFile: join(small, 'full.vmstate'),
  })
  const ms = Date.now() - t0
  t.equal(res.status, 507, `the live checkpoint fails with 507 (${ms} ms): ${JSON.stringify(res.body?.error)}`)
  t.equal(res.body.error.code, 'IO_ERROR')
  t.match(res.body.error.message, /no space left on device/i, 'and says why')
  t.same(readdirSync(small), [], 'no RAM file (not even a partial one) is left')
  t.equal((await td.api('GET', '/v1/vms/cp/snapshots/full')).status, 404, 'no snapshot was recorded')
  t.equal((await td.api('GET', '/v1/vms/cp')).body.state, 'running', 'the VM is running')

  // The vCPUs run: the counter advances (a guest asleep in userfaultfd would stay where it is).
  const c0 = (await guestCounters(td, 'cp')).counter
  const advanced = await eventually(async () => (await guestCounters(td, 'cp')).counter > c0 + 20, 15_000)
  const c1 = (await guestCounters(td, 'cp')).counter
  t.ok(advanced, `the guest runs on after the failed checkpoint (counter ${c0} -> ${c1})`)

  // QEMU takes a new background snapshot (a wedged one refuses it).
  const again = await td.api('POST', '/v1/vms/cp/snapshots?wait=true&timeoutSec=120', { name: 'roomy', kind: 'external', memory: true, live: true })
  t.equal(again.status, 200, `a second live checkpoint, with room, succeeds (${JSON.stringify(again.body?.error ?? again.body?.state)})`)
  const c2 = (await guestCounters(td, 'cp')).counter
  t.ok(await eventually(async () => (await guestCounters(td, 'cp')).counter > c2 + 20, 15_000), 'and the guest runs on after it')

  const { pid } = (await td.api('GET', '/v1/vms/cp')).body
  const stop = await op(td, 'cp', 'stop', { force: true })
  t.equal(stop.state, 'succeeded', `force stop succeeds (${JSON.stringify(stop.result)})`)
  t.match(stop.result, { method: 'quit' }, 'QEMU quit on its own: no SIGKILL was needed')
  t.notOk(isAlive(pid), 'QEMU is gone')
})
