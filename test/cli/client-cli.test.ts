// The client commands run as the real binary (node bin/qmpd.js …) against a real daemon over TCP
// with its token and real QEMU (boot-sector guest): tables, --json, the snapshot tree, a throttled
// commit's progress bar, --no-wait, exit codes.
import { execFile, spawn } from 'node:child_process'
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t from 'tap'
import { eventually, reapQemus, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { makeGuestDisk } from '../helpers/guest.ts'
import { qmpdCommand } from '../helpers/qmpd-cmd.ts'
import { requireQemu } from '../helpers/qemu.ts'

const run = promisify(execFile)

t.before(() => {
  requireQemu(t)
})

interface CliResult {
  code: number | null
  stdout: string
  stderr: string
  ms: number
}

/** Runs `qmpd ARGS…` against the daemon at `url` with `token` (from the environment, as a user would). */
function cli(url: string, token: string, args: string[]): Promise<CliResult> {
  const [exe, argv, env] = qmpdCommand(args, { ...process.env, QMPD_URL: url, QMPD_TOKEN: token })
  const t0 = Date.now()
  return new Promise((resolve, reject) => {
    const child = spawn(exe, argv, { env, stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => (stdout += d))
    child.stderr.on('data', (d) => (stderr += d))
    child.once('error', reject)
    child.once('exit', (code) => resolve({ code, stdout, stderr, ms: Date.now() - t0 }))
  })
}

async function listening(t: Parameters<typeof startTestDaemon>[0]): Promise<{ td: TestDaemon; url: string; token: string }> {
  const token = 'cli-test-token-0123456789'
  const td = await startTestDaemon(t, { token })
  const address = await td.app.listen({ host: '127.0.0.1', port: 0 })
  return { td, url: address, token }
}

t.test('define, start, snapshot, a throttled commit with its progress bar, list --tree, revert, delete, exit codes', async (t) => {
  const { td, url, token } = await listening(t)
  const q = (...args: string[]) => cli(url, token, args)
  const dir = join(td.stateDir, 'vms', 'c1')
  mkdirSync(dir, { recursive: true })
  // base (the boot sector) <- mid (8 MiB of data) <- top (the active layer). Committing mid into
  // base at 2 MiB/s takes about 4 s, long enough for the bar to move. (An active commit would not
  // do: QEMU's mirror copies its first 16 MiB buffer at once and then sleeps off the rate limit.)
  await makeGuestDisk(join(dir, 'base.qcow2'), { format: 'qcow2', sizeMiB: 16, boot: true })
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', join(dir, 'base.qcow2'), join(dir, 'mid.qcow2')])
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x5a 4M 8M', join(dir, 'mid.qcow2')])
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', join(dir, 'mid.qcow2'), join(dir, 'top.qcow2')])
  const get = async (path: string) => (await td.api('GET', path, undefined, { authorization: `Bearer ${token}` })).body

  const def = await q('vm', 'define', 'c1', '--memory', '32', '--disk', `id=vda,file=${join(dir, 'top.qcow2')}`)
  t.equal(def.code, 0, `vm define exits 0 (${def.stderr.trim()})`)
  t.match(def.stdout, /VM c1 defined/)

  const start = await q('vm', 'start', 'c1')
  t.equal(start.code, 0, `vm start exits 0 (${start.stderr.trim()})`)
  const vmPid = (await get('/v1/vms/c1')).pid
  t.ok(vmPid, 'QEMU runs')

  const table = await q('vm', 'list')
  t.equal(table.code, 0)
  t.match(table.stdout, /^NAME\s+STATE\s+PID\s+DISKS/m, 'a table with a header')
  t.match(table.stdout, new RegExp(`^c1\\s+running\\s+${vmPid}\\s+vda`, 'm'), 'the VM is a row: running, its PID, its disk')
  const json = await q('--json', 'vm', 'list')
  const parsed = JSON.parse(json.stdout)
  t.same(parsed.vms.map((v: any) => [v.name, v.state]), [['c1', 'running']], '--json is the API JSON')

  // A slow commit: the bar is drawn (forced: stderr is a pipe) and moves.
  const commit = await q('disk', 'commit', 'c1', 'vda', '--top', join(dir, 'mid.qcow2'), '--speed', '2M', '--progress')
  t.equal(commit.code, 0, `disk commit exits 0 (${commit.stderr.slice(-300)})`)
  const bars = commit.stderr.split('\n').filter((l) => l.startsWith('commit ['))
  const percents = bars.map((l) => Number(/\] (\d+)%/.exec(l)?.[1]))
  t.ok(bars.length >= 3, `the bar was updated ${bars.length} times in ${commit.ms} ms`)
  t.ok(percents.some((p) => p > 0 && p < 100), `it showed intermediate progress (${percents.join(',')})`)
  t.ok(percents.every((p, i) => i === 0 || p >= percents[i - 1]!), 'progress never went back')
  t.match(bars.at(-1), /100% \| .* \| .*\/s \| ETA/, 'the last update is complete, with throughput and ETA')
  t.ok(commit.ms > 2500, `the throttled commit took ${commit.ms} ms (8 MiB at 2 MiB/s)`)
  const chain = (await get('/v1/vms/c1')).disks[0].chain
  t.same(chain.map((l: any) => l.file), [join(dir, 'top.qcow2'), join(dir, 'base.qcow2')], 'mid was committed into base and dropped from the chain')

  // Snapshots: s1, s2 on s1, revert to s1, s3 on s1: a tree with a branch.
  for (const s of ['s1', 's2']) {
    const r = await q('snapshot', 'create', 'c1', s)
    t.equal(r.code, 0, `snapshot create ${s} exits 0 (${r.stderr.trim()})`)
  }
  const revert = await q('snapshot', 'revert', 'c1', 's1')
  t.equal(revert.code, 0, `snapshot revert exits 0 (${revert.stderr.trim()})`)
  t.match(revert.stdout, /c1 reverted to s1/)
  const s3 = await q('snapshot', 'create', 'c1', 's3')
  t.equal(s3.code, 0)
  const tree = await q('snapshot', 'list', 'c1', '--tree')
  t.equal(tree.code, 0)
  t.equal(tree.stdout, 's1\n├── s2\n└── s3 *\n', 'the tree: s2 and s3 under s1, s3 current')
  const snapsJson = JSON.parse((await q('--json', 'snapshot', 'list', 'c1')).stdout)
  t.same(snapsJson.snapshots.map((s: any) => [s.name, s.parent ?? null]), [['s1', null], ['s2', 's1'], ['s3', 's1']], '--json: the API list with parent links')

  // --no-wait prints the job id at once; the job is the daemon's.
  const nowait = await q('snapshot', 'delete', 'c1', 's2', '--no-wait')
  t.equal(nowait.code, 0)
  const id = nowait.stdout.trim()
  t.match(id, /^[0-9a-f-]{36}$/, '--no-wait prints a job id')
  const watch = await q('job', 'watch', id)
  t.equal(watch.code, 0, 'job watch follows it to its end')
  t.match(watch.stdout, /State:\s+succeeded/)
  const del = await q('snapshot', 'delete', 'c1', 's3')
  t.equal(del.code, 0, 'snapshot delete waits and exits 0')
  t.same((await get('/v1/vms/c1/snapshots')).snapshots.map((s: any) => s.name), ['s1'], 'only s1 is left')

  // Exit codes by class of error.
  const missing = await q('vm', 'show', 'nope')
  t.equal(missing.code, 2, 'an unknown VM exits 2')
  t.match(missing.stderr, /VM_NOT_FOUND/)
  const exists = await q('snapshot', 'create', 'c1', 's1')
  t.equal(exists.code, 3, 'a snapshot that exists exits 3 (conflict)')
  t.match(exists.stderr, /SNAPSHOT_EXISTS/)
  const running = await q('vm', 'undefine', 'c1')
  t.equal(running.code, 3, 'undefining a running VM exits 3')
  const usage = await q('vm', 'define')
  t.equal(usage.code, 1, 'a missing argument exits 1')
  const badToken = await cli(url, 'wrong-token', ['vm', 'list'])
  t.equal(badToken.code, 5, 'a wrong token exits 5')
  const down = await cli('http://127.0.0.1:1', token, ['vm', 'list'])
  t.equal(down.code, 5, 'no daemon exits 5')
  t.match(down.stderr, /cannot reach qmpd at http:\/\/127\.0\.0\.1:1/)

  const destroy = await q('vm', 'destroy', 'c1')
  t.equal(destroy.code, 0, 'vm destroy exits 0')
  t.ok(await eventually(async () => (await get('/v1/vms/c1')).state === 'shutoff'), 'the VM is off')
  await reapQemus()
})

t.test('completion scripts are valid shell and name the commands', async (t) => {
  const [exe, argv, env] = qmpdCommand(['completion', 'bash'])
  const { stdout } = await run(exe, argv, { env })
  t.match(stdout, /complete -o default -F _qmpd qmpd/)
  t.match(stdout, /'snapshot' *\) words='create list show revert delete --help'/, 'the snapshot subcommands complete')
  await run('bash', ['-n', '-c', stdout])
  t.pass('bash -n accepts the bash script')
  const zsh = await run(exe, [...argv.slice(0, -1), 'zsh'], { env })
  t.match(zsh.stdout, /^#compdef qmpd/)
})
