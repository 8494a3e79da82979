// One daemon per state directory: the lock refuses a second one and dies with its holder, even by SIGKILL.
import { spawn, type ChildProcess } from 'node:child_process'
import { realpathSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { pino } from 'pino'
import t from 'tap'
import { makeConfig } from '../../src/config.ts'
import { startDaemon } from '../../src/daemon.ts'
import { qmpdCommand } from '../helpers/qmpd-cmd.ts'

const silent = pino({ level: 'silent' })

/** Runs `qmpd serve` on a unix socket; resolves with the child once it serves or has exited. */
async function serve(stateDir: string, sock: string): Promise<{ child: ChildProcess; out: () => string; exit: Promise<number | null> }> {
  const [exe, argv, env] = qmpdCommand(['serve', '--state-dir', stateDir, '--listen', `unix:${sock}`])
  const child = spawn(exe, argv, { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  child.stdout.on('data', (d) => (out += d))
  child.stderr.on('data', (d) => (out += d))
  const exit = new Promise<number | null>((r) => child.once('exit', (code) => r(code)))
  let exited = false
  void exit.then(() => (exited = true))
  for (const deadline = Date.now() + 20_000; !/qmpd serving/.test(out) && !exited; ) {
    if (Date.now() > deadline) throw new Error(`qmpd neither served nor exited: ${out}`)
    await new Promise((r) => setTimeout(r, 50))
  }
  return { child, out: () => out, exit }
}

t.test('a second daemon on the same state directory is refused until the first closes', async (t) => {
  const stateDir = t.testdir()
  const config = makeConfig({ stateDir }, {})
  const first = await startDaemon(config, silent)
  t.teardown(() => first.close())
  const err = await startDaemon(config, silent).then(
    () => undefined,
    (e: unknown) => e as { code?: string; message: string; data?: Record<string, unknown> },
  )
  t.equal(err?.code, 'BUSY', 'refused with BUSY')
  t.match(err?.message, realpathSync(stateDir), 'the message names the state directory')
  t.match(err?.message, `pid ${process.pid}`, 'and the PID of the holder')
  t.same(err?.data, { stateDir: realpathSync(stateDir), pid: process.pid })
  // The same directory through another path (a trailing slash, a symlink) is the same lock.
  await t.rejects(startDaemon(makeConfig({ stateDir: `${stateDir}/./` }, {}), silent), { code: 'BUSY' })
  await first.close()
  const again = await startDaemon(config, silent)
  t.pass('a new daemon starts once the first has closed')
  await again.close()
})

t.test('a daemon killed with SIGKILL leaves no lock behind; qmpd serve refuses a busy directory', async (t) => {
  const stateDir = t.testdir()
  const sock = join('/tmp', `qmpd-lock-${process.pid}.sock`)
  // A daemon killed with SIGKILL cannot remove its listening socket's file.
  t.teardown(() => rmSync(sock, { force: true }))
  const first = await serve(stateDir, sock)
  t.teardown(() => {
    if (first.child.exitCode === null && first.child.signalCode === null) first.child.kill('SIGKILL')
  })
  t.match(first.out(), /qmpd serving/)
  const second = await serve(stateDir, `${sock}-2`)
  const code = await second.exit
  t.equal(code, 1, 'qmpd serve exits non-zero')
  t.match(second.out(), new RegExp(`qmpd: state directory ${realpathSync(stateDir)} is in use by another qmpd \\(pid ${first.child.pid}\\)`))

  first.child.kill('SIGKILL')
  await first.exit
  const daemon = await startDaemon(makeConfig({ stateDir }, {}), silent)
  t.pass('a daemon starts on the directory of the killed one')
  await daemon.close()
})
