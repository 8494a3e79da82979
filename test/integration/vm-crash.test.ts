// Crash robustness of the VM process layer against real QEMU: a wedged QEMU.
import { join } from 'node:path'
import t from 'tap'
import { isAlive, waitForExit } from '../../src/vm/proc.ts'
import { defineGuestVm, eventually, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

const QUIT_TIMEOUT_MS = 2_000

async function vm(td: TestDaemon, name: string): Promise<any> {
  return (await td.api('GET', `/v1/vms/${name}`)).body
}

t.test('force stop ends a QEMU that answers nothing (SIGSTOP): SIGKILL after the quit timeout', async (t) => {
  const td = await startTestDaemon(t, { config: { quitTimeoutMs: QUIT_TIMEOUT_MS } })
  await defineGuestVm(td, 'wedged')
  await op(td, 'wedged', 'start')
  const { pid } = await vm(td, 'wedged')
  process.kill(pid, 'SIGSTOP')
  t.teardown(() => {
    if (isAlive(pid)) process.kill(pid, 'SIGCONT')
  })
  const t0 = Date.now()
  const job = await op(td, 'wedged', 'stop', { force: true })
  const ms = Date.now() - t0
  t.equal(job.state, 'succeeded', 'the stop job succeeds')
  t.match(job.result, { method: 'quit+kill', state: 'shutoff' })
  t.ok(ms >= QUIT_TIMEOUT_MS && ms < QUIT_TIMEOUT_MS + 5000, `within the quit timeout and a few seconds (${ms} ms)`)
  t.notOk(isAlive(pid), 'the QEMU process is gone')
  t.match(await vm(td, 'wedged'), { state: 'shutoff', reason: 'destroyed' })
  t.equal((await op(td, 'wedged', 'start')).state, 'succeeded', 'and the VM starts again')
})

t.test('a stop without a QMP connection (state unknown) kills the recorded QEMU at once', async (t) => {
  const td = await startTestDaemon(t, { config: { quitTimeoutMs: QUIT_TIMEOUT_MS } })
  await defineGuestVm(td, 'mute')
  await op(td, 'mute', 'start')
  const { pid } = await vm(td, 'mute')
  // The QMP connection drops but the process runs on: after 5 s the VM is 'unknown'.
  await td.daemon.vms.qmp('mute').disconnect()
  t.ok(await eventually(async () => (await vm(td, 'mute')).state === 'unknown', 10_000), 'the VM is unknown')
  t.ok(isAlive(pid))
  const job = await op(td, 'mute', 'stop', { force: true })
  t.match(job.result, { method: 'kill', state: 'shutoff' })
  t.notOk(isAlive(pid), 'the QEMU process is gone')
  t.match(await vm(td, 'mute'), { state: 'shutoff', reason: 'destroyed' })
})
