// qmpd/client against a real daemon: the per-job event stream and its Last-Event-ID resume, the
// package export as a Node consumer imports it, and waitForJob (SSE and polling) following a
// throttled commit in real QEMU.
import { execFile } from 'node:child_process'
import { mkdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t, { type Test } from 'tap'
import { ApiError, createQmpdClient, followEvents, waitForJob, type Job, type StreamEvent } from '../../src/client/index.ts'
import { op, startTestDaemon } from '../helpers/daemon.ts'
import { makeGuestDisk } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'

const run = promisify(execFile)
const root = new URL('../..', import.meta.url).pathname

let socks = 0
/** A short socket path (sun_path holds 108 bytes; test dirs are longer), removed at teardown. */
function sockPath(t: Test): string {
  const p = `/tmp/qmpd-client-${process.pid}-${socks++}.sock`
  t.teardown(() => rmSync(p, { force: true }))
  return p
}

const fakeJob = (id: string, state: Job['state']): Job => ({ id, vm: 'v', op: 'test', state, params: {}, createdAt: new Date(0).toISOString() })

/** Reads events until `n` have arrived, then stops the stream. */
async function take(it: AsyncGenerator<StreamEvent>, n: number, stop: AbortController): Promise<StreamEvent[]> {
  const out: StreamEvent[] = []
  for await (const ev of it) {
    out.push(ev)
    if (out.length === n) break
  }
  stop.abort()
  return out
}

t.test('?job= keeps one job\'s events; Last-Event-ID replays what came after it; an unknown id says gap', async (t) => {
  const td = await startTestDaemon(t)
  const sock = sockPath(t)
  await td.app.listen({ path: sock })
  const client = createQmpdClient({ url: `unix:${sock}` })
  t.teardown(() => client.close())
  const bus = td.daemon.bus
  bus.emit({ type: 'job', vm: 'v', job: fakeJob('a', 'queued') })
  bus.emit({ type: 'job', vm: 'v', job: fakeJob('b', 'queued') })
  bus.emit({ type: 'vm', vm: 'v', state: 'running' })
  bus.emit({ type: 'job', vm: 'v', job: fakeJob('a', 'running') })
  // From the start (Last-Event-ID 0): a's two kept events, then a live one.
  const stop = new AbortController()
  const got = take(followEvents(client, { job: 'a', lastEventId: '0', signal: stop.signal, onOpen: () => bus.emit({ type: 'job', vm: 'v', job: fakeJob('a', 'succeeded') }) }), 3, stop)
  const evs = await got
  t.same(
    evs.map((e) => [e.id, e.event, (e.data as any).job.id, (e.data as any).job.state]),
    [['1', 'job', 'a', 'queued'], ['4', 'job', 'a', 'running'], ['5', 'job', 'a', 'succeeded']],
    'only job a, with the shared ids, replayed then live',
  )
  // Resume after id 4: only what came later.
  const stop2 = new AbortController()
  const resumed = await take(followEvents(client, { job: 'a', lastEventId: '4', signal: stop2.signal }), 1, stop2)
  t.same(resumed.map((e) => [e.id, (e.data as any).job.state]), [['5', 'succeeded']], 'resumed after Last-Event-ID 4')
  // An id this daemon never sent (a previous daemon's): the client is told it missed events.
  const stop3 = new AbortController()
  const gap = await take(followEvents(client, { job: 'a', lastEventId: '999', signal: stop3.signal }), 1, stop3)
  t.equal(gap[0]?.event, 'gap', 'a gap event comes first')
  let refused: unknown
  try {
    for await (const _ of followEvents(client, { lastEventId: 'abc' })) break
  } catch (err) {
    refused = err
  }
  t.ok(refused instanceof ApiError && refused.status === 400, `a malformed Last-Event-ID is refused with 400 (${String(refused)})`)
})

t.test('the package export qmpd/client imports in a plain Node consumer and talks to the daemon', async (t) => {
  const td = await startTestDaemon(t, { token: 'export-test-token' })
  const url = await td.app.listen({ host: '127.0.0.1', port: 0 })
  const dir = t.testdir()
  mkdirSync(join(dir, 'node_modules'))
  symlinkSync(root, join(dir, 'node_modules', 'qmpd'))
  writeFileSync(
    join(dir, 'consumer.mjs'),
    `import { createQmpdClient, expectOk } from 'qmpd/client'
const c = createQmpdClient({ url: process.argv[2], token: 'export-test-token' })
const { body } = await expectOk(c.api.GET('/v1/jobs', { params: { query: { limit: 1 } } }))
console.log(JSON.stringify(body))
await c.close()
`,
  )
  const { stdout } = await run(process.execPath, [join(dir, 'consumer.mjs'), url], { cwd: dir, env: { ...process.env, _TAPJS_PROCESSINFO_COVERAGE_: '0' } })
  t.same(JSON.parse(stdout), { jobs: [] }, 'the consumer got GET /v1/jobs through the export')
})

t.test('waitForJob follows a throttled commit to its end, by the per-job stream and by polling', async (t) => {
  if (!requireQemu(t)) return
  const td = await startTestDaemon(t)
  const sock = sockPath(t)
  await td.app.listen({ path: sock })
  const client = createQmpdClient({ socketPath: sock })
  t.teardown(() => client.close())
  // Two disks, each base <- mid (6 MiB of data) <- top; one commit of a mid into its base per mode,
  // at 2 MiB/s (about 3 s each).
  const dir = join(td.stateDir, 'vms', 'w')
  mkdirSync(dir, { recursive: true })
  const disks = []
  for (const [i, id] of ['vda', 'vdb'].entries()) {
    const f = (n: string) => join(dir, `${id}-${n}.qcow2`)
    await makeGuestDisk(f('base'), { format: 'qcow2', sizeMiB: 16, boot: i === 0 })
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', f('base'), f('mid')])
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x11 4M 6M', f('mid')])
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', f('mid'), f('top')])
    disks.push({ id, file: f('top') })
  }
  t.equal((await td.api('POST', '/v1/vms', { name: 'w', memoryMiB: 32, disks })).status, 201, 'VM defined')
  await op(td, 'w', 'start')
  for (const [mode, disk] of [['sse', 'vda'], ['poll', 'vdb']] as const) {
    const start = await td.api('POST', `/v1/vms/w/disks/${disk}/commit`, { top: join(dir, `${disk}-mid.qcow2`), speedBytesPerSec: 2 * 1024 * 1024 })
    t.equal(start.status, 202, `commit of ${disk} started (${JSON.stringify(start.body).slice(0, 300)})`)
    const seen: Array<[string, number | undefined]> = []
    let fellBack = ''
    const t0 = Date.now()
    const done = await waitForJob(client, start.body.id, { mode, pollMs: 200, onProgress: (j) => seen.push([j.state, j.progress?.current]), onFallback: (why) => (fellBack = why) })
    const ms = Date.now() - t0
    t.equal(done.state, 'succeeded', `${mode}: the job ended succeeded after ${ms} ms`)
    if (mode === 'sse') t.equal(fellBack, '', 'sse: the stream served, no fallback to polling')
    const currents = seen.map(([, c]) => c ?? 0)
    t.ok(seen.length >= 3, `${mode}: ${seen.length} progress reports`)
    t.ok(currents.some((c) => c > 0 && c < (done.progress?.total ?? 0)), `${mode}: intermediate progress was reported (${currents.join(',')})`)
    t.ok(currents.every((c, i) => i === 0 || c >= currents[i - 1]!), `${mode}: progress only grew`)
  }
})
