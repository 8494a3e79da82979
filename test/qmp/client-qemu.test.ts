/**
 * QmpClient against a real qemu-system-x86_64 (TCG, `-machine none`: no guest needed for
 * protocol behaviour; STOP/RESUME work on it). Each test starts its own QEMU and reaps it by
 * PID in teardown. Without qemu-system-x86_64 on PATH these tests FAIL (never skip).
 */

import { execFile, execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { promisify } from 'node:util'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import t from 'tap'
import { QmpCommandError, QmpDisconnectedError, type QmpdError } from '../../src/errors.ts'
import { QmpClient, type JobStatus } from '../../src/qmp/index.ts'
import { noteTopNodes, topNodes } from '../../src/images/graph.ts'
import { sleep, socketPath, type TapLike } from './fake-qmp.ts'

const QEMU = 'qemu-system-x86_64'
const execFileP = promisify(execFile)

/** The major version the binary on PATH prints with --version: what QMP must report too. */
function binaryMajor(): number {
  const out = execFileSync(QEMU, ['--version'], { encoding: 'utf8' })
  return Number(/version (\d+)\./.exec(out)?.[1])
}

/** query-status without `singlestep` (QEMU 7.2 reports it, QEMU 10 dropped it; false if there). */
function status(s: { status: string; running: boolean; singlestep?: boolean }): { status: string; running: boolean } {
  if (s.singlestep !== undefined && s.singlestep !== false) throw new Error(`singlestep is ${String(s.singlestep)}`)
  return { status: s.status, running: s.running }
}

/** Counts the query-block commands the client sends from now on. */
function countQueryBlock(qmp: QmpClient): () => number {
  let n = 0
  const execute = qmp.execute.bind(qmp)
  qmp.execute = ((command: string, ...rest: unknown[]) => {
    if (command === 'query-block') n++
    return (execute as (c: string, ...r: unknown[]) => Promise<unknown>)(command, ...rest)
  }) as typeof qmp.execute
  return () => n
}

function onPath(bin: string): string | undefined {
  for (const dir of (process.env['PATH'] ?? '').split(path.delimiter)) {
    if (!dir) continue
    const p = path.join(dir, bin)
    try {
      fs.accessSync(p, fs.constants.X_OK)
      return p
    } catch {
      // not in this directory
    }
  }
  return undefined
}

interface Qemu {
  child: ChildProcess
  pid: number
  sock: string
  stderr: () => string
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
}

/** Starts QEMU with a QMP server socket in the test dir; killed (SIGKILL) and reaped in teardown. */
async function startQemu(t: TapLike, extra: string[] = []): Promise<Qemu> {
  const sock = socketPath(t, 'q.sock')
  const args = ['-accel', 'tcg', '-machine', 'none', '-nodefaults', '-display', 'none', '-S', '-qmp', `unix:${sock},server=on,wait=off`, ...extra]
  const child = spawn(QEMU, args, { stdio: ['ignore', 'ignore', 'pipe'] })
  let err = ''
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()))
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  )
  const spawnError = new Promise<never>((_, reject) => child.once('error', reject))
  spawnError.catch(() => {})
  const pid = child.pid
  if (pid === undefined) {
    await spawnError
    throw new Error('spawn gave no pid')
  }
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      process.kill(pid, 'SIGKILL')
      await exited
    }
  })
  // wait=off: QEMU creates the socket before it is ready to accept; poll for it (and see connect).
  const deadline = Date.now() + 15_000
  while (!fs.existsSync(sock)) {
    if (child.exitCode !== null) throw new Error(`QEMU exited early (${child.exitCode}): ${err}`)
    if (Date.now() > deadline) throw new Error(`QEMU did not create ${sock} within 15 s: ${err}`)
    await sleep(20)
  }
  return { child, pid, sock, stderr: () => err, exited }
}

/**
 * Connects `qmp` to QEMU's socket. The file appears when QEMU binds it, a moment before it listens:
 * a refused connection is tried again for a few seconds. (A probe connection would not do: the
 * monitor then greets the next client twice.)
 */
async function connect(qmp: QmpClient, sock: string): Promise<Awaited<ReturnType<QmpClient['connect']>>> {
  const deadline = Date.now() + 5_000
  for (;;) {
    try {
      return await qmp.connect(sock)
    } catch (err) {
      if (!/ECONNREFUSED/.test(String(err)) || Date.now() > deadline) throw err
      await sleep(20)
    }
  }
}

function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => new Error('expected a rejection'),
    (e: unknown) => e,
  )
}

async function connectTo(t: TapLike, q: Qemu): Promise<QmpClient> {
  const qmp = new QmpClient()
  await connect(qmp, q.sock)
  t.teardown(() => qmp.disconnect())
  return qmp
}

if (!onPath(QEMU)) {
  t.fail(`${QEMU} is not on PATH (${process.env['PATH']}): install QEMU (Debian: qemu-system-x86) to run the QMP tests`)
} else {
  t.test('greets with its version; query-version and query-status agree', async (t) => {
    const q = await startQemu(t)
    const qmp = new QmpClient()
    t.teardown(() => qmp.disconnect())
    const g = await connect(qmp, q.sock)
    t.equal(qmp.state, 'running')
    t.same(g.capabilities, ['oob'], 'QEMU offers oob')
    const v = await qmp.execute('query-version')
    t.same(v, g.version)
    t.equal(v.qemu.major, binaryMajor(), 'the major version --version prints')
    t.same(status(await qmp.execute('query-status')), { status: 'prelaunch', running: false })
    t.same(await qmp.executeUnchecked('query-name'), {}, 'no -name: the name member is absent')
  })

  t.test('many concurrent commands are matched to their replies', async (t) => {
    const q = await startQemu(t)
    const qmp = await connectTo(t, q)
    const N = 300
    const major = binaryMajor()
    const work: Array<Promise<void>> = []
    for (let i = 0; i < N; i++) {
      if (i % 3 === 0) work.push(qmp.hmp(`print ${i + 1}`).then((out) => void t.equal(out, `0x${(i + 1).toString(16)}\r\n`)))
      else if (i % 3 === 1) work.push(qmp.execute('query-status').then((s) => void t.equal(s.status, 'prelaunch')))
      else work.push(qmp.execute('query-version').then((v) => void t.equal(v.qemu.major, major)))
    }
    t.equal(qmp.pendingCount, N, 'all in flight at once')
    await Promise.all(work)
    t.equal(qmp.pendingCount, 0)
  })

  t.test('QMP errors become QmpCommandError with QEMU error class', async (t) => {
    const q = await startQemu(t)
    const qmp = await connectTo(t, q)
    const bogus = await qmp.executeUnchecked('no-such-command').catch((e: unknown) => e)
    t.type(bogus, QmpCommandError)
    t.match(bogus, { qmpClass: 'CommandNotFound', command: 'no-such-command', desc: /has not been found/ })
    t.match(await rejection(qmp.executeUnchecked('query-status', { bogus: 1 })), {
      qmpClass: 'GenericError',
      desc: /Parameter 'bogus' is unexpected/,
    })
    t.match(await rejection(qmp.execute('job-dismiss', { id: 'nope' })), { qmpClass: 'GenericError', desc: /not found/ })
    t.match(await rejection(qmp.execute('qmp_capabilities', {})), { qmpClass: 'CommandNotFound', desc: /already complete/ })
    t.equal(qmp.state, 'running', 'errors do not end the session')
  })

  t.test('hmp() returns the HMP text output', async (t) => {
    const q = await startQemu(t)
    const qmp = await connectTo(t, q)
    t.match(await qmp.hmp('info status'), /^VM status: paused \(prelaunch\)\r\n$/)
    t.match(await qmp.hmp('no-such-hmp-command'), /unknown command/, 'HMP failures are text, not QMP errors')
  })

  t.test('waitForEvent sees RESUME and STOP around cont and stop', async (t) => {
    const q = await startQemu(t)
    const qmp = await connectTo(t, q)
    const resumed = qmp.waitForEvent('RESUME', { timeoutMs: 10_000 })
    await qmp.execute('cont')
    const r = await resumed
    t.same(r.data, {}, 'QEMU sends RESUME without data; the client adds {}')
    t.ok(r.timestamp.seconds > 1_600_000_000)
    t.same(status(await qmp.execute('query-status')), { status: 'running', running: true })
    const stopped = qmp.waitForEvent('STOP', { timeoutMs: 10_000 })
    await qmp.execute('stop')
    t.equal((await stopped).event, 'STOP')
    t.equal((await qmp.execute('query-status')).status, 'paused')
    t.equal(qmp.subscriberCount, 0)
  })

  t.test('an event iterator with names and filter follows a job to its end', async (t) => {
    const q = await startQemu(t)
    const qmp = await connectTo(t, q)
    const file = path.join(t.testdir(), 'created.img')
    const ac = new AbortController()
    const timer = setTimeout(() => ac.abort(new Error('job did not finish in 20 s')), 20_000)
    t.teardown(() => clearTimeout(timer))
    // Subscribe before starting the job, so that no transition is missed.
    const it = qmp.events({ names: ['JOB_STATUS_CHANGE'], filter: (e) => e.data.id === 'create0', signal: ac.signal })
    await qmp.executeUnchecked('blockdev-create', { 'job-id': 'create0', options: { driver: 'file', filename: file, size: 1024 * 1024 } })
    const statuses: JobStatus[] = []
    for await (const e of it) {
      statuses.push(e.data.status)
      if (e.data.status === 'concluded') break
    }
    t.same(statuses, ['created', 'running', 'waiting', 'pending', 'concluded'])
    t.equal(qmp.subscriberCount, 0, 'break unsubscribed')
    t.same(await qmp.execute('query-jobs'), [{ id: 'create0', type: 'create', status: 'concluded', 'current-progress': 1, 'total-progress': 1 }])
    const gone = qmp.waitForEvent('JOB_STATUS_CHANGE', { filter: (e) => e.data.id === 'create0', timeoutMs: 10_000 })
    await qmp.execute('job-dismiss', { id: 'create0' })
    t.equal((await gone).data.status, 'null')
    t.equal(fs.statSync(file).size, 1024 * 1024)
  })

  t.test('typed block commands: blockdev-add, query-named-block-nodes (flat), blockdev-del', async (t) => {
    const q = await startQemu(t)
    const qmp = await connectTo(t, q)
    await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'null0', size: 1 << 20, 'read-zeroes': true })
    const nodes = await qmp.execute('query-named-block-nodes', { flat: true })
    const n = nodes.find((x) => x['node-name'] === 'null0')
    t.match(n, { drv: 'null-co', ro: false, image: { 'virtual-size': 1 << 20 } })
    await qmp.execute('blockdev-del', { 'node-name': 'null0' })
    t.same(await qmp.execute('query-named-block-nodes'), [])
  })

  t.test('quit: SHUTDOWN, then EOF ends the session; commands queued behind quit are rejected', async (t) => {
    const q = await startQemu(t)
    const qmp = await connectTo(t, q)
    const causes: QmpdError[] = []
    qmp.on('disconnected', (c) => causes.push(c))
    const shutdown = qmp.waitForEvent('SHUTDOWN', { timeoutMs: 10_000 })
    const quit = qmp.execute('quit')
    // Written in the same tick as quit: QEMU exits before reading them.
    const behind = [qmp.execute('query-status'), qmp.execute('query-version'), qmp.hmp('info status')]
    // QEMU exits with unread commands in its socket, so the kernel may reset the connection and
    // drop what QEMU had sent but we had not read yet: quit's reply and the SHUTDOWN event may be
    // lost with it. Either they arrive, or quit rejects with the disconnect; nothing else.
    const [quitOutcome, shutdownOutcome] = await Promise.allSettled([quit, shutdown])
    if (quitOutcome.status === 'fulfilled') t.same(quitOutcome.value, {}, 'quit answered')
    else t.type(quitOutcome.reason, QmpDisconnectedError, 'quit lost its reply to the reset')
    if (shutdownOutcome.status === 'fulfilled') t.same(shutdownOutcome.value.data, { guest: false, reason: 'host-qmp-quit' })
    else t.type(shutdownOutcome.reason, QmpDisconnectedError, 'SHUTDOWN lost to the reset')
    for (const r of await Promise.allSettled(behind)) {
      t.equal(r.status, 'rejected')
      if (r.status === 'rejected') {
        t.type(r.reason, QmpDisconnectedError)
        t.match(r.reason.cause, { data: { reason: 'eof' } })
      }
    }
    if (qmp.state !== 'idle') await new Promise((r) => qmp.once('disconnected', r))
    t.equal(qmp.state, 'idle')
    t.equal(causes.length, 1, 'one disconnected event')
    t.match(causes[0], { code: 'QMP_DISCONNECTED', data: { reason: 'eof' } })
    t.equal(qmp.lastDisconnectCause, causes[0])
    await t.rejects(qmp.execute('query-status'), QmpDisconnectedError)
    t.same(await q.exited, { code: 0, signal: null })
  })

  t.test('quit with nothing queued behind it ends with a clean EOF', async (t) => {
    const q = await startQemu(t)
    const qmp = await connectTo(t, q)
    const gone = new Promise<QmpdError>((r) => qmp.once('disconnected', r))
    await qmp.execute('quit')
    t.match(await gone, { data: { reason: 'eof' } })
    await q.exited
  })

  t.test('QEMU killed while commands are pending: they reject with QmpDisconnectedError', async (t) => {
    const q = await startQemu(t)
    const qmp = await connectTo(t, q)
    process.kill(q.pid, 'SIGSTOP')
    const pending = [qmp.execute('query-status'), qmp.execute('cont')]
    await sleep(50)
    t.equal(qmp.pendingCount, 2, 'a stopped QEMU answers nothing')
    process.kill(q.pid, 'SIGKILL')
    for (const r of await Promise.allSettled(pending)) {
      t.equal(r.status, 'rejected')
      if (r.status === 'rejected') t.type(r.reason, QmpDisconnectedError)
    }
    t.equal(qmp.state, 'idle')
    t.match(qmp.lastDisconnectCause, { data: { reason: 'eof' } })
  })

  t.test('QEMU serves one QMP client at a time: a second connect gets no greeting', async (t) => {
    const q = await startQemu(t)
    const first = await connectTo(t, q)
    const second = new QmpClient()
    await t.rejects(second.connect(q.sock, { timeoutMs: 500 }), { code: 'QMP_CONNECT_FAILED', cause: { code: 'TIMEOUT' } })
    t.equal(second.state, 'idle')
    t.equal((await first.execute('query-status')).status, 'prelaunch')
    await first.disconnect()
    // Once the first client left, QEMU accepts a new one.
    await second.connect(q.sock, { timeoutMs: 5_000 })
    t.teardown(() => second.disconnect())
    t.equal((await second.execute('query-status')).status, 'prelaunch')
  })

  t.test('graph epoch: the top-node cache is used until a command may have changed the graph', async (t) => {
    // Not t.testdir(): startQemu's socketPath() takes (and would wipe) that one.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qmpd-graph-'))
    t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
    const base = path.join(dir, 'base.qcow2')
    await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1M'])
    // query-block lists BlockBackends: with -machine none, -drive's backend stands in for a device.
    const q = await startQemu(t, ['-drive', `if=none,id=vda,driver=qcow2,file.filename=${base},node-name=vda-f0`])
    const qmp = await connectTo(t, q)
    const queries = countQueryBlock(qmp)
    const first = await topNodes(qmp, ['vda'])
    t.equal(queries(), 1, 'the first lookup asks QEMU')
    t.same(await topNodes(qmp, ['vda']), first, 'same answer')
    await qmp.execute('query-status')
    await qmp.execute('stop')
    await qmp.execute('cont')
    await qmp.execute('stop')
    t.equal(queries(), 1, 'queries and run-state commands keep the cache')
    await t.rejects(topNodes(qmp, ['nope']), { code: 'DISK_NOT_FOUND' })
    t.equal(queries(), 2, 'an unknown disk is asked for, then refused')

    const before = qmp.graphEpoch
    await qmp.execute('blockdev-snapshot-sync', { 'node-name': first.get('vda')!, 'snapshot-file': path.join(dir, 'o1.qcow2'), 'snapshot-node-name': 'vda-f1', format: 'qcow2' })
    t.equal(qmp.graphEpoch, before + 1, 'a graph-changing command moves the epoch')
    t.same(await topNodes(qmp, ['vda']), new Map([['vda', 'vda-f1']]), 'and the next lookup reads the new top')
    t.equal(queries(), 3)

    const e2 = qmp.graphEpoch
    await qmp.execute('blockdev-snapshot-sync', { 'node-name': 'vda-f1', 'snapshot-file': path.join(dir, 'o2.qcow2'), 'snapshot-node-name': 'vda-f2', format: 'qcow2' })
    noteTopNodes(qmp, e2, new Map([['vda', 'vda-f2']]))
    t.same(await topNodes(qmp, ['vda']), new Map([['vda', 'vda-f2']]), 'what qmpd noted after its own command is used')
    t.equal(queries(), 3, 'without asking QEMU')

    const e3 = qmp.graphEpoch
    await qmp.execute('blockdev-snapshot-sync', { 'node-name': 'vda-f2', 'snapshot-file': path.join(dir, 'o3.qcow2'), 'snapshot-node-name': 'vda-f3', format: 'qcow2' })
    await qmp.hmp('info status')
    noteTopNodes(qmp, e3, new Map([['vda', 'bogus']]))
    t.same(await topNodes(qmp, ['vda']), new Map([['vda', 'vda-f3']]), 'a note is ignored when another command (here HMP) came in between')
    t.equal(queries(), 4)

    // Events of a job someone else started move the epoch too (with auto-finalize it may pivot
    // without a command); qmpd's own jobs (qmpd-…) change the graph only through its commands.
    for (const [id, moves] of [['st', true], ['qmpd-st', false]] as const) {
      const concluded = qmp.waitForEvent('JOB_STATUS_CHANGE', { filter: (e) => e.data.id === id && e.data.status === 'concluded', timeoutMs: 10_000 })
      // The command moves the epoch by one when it is sent; the job's events may arrive before
      // its reply (a small stream ends at once), so count from before it.
      const afterCommand = qmp.graphEpoch + 1
      await qmp.execute('block-stream', { 'job-id': id, device: 'vda-f3', 'auto-dismiss': false })
      await concluded
      if (moves) t.ok(qmp.graphEpoch > afterCommand, `the events of job ${id} move the epoch`)
      else t.equal(qmp.graphEpoch, afterCommand, `the events of job ${id} do not`)
      await qmp.execute('job-dismiss', { id })
    }
  })

  t.test('replies settle in arrival order, each in a loop iteration of its own', async (t) => {
    const q = await startQemu(t)
    const qmp = await connectTo(t, q)
    const order: string[] = []
    let ticks = 0
    const timer = setInterval(() => ticks++, 0)
    const work = Array.from({ length: 40 }, (_, i) =>
      qmp.execute('query-status').then(() => {
        order.push(String(i))
        const end = performance.now() + 2
        while (performance.now() < end) {
          /* 2 ms of synchronous work after each reply */
        }
      }),
    )
    await Promise.all(work)
    clearInterval(timer)
    t.same(order, Array.from({ length: 40 }, (_, i) => String(i)), 'in the order the commands were sent')
    t.ok(ticks >= 20, `a 0 ms interval timer ran ${ticks} times during 40 × 2 ms of reply handling: it was not held off until the end`)
  })
}
