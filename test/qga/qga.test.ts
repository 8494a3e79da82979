/**
 * QgaClient against a real qemu-guest-agent: the Linux test guest (test/helpers/linux-guest.ts)
 * booted under TCG, its agent on a virtio-serial port behind a QEMU chardev socket.
 */

import { execFile, spawn } from 'node:child_process'
import { mkdir, readFile, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { performance } from 'node:perf_hooks'
import { promisify } from 'node:util'
import t, { type Test } from 'tap'
import { QmpdError, TimeoutError } from '../../src/errors.ts'
import { QgaClient, withFrozenFilesystems } from '../../src/qga/client.ts'
import { shortSocketPath } from '../../src/vm/sockpath.ts'
import { ensureLinuxGuest, GUEST_HEARTBEAT, LINUX_GUEST_READY, QGA_PORT_NAME } from '../helpers/linux-guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { RawQmp } from '../helpers/rawqmp.ts'

const execFileP = promisify(execFile)
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms))

/** Boot budget under TCG: the guest is ready in ~7 s on an idle 2-core machine. */
const BOOT_TIMEOUT_MS = 120_000

interface Vm {
  pid: number
  /** Absolute path of the agent's chardev socket (QEMU binds it relative to its cwd). */
  qgaSocket: string
  qmpSocket: string
  serialLog: string
  /** Kills QEMU by PID (SIGKILL) and resolves once it exited. Idempotent. */
  kill(): Promise<void>
  exited(): boolean
  stderr(): string
}

/**
 * Starts qemu-system-x86_64 with the agent's chardev + virtserialport, a QMP socket and the serial
 * console in a file, all relative to `dir` (QEMU's cwd), as qmpd does for long VM directories.
 * The teardown kills it by PID.
 */
function startQemu(t: Test, dir: string, extra: string[]): Vm {
  const args = [
    '-accel', 'tcg',
    '-machine', 'q35',
    '-m', '256',
    '-nodefaults',
    '-display', 'none',
    '-no-reboot',
    '-serial', 'file:serial.log',
    '-qmp', 'unix:qmp.sock,server=on,wait=off',
    '-chardev', 'socket,id=qga0,path=qga.sock,server=on,wait=off',
    '-device', 'virtio-serial-pci',
    '-device', `virtserialport,chardev=qga0,name=${QGA_PORT_NAME}`,
    ...extra,
  ]
  const child = spawn('qemu-system-x86_64', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.setEncoding('utf8')
  child.stderr.on('data', (s: string) => {
    if (stderr.length < 64 * 1024) stderr += s
  })
  let exited = false
  const exit = new Promise<void>((resolve) => {
    child.once('exit', () => {
      exited = true
      resolve()
    })
    child.once('error', () => {
      exited = true
      resolve()
    })
  })
  const pid = child.pid
  const kill = async (): Promise<void> => {
    if (!exited && pid !== undefined) {
      try {
        process.kill(pid, 'SIGKILL')
      } catch {
        // already gone
      }
    }
    await exit
  }
  t.teardown(kill)
  if (pid === undefined) throw new Error(`qemu-system-x86_64 did not start: ${stderr}`)
  return {
    pid,
    qgaSocket: join(dir, 'qga.sock'),
    qmpSocket: join(dir, 'qmp.sock'),
    serialLog: join(dir, 'serial.log'),
    kill,
    exited: () => exited,
    stderr: () => stderr,
  }
}

async function waitForReady(vm: Vm): Promise<number> {
  const started = performance.now()
  for (;;) {
    const log = await readFile(vm.serialLog, 'utf8').catch(() => '')
    if (log.includes(LINUX_GUEST_READY)) return performance.now() - started
    if (vm.exited()) throw new Error(`QEMU exited before the guest was ready.\nstderr: ${vm.stderr()}\nserial:\n${log}`)
    if (performance.now() - started > BOOT_TIMEOUT_MS) {
      throw new Error(`no ${LINUX_GUEST_READY} on the serial console within ${BOOT_TIMEOUT_MS} ms.\nserial:\n${log}`)
    }
    await sleep(100)
  }
}

/** Number of GUEST_HEARTBEAT lines on the serial console so far. */
async function heartbeats(vm: Vm): Promise<number> {
  const log = await readFile(vm.serialLog, 'utf8')
  return log.split('\n').filter((l) => l.startsWith(GUEST_HEARTBEAT)).length
}

async function waitForHeartbeats(vm: Vm, count: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while ((await heartbeats(vm)) < count) {
    if (Date.now() > deadline) throw new Error(`fewer than ${count} ${GUEST_HEARTBEAT} lines after ${timeoutMs} ms`)
    await sleep(100)
  }
}

async function rawQmp(vm: Vm): Promise<RawQmp> {
  const short = shortSocketPath(vm.qmpSocket)
  try {
    return await RawQmp.connect(short.path)
  } finally {
    short.release()
  }
}

if (requireQemu(t)) {
  t.test('against the Linux test guest', async (t) => {
    const guest = await ensureLinuxGuest()
    // A directory deep enough that the agent socket's absolute path does not fit in sun_path.
    const dir = join(t.testdir(), 'a-rather-long-directory-name-to-push-the-socket-path-past-sun-path-limits')
    await mkdir(dir, { recursive: true })
    await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'disk.qcow2'), '32M'])
    const booted = performance.now()
    const vm = startQemu(t, dir, [
      '-kernel', guest.kernel,
      '-initrd', guest.initrd,
      '-append', guest.append,
      '-blockdev', JSON.stringify({ driver: 'qcow2', 'node-name': 'disk0', file: { driver: 'file', filename: 'disk.qcow2' } }),
      '-device', 'virtio-blk-pci,drive=disk0',
    ])
    await waitForReady(vm)
    t.comment(`guest ready ${Math.round(performance.now() - booted)} ms after QEMU started`)
    const serial = await readFile(vm.serialLog, 'utf8')
    t.notMatch(serial, /qmpd-guest: (insmod|mount|mke2fs|no )/, 'the guest set up its disk and agent port without complaint')

    t.test('connects through a socket path longer than sun_path and pings', async (t) => {
      t.ok(Buffer.byteLength(vm.qgaSocket) > 108, `socket path is ${Buffer.byteLength(vm.qgaSocket)} bytes`)
      const qga = await QgaClient.connect(vm.qgaSocket, { timeoutMs: 20_000 })
      t.teardown(() => qga.close())
      t.equal(qga.state, 'ready')
      await qga.ping()
      t.equal(await qga.fsfreezeStatus(), 'thawed')
    })

    t.test('freezes the data filesystem, reports frozen, refuses a second freeze, thaws', async (t) => {
      const qga = await QgaClient.connect(vm.qgaSocket)
      t.teardown(() => qga.close())
      const frozen = await qga.fsfreezeFreeze()
      t.ok(frozen >= 1, `froze ${frozen} filesystem(s)`)
      t.equal(await qga.fsfreezeStatus(), 'frozen')
      await qga.ping()
      await t.rejects(
        qga.fsfreezeFreeze(),
        { name: 'QmpdError', code: 'QGA_COMMAND_FAILED', message: /frozen/, data: { command: 'guest-fsfreeze-freeze', qgaClass: String } },
        'a second freeze is an agent error: QGA_COMMAND_FAILED naming the command',
      )
      t.equal(await qga.fsfreezeThaw(), frozen, 'thaw thaws what freeze froze')
      t.equal(await qga.fsfreezeStatus(), 'thawed')
      t.equal(await qga.fsfreezeThaw(), 0, 'thawing a thawed guest is a no-op')
    })

    t.test('guest writes to the frozen filesystem block until the thaw', async (t) => {
      const qga = await QgaClient.connect(vm.qgaSocket)
      t.teardown(() => qga.close())
      await waitForHeartbeats(vm, (await heartbeats(vm)) + 1, 10_000)
      await withFrozenFilesystems(qga, async () => {
        // A write that started just before the freeze may still print its heartbeat.
        await sleep(500)
        const frozenAt = await heartbeats(vm)
        await sleep(2_500)
        t.equal(await heartbeats(vm), frozenAt, 'no counter write completed in 2.5 s while frozen')
      })
      const after = await heartbeats(vm)
      await waitForHeartbeats(vm, after + 2, 10_000)
      t.pass('the counter advances again after the thaw')
    })

    t.test('withFrozenFilesystems runs fn frozen and thaws, also when fn throws', async (t) => {
      const qga = await QgaClient.connect(vm.qgaSocket)
      t.teardown(() => qga.close())
      const inside = await withFrozenFilesystems(qga, () => qga.fsfreezeStatus())
      t.equal(inside, 'frozen', 'fn runs while frozen')
      t.equal(await qga.fsfreezeStatus(), 'thawed', 'thawed after fn resolved')

      const boom = new Error('boom')
      let seen: string | undefined
      await t.rejects(
        withFrozenFilesystems(qga, async () => {
          seen = await qga.fsfreezeStatus()
          throw boom
        }),
        boom,
        "fn's error is rethrown",
      )
      t.equal(seen, 'frozen')
      t.equal(await qga.fsfreezeStatus(), 'thawed', 'thawed after fn threw')
    })

    t.test('runs concurrent calls one at a time, each getting its own reply', async (t) => {
      const qga = await QgaClient.connect(vm.qgaSocket)
      t.teardown(() => qga.close())
      const results = await Promise.all([qga.fsfreezeStatus(), qga.ping(), qga.fsfreezeStatus(), qga.fsfreezeThaw(), qga.ping()])
      t.same(results, ['thawed', undefined, 'thawed', 0, undefined])
    })

    t.test('a command that times out leaves the stream resynced for the next one', async (t) => {
      const qmp = await rawQmp(vm)
      t.teardown(() => qmp.close())
      const qga = await QgaClient.connect(vm.qgaSocket)
      t.teardown(() => qga.close())
      // A paused guest never answers: the ping times out, its reply comes after `cont`, late.
      await qmp.cmd('stop')
      const started = performance.now()
      await t.rejects(qga.ping(), { name: 'TimeoutError', code: 'TIMEOUT', data: { command: 'guest-ping' } })
      t.ok(performance.now() - started >= 4_900, 'after the 5 s of guest-ping')
      await qmp.cmd('cont')
      t.equal(await qga.fsfreezeStatus(), 'thawed', 'the late ping reply is not taken for this one')
      await qga.ping()
    })

    t.test('the client becomes unavailable when QEMU goes away', async (t) => {
      const qga = await QgaClient.connect(vm.qgaSocket)
      t.teardown(() => qga.close())
      await qga.ping()
      await vm.kill()
      await t.rejects(qga.ping(), { code: 'QGA_UNAVAILABLE' })
      t.equal(qga.state, 'closed')
    })
  })
}

t.test('connect times out with a clear error when nobody answers on the socket', async (t) => {
  if (!requireQemu(t)) return
  // QEMU creates and serves the chardev socket, but the VM is paused before its firmware ran:
  // the connection is accepted, the sync is never answered.
  const dir = t.testdir()
  const vm = startQemu(t, dir, ['-S'])
  const deadline = Date.now() + 10_000
  for (;;) {
    try {
      await stat(join(dir, 'qga.sock'))
      break
    } catch (err) {
      if (vm.exited() || Date.now() > deadline) throw new Error(`no qga.sock: ${vm.stderr()}`, { cause: err })
      await sleep(50)
    }
  }
  const started = performance.now()
  const err = await QgaClient.connect(vm.qgaSocket, { timeoutMs: 1_500 }).then(
    () => undefined,
    (e: unknown) => e,
  )
  const ms = performance.now() - started
  t.ok(err instanceof QmpdError, 'rejects with a QmpdError')
  if (!(err instanceof QmpdError)) return
  t.equal(err.code, 'QGA_UNAVAILABLE')
  t.match(err.message, /guest agent at .*qga\.sock: no reply to guest-sync-delimited within 1500 ms: is qemu-guest-agent running in the guest\?/)
  t.ok(err.cause instanceof TimeoutError, 'the cause is a TimeoutError')
  t.ok(ms >= 1_400 && ms < 5_000, `gave up after ${Math.round(ms)} ms`)
  t.equal(vm.exited(), false, 'QEMU is unaffected')
})

t.test('connect to a missing socket fails at once with QGA_UNAVAILABLE', async (t) => {
  const path = join(t.testdir(), 'nothing-here.sock')
  const started = performance.now()
  await t.rejects(QgaClient.connect(path, { timeoutMs: 5_000 }), { name: 'QmpdError', code: 'QGA_UNAVAILABLE', message: /ENOENT/, data: { path } })
  t.ok(performance.now() - started < 1_000, 'without waiting for the timeout')
})
