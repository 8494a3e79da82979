// A missing or 0-byte qmpd.db next to existing VM directories is refused at start (in the
// library and by `qmpd serve`), unless the operator asks for a fresh store; a fresh state
// directory starts without any flag. No QEMU is started.
import { spawn } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import t from 'tap'
import { makeConfig } from '../../src/config.ts'
import { startDaemon } from '../../src/daemon.ts'

const BIN = new URL('../../bin/qmpd.js', import.meta.url).pathname
const silent = pino({ level: 'silent' })

/** A state directory whose store defined `vms` and was then closed. */
async function stateDirWithVms(dir: string, vms: string[]): Promise<void> {
  const d = await startDaemon(makeConfig({ stateDir: dir, accel: 'tcg' }, {}), silent)
  for (const name of vms) {
    mkdirSync(join(dir, 'vms', name), { recursive: true })
    writeFileSync(join(dir, 'vms', name, 'disk.raw'), Buffer.alloc(512))
    await d.vms.define({ name, disks: [{ id: 'vda', file: 'disk.raw', format: 'raw' }] })
  }
  await d.close()
}

function dropStore(dir: string, how: 'empty' | 'missing'): void {
  const db = join(dir, 'qmpd.db')
  rmSync(`${db}-wal`, { force: true })
  rmSync(`${db}-shm`, { force: true })
  if (how === 'empty') truncateSync(db, 0)
  else rmSync(db)
}

t.test('a fresh state directory starts without any flag', async (t) => {
  const d = await startDaemon(makeConfig({ stateDir: join(t.testdir(), 'new'), accel: 'tcg' }, {}), silent)
  t.same(await d.vms.list(), [], 'an empty store')
  await d.close()
})

for (const how of ['empty', 'missing'] as const) {
  t.test(`a ${how} store next to VM directories is refused, and accepted with freshStore`, async (t) => {
    const dir = t.testdir()
    await stateDirWithVms(dir, ['alpha', 'beta'])
    dropStore(dir, how)
    const what = how === 'empty' ? 'empty \\(0 bytes\\)' : 'missing'
    await t.rejects(
      startDaemon(makeConfig({ stateDir: dir, accel: 'tcg' }, {}), silent),
      new RegExp(`the store .*qmpd\\.db is ${what} but .*vms holds 2 VM directories \\(alpha, beta\\).*--fresh-store`),
      'start is refused with a message naming the store, the directories and the flag',
    )
    const again = await startDaemon(makeConfig({ stateDir: dir, accel: 'tcg' }, {}), silent).catch((err: unknown) => err)
    t.type(again, Error, 'the refusal left nothing behind that lets a second try through')
    const fresh = await startDaemon(makeConfig({ stateDir: dir, accel: 'tcg', freshStore: true }, {}), silent)
    t.same(await fresh.vms.list(), [], 'with freshStore the daemon starts on an empty store')
    await fresh.close()
  })
}

t.test('qmpd serve refuses an empty store and says so; --fresh-store starts it', async (t) => {
  const dir = t.testdir()
  await stateDirWithVms(dir, ['gamma'])
  dropStore(dir, 'empty')
  // A short socket path: sun_path holds 107 bytes and tap's test directories are deep.
  const sockDir = mkdtempSync(join(tmpdir(), 'qmpd-ls-'))
  t.teardown(() => rmSync(sockDir, { recursive: true, force: true }))
  const sock = join(sockDir, 'api.sock')
  const run = (args: string[]): Promise<{ code: number | null; out: string }> =>
    new Promise((resolve) => {
      const child = spawn(process.execPath, [BIN, 'serve', '--state-dir', dir, '--listen', `unix:${sock}`, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
      let out = ''
      child.stdout.on('data', (d) => (out += d))
      child.stderr.on('data', (d) => {
        out += d
      })
      const timer = setTimeout(() => child.kill('SIGKILL'), 20_000)
      child.stdout.on('data', () => {
        if (/qmpd serving/.test(out)) child.kill('SIGTERM')
      })
      child.once('exit', (code) => {
        clearTimeout(timer)
        resolve({ code, out })
      })
    })
  const refused = await run([])
  t.equal(refused.code, 1, 'qmpd serve exits 1')
  t.match(refused.out, /qmpd: the store .*qmpd\.db is empty \(0 bytes\) but .* holds 1 VM directory \(gamma\)/, 'and says why on stderr')
  const fresh = await run(['--fresh-store'])
  t.match(fresh.out, /qmpd serving/, 'with --fresh-store it serves')
  t.equal(fresh.code, 0, 'and exits 0 on SIGTERM')
})
