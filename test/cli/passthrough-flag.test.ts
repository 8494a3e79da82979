// `qmpd serve --qmp-passthrough --qmp-allow …` as a real process on a unix socket (no QEMU): the
// flags reach the escape hatch's policy, a bad allow-list entry stops the daemon at start.
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t, { type Test } from 'tap'

const BIN = new URL('../../bin/qmpd.js', import.meta.url).pathname

/** Starts `qmpd serve` on a unix socket; resolves with the socket once it serves. */
async function serve(t: Test, extra: string[]): Promise<string> {
  const sockDir = mkdtempSync(join(tmpdir(), 'qmpd-pt-'))
  const sock = join(sockDir, 'api.sock')
  const env: NodeJS.ProcessEnv = { ...process.env }
  delete env['QMPD_QMP_PASSTHROUGH']
  delete env['QMPD_QMP_ALLOW']
  const child: ChildProcess = spawn(process.execPath, [BIN, 'serve', '--listen', `unix:${sock}`, '--state-dir', t.testdir(), ...extra], { env, stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  child.stdout?.on('data', (d) => (out += d))
  child.stderr?.on('data', (d) => (out += d))
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM')
      await new Promise((r) => child.once('exit', r))
    }
    rmSync(sockDir, { recursive: true, force: true })
  })
  const deadline = Date.now() + 20_000
  while (!/qmpd serving/.test(out)) {
    if (child.exitCode !== null) throw new Error(`qmpd exited: ${out}`)
    if (Date.now() > deadline) throw new Error(`qmpd did not start: ${out}`)
    await new Promise((r) => setTimeout(r, 50))
  }
  return sock
}

function qmp(socketPath: string, body: unknown): Promise<{ status: number; body: any }> {
  return new Promise((resolve, reject) => {
    const payload = JSON.stringify(body)
    const req = request({ socketPath, method: 'POST', path: '/v1/vms/none/qmp', headers: { 'content-type': 'application/json' } }, (res) => {
      let text = ''
      res.on('data', (d) => (text += d))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) }))
    })
    req.on('error', reject)
    req.end(payload)
  })
}

t.test('without --qmp-passthrough the escape hatch is 403 QMP_PASSTHROUGH_DISABLED', async (t) => {
  const sock = await serve(t, [])
  const res = await qmp(sock, { execute: 'query-status' })
  t.equal(res.status, 403)
  t.equal(res.body.error.code, 'QMP_PASSTHROUGH_DISABLED')
})

t.test('--qmp-passthrough with --qmp-allow: the defaults and the added entries pass the policy, the rest is refused', async (t) => {
  const sock = await serve(t, ['--qmp-passthrough', '--qmp-allow', 'block-job-*', '--qmp-allow', 'migrate'])
  const passes = await qmp(sock, { execute: 'query-status' })
  t.equal(passes.status, 404, 'query-status passes the policy (the VM does not exist)')
  t.equal(passes.body.error.code, 'VM_NOT_FOUND')
  t.equal((await qmp(sock, { execute: 'block-job-cancel' })).body.error.code, 'VM_NOT_FOUND', 'a prefix entry')
  t.equal((await qmp(sock, { execute: 'migrate' })).body.error.code, 'VM_NOT_FOUND', 'a risky command named exactly')
  const refused = await qmp(sock, { execute: 'human-monitor-command' })
  t.equal(refused.status, 403)
  t.equal(refused.body.error.code, 'QMP_COMMAND_NOT_ALLOWED')
  t.same(refused.body.error.details.allow, ['query-*', 'stop', 'cont', 'block-job-*', 'migrate'])
})

t.test('a bad --qmp-allow entry stops the daemon at start with a clear message', async (t) => {
  const child = spawn(process.execPath, [BIN, 'serve', '--listen', `unix:${join(t.testdir(), 'x.sock')}`, '--state-dir', t.testdir(), '--qmp-passthrough', '--qmp-allow', 'exec:id'], { stdio: ['ignore', 'pipe', 'pipe'] })
  let err = ''
  child.stderr.on('data', (d) => (err += d))
  const code = await new Promise((r) => child.once('exit', r))
  t.equal(code, 1)
  t.match(err, /bad QMP allow-list entry "exec:id"/)
})
