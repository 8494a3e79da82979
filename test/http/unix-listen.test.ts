// --listen unix:PATH replaces only a stale socket: a regular file or directory at PATH is refused
// and kept, a socket another daemon serves is refused and that daemon serves on, and a daemon
// never removes a socket that is not its own when it closes. No QEMU needed.
import { linkSync, lstatSync, mkdirSync, readFileSync, rmSync, statSync, unlinkSync, writeFileSync } from 'node:fs'
import { spawn } from 'node:child_process'
import { request } from 'node:http'
import { createServer } from 'node:net'
import t, { type Test } from 'tap'
import { pino } from 'pino'
import { makeConfig } from '../../src/config.ts'
import { startDaemon } from '../../src/daemon.ts'
import { listen } from '../../src/http/server.ts'

let n = 0
function sockPath(t: Test): string {
  const p = `/tmp/qmpd-ul-${process.pid}-${n++}.sock`
  rmSync(p, { recursive: true, force: true })
  t.teardown(() => rmSync(p, { recursive: true, force: true }))
  return p
}

async function daemonOn(t: Test) {
  const daemon = await startDaemon(makeConfig({ stateDir: t.testdir() + `-${n++}` }, {}), pino({ level: 'silent' }))
  t.teardown(() => daemon.close())
  return daemon
}

function healthz(socketPath: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path: '/healthz' }, (res) => {
      res.resume()
      res.on('end', () => resolve(res.statusCode ?? 0))
    })
    req.setTimeout(3000, () => req.destroy(new Error('no answer')))
    req.on('error', reject)
    req.end()
  })
}

t.test('a regular file at PATH is refused with a clear error and kept', async (t) => {
  const path = sockPath(t)
  writeFileSync(path, 'precious\n')
  const daemon = await daemonOn(t)
  await t.rejects(listen(daemon, `unix:${path}`), { code: 'INVALID_INPUT', message: /exists and is not a socket/ })
  t.equal(readFileSync(path, 'utf8'), 'precious\n', 'the file is untouched')
})

t.test('a directory at PATH is refused and kept', async (t) => {
  const path = sockPath(t)
  mkdirSync(path)
  writeFileSync(`${path}/inside`, 'x')
  const daemon = await daemonOn(t)
  await t.rejects(listen(daemon, `unix:${path}`), { code: 'INVALID_INPUT', message: /not a socket/ })
  t.ok(statSync(path).isDirectory())
  t.equal(readFileSync(`${path}/inside`, 'utf8'), 'x')
})

t.test('a second daemon on a live socket is refused; the first keeps its socket and serves', async (t) => {
  const path = sockPath(t)
  const first = await daemonOn(t)
  const { app } = await listen(first, `unix:${path}`)
  t.teardown(() => app.close())
  t.equal(statSync(path).mode & 0o777, 0o660)
  const ino = lstatSync(path).ino
  t.equal(await healthz(path), 200)
  const second = await daemonOn(t)
  await t.rejects(listen(second, `unix:${path}`), { code: 'BUSY', message: /another process .* listens/ })
  t.equal(lstatSync(path).ino, ino, 'the socket file is still the first daemon\'s')
  t.equal(await healthz(path), 200, 'the first daemon still serves')
})

t.test('a stale socket (nobody listens) is replaced', async (t) => {
  const path = sockPath(t)
  // A socket file with no listener: bind a server on another name, link the path to it, close it.
  const other = `${path}.orig`
  const srv = createServer()
  await new Promise<void>((r) => srv.listen(other, r))
  linkSync(other, path)
  await new Promise((r) => srv.close(r))
  rmSync(other, { force: true })
  t.ok(lstatSync(path).isSocket(), 'a stale socket is there')
  const staleIno = lstatSync(path).ino
  const daemon = await daemonOn(t)
  const { app, address } = await listen(daemon, `unix:${path}`)
  t.teardown(() => app.close())
  t.equal(address, `unix:${path}`)
  t.not(lstatSync(path).ino, staleIno, 'replaced by a new socket')
  t.equal(await healthz(path), 200)
  await app.close()
  t.throws(() => lstatSync(path), { code: 'ENOENT' }, 'its own socket is removed when the daemon closes')
})

t.test('closing never removes another daemon\'s socket at the same path', async (t) => {
  const path = sockPath(t)
  const first = await daemonOn(t)
  const a = await listen(first, `unix:${path}`)
  // Someone removes the first daemon's socket; a second daemon then takes the path.
  unlinkSync(path)
  const second = await daemonOn(t)
  const b = await listen(second, `unix:${path}`)
  t.teardown(() => b.app.close())
  const ino = lstatSync(path).ino
  await a.app.close()
  t.equal(lstatSync(path).ino, ino, 'the second daemon\'s socket survives the first one\'s close')
  t.equal(await healthz(path), 200, 'and the second daemon serves on it')
})

t.test('qmpd serve --listen unix:<a regular file> exits 1 with the reason and keeps the file', async (t) => {
  const path = sockPath(t)
  writeFileSync(path, 'keep me\n')
  const bin = new URL('../../bin/qmpd.js', import.meta.url).pathname
  const child = spawn(process.execPath, [bin, 'serve', '--listen', `unix:${path}`, '--state-dir', t.testdir() + '-cli'], { stdio: ['ignore', 'pipe', 'pipe'] })
  let err = ''
  child.stderr.on('data', (d) => (err += d))
  child.stdout.resume()
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000)
  const code = await new Promise((r) => child.once('exit', (c) => r(c)))
  clearTimeout(timer)
  t.equal(code, 1)
  t.match(err, /qmpd: --listen unix:.* exists and is not a socket/)
  t.equal(readFileSync(path, 'utf8'), 'keep me\n')
})
