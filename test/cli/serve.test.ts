// `qmpd serve` as a real process over real TCP and a unix socket: token auth, docs, a VM's life.
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdirSync, readFileSync, statSync } from 'node:fs'
import { request } from 'node:http'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { isAlive, waitForExit } from '../../src/vm/proc.ts'
import { makeGuestDisk } from '../helpers/guest.ts'
import { qmpdCommand } from '../helpers/qmpd-cmd.ts'
import { requireQemu } from '../helpers/qemu.ts'

/** Starts `qmpd serve` and resolves once its log says it listens. */
async function serve(t: Test, args: string[], env: Record<string, string> = {}): Promise<{ child: ChildProcess; logs: () => string }> {
  const [exe, argv, childEnv] = qmpdCommand(['serve', ...args], { ...process.env, ...env })
  const child = spawn(exe, argv, { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  child.stdout.on('data', (d) => (out += d))
  child.stderr.on('data', (d) => (out += d))
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM')
      await new Promise((r) => child.once('exit', r))
    }
  })
  const deadline = Date.now() + 20_000
  while (!/qmpd serving/.test(out)) {
    if (child.exitCode !== null) throw new Error(`qmpd exited: ${out}`)
    if (Date.now() > deadline) throw new Error(`qmpd did not start: ${out}`)
    await new Promise((r) => setTimeout(r, 50))
  }
  return { child, logs: () => out }
}

function http(opts: {
  port?: number
  socketPath?: string
  method?: string
  path: string
  token?: string
  body?: unknown
}): Promise<{ status: number; body: string; headers: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const payload = opts.body === undefined ? undefined : JSON.stringify(opts.body)
    const req = request(
      {
        ...(opts.socketPath ? { socketPath: opts.socketPath } : { host: '127.0.0.1', port: opts.port }),
        method: opts.method ?? 'GET',
        path: opts.path,
        headers: {
          ...(opts.token ? { authorization: `Bearer ${opts.token}` } : {}),
          ...(payload ? { 'content-type': 'application/json' } : {}),
        },
      },
      (res) => {
        let body = ''
        res.on('data', (d) => (body += d))
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }))
      },
    )
    req.on('error', reject)
    req.end(payload)
  })
}

async function freePort(): Promise<number> {
  const { createServer } = await import('node:net')
  const srv = createServer()
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  const port = (srv.address() as { port: number }).port
  await new Promise((r) => srv.close(r))
  return port
}

t.test('qmpd serve over TCP: generated token, 401 without it, docs, and a VM defined, started and stopped', async (t) => {
  requireQemu(t)
  const stateDir = t.testdir()
  const port = await freePort()
  const { child, logs } = await serve(t, ['--listen', `127.0.0.1:${port}`, '--state-dir', stateDir, '--accel', 'tcg'])
  const tokenFile = join(stateDir, 'token')
  t.equal(statSync(tokenFile).mode & 0o777, 0o600, 'token file is private')
  const token = readFileSync(tokenFile, 'utf8').trim()
  t.ok(token.length >= 32)
  t.match(logs(), tokenFile, 'the token path is logged')
  const versionLines = logs().split('\n').filter((l) => l.includes('"msg":"QEMU binary"'))
  t.equal(versionLines.length, 1, 'the QEMU binary is logged once at start')
  t.match(versionLines[0], /"qemuVersion":"QEMU emulator version \d+\.\d+/, 'with the version it reports')
  t.match(versionLines[0], /"capabilities":\{"snapshot-save":true,.*"background-snapshot":true/, 'and what its capability probe found')

  const noAuth = await http({ port, path: '/v1/vms' })
  t.equal(noAuth.status, 401)
  t.equal(JSON.parse(noAuth.body).error.code, 'UNAUTHORIZED')
  t.equal((await http({ port, path: '/v1/vms', token: 'wrong' })).status, 401)
  t.equal((await http({ port, path: '/healthz' })).status, 200, 'liveness needs no token')
  const docs = await http({ port, path: '/docs/' })
  t.equal(docs.status, 200)
  t.match(docs.body, /swagger/i, '/docs serves the UI')
  const spec = JSON.parse((await http({ port, path: '/openapi.json' })).body)
  t.ok(spec.paths['/v1/vms/{vm}/start'], 'OpenAPI documents the routes')

  const disk = join(stateDir, 'vms', 'tcp', 'boot.qcow2')
  mkdirSync(join(stateDir, 'vms', 'tcp'), { recursive: true })
  await makeGuestDisk(disk, { format: 'qcow2', sizeMiB: 16, boot: true })
  const def = await http({ port, token, method: 'POST', path: '/v1/vms', body: { name: 'tcp', memoryMiB: 32, disks: [{ id: 'vda', file: 'boot.qcow2' }] } })
  t.equal(def.status, 201, def.body)
  const start = await http({ port, token, method: 'POST', path: '/v1/vms/tcp/start?wait=true' })
  t.equal(start.status, 200, start.body)
  const vm = JSON.parse((await http({ port, token, path: '/v1/vms/tcp' })).body)
  t.equal(vm.state, 'running')
  t.teardown(() => {
    if (isAlive(vm.pid)) process.kill(vm.pid, 'SIGKILL')
  })

  // SIGTERM: the daemon exits cleanly and the VM keeps running (re-attached by the next daemon).
  child.kill('SIGTERM')
  const code = await new Promise((r) => child.once('exit', (c) => r(c)))
  t.equal(code, 0)
  t.ok(isAlive(vm.pid), 'QEMU outlives the daemon')

  const again = await serve(t, ['--listen', `127.0.0.1:${port}`, '--state-dir', stateDir])
  t.ok(again)
  const stop = await http({ port, token, method: 'POST', path: '/v1/vms/tcp/stop?wait=true', body: { force: true } })
  t.equal(stop.status, 200, stop.body)
  t.ok(await waitForExit(vm.pid, 5000))
})

t.test('qmpd serve on a unix socket needs no token; QMPD_TOKEN fixes the TCP token', async (t) => {
  const stateDir = t.testdir()
  const sock = join('/tmp', `qmpd-test-${process.pid}.sock`)
  await serve(t, ['--listen', `unix:${sock}`, '--state-dir', stateDir])
  t.equal(statSync(sock).mode & 0o777, 0o660)
  const res = await http({ socketPath: sock, path: '/v1/vms' })
  t.equal(res.status, 200)
  t.same(JSON.parse(res.body), { vms: [] })

  const port = await freePort()
  await serve(t, ['--listen', `127.0.0.1:${port}`, '--state-dir', t.testdir() + '-2'], { QMPD_TOKEN: 'fixed-token-value' })
  t.equal((await http({ port, path: '/v1/vms', token: 'fixed-token-value' })).status, 200)
  t.equal((await http({ port, path: '/v1/vms' })).status, 401)
})

t.test('qmpd --help and bad flags', async (t) => {
  const run = (args: string[]) =>
    new Promise<{ code: number | null; out: string }>((resolve) => {
      const [exe, argv, env] = qmpdCommand(args)
      const c = spawn(exe, argv, { env, stdio: ['ignore', 'pipe', 'pipe'] })
      let out = ''
      c.stdout.on('data', (d) => (out += d))
      c.stderr.on('data', (d) => (out += d))
      c.on('exit', (code) => resolve({ code, out }))
    })
  const help = await run(['--help'])
  t.equal(help.code, 0)
  t.match(help.out, /qmpd serve/)
  const bad = await run(['serve', '--listen', 'nonsense', '--state-dir', t.testdir()])
  t.equal(bad.code, 1)
  t.match(bad.out, /--listen must be/)
})
