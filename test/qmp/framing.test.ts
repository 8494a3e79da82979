import t from 'tap'
import { QmpDisconnectedError, QmpdError } from '../../src/errors.ts'
import { LineSplitter, QmpClient } from '../../src/qmp/index.ts'
import { sleep, startFakeQmp } from './fake-qmp.ts'

t.test('LineSplitter', async (t) => {
  t.test('reassembles a line fed byte by byte, even inside multi-byte UTF-8 characters', async (t) => {
    const s = new LineSplitter()
    const text = '{"return": "é 💾 ü"}'
    const bytes = Buffer.from(text + '\r\n', 'utf8')
    const out: string[] = []
    for (const b of bytes) out.push(...s.push(Buffer.from([b])))
    t.same(out, [text])
    t.equal(s.pendingBytes, 0)
  })

  t.test('returns several lines from one chunk and keeps the unfinished tail', async (t) => {
    const s = new LineSplitter()
    t.same(s.push(Buffer.from('{"a":1}\r\n{"b":2}\n\r\n{"c"')), ['{"a":1}', '{"b":2}'])
    t.equal(s.pendingBytes, 4)
    t.same(s.push(Buffer.from(':3}\r\n')), ['{"c":3}'])
  })

  t.test('joins a long line from many chunks', async (t) => {
    const s = new LineSplitter()
    const chunk = Buffer.alloc(64 * 1024, 'x')
    for (let i = 0; i < 160; i++) t.same(s.push(chunk), [])
    const lines = s.push(Buffer.from('y\n'))
    t.equal(lines.length, 1)
    t.equal(lines[0]?.length, 160 * 64 * 1024 + 1)
  })

  t.test('throws QMP_PROTOCOL_ERROR past maxLineBytes', async (t) => {
    const s = new LineSplitter({ maxLineBytes: 10 })
    t.same(s.push(Buffer.from('0123456789\n')), ['0123456789'])
    t.throws(() => s.push(Buffer.from('0123456789A')), { code: 'QMP_PROTOCOL_ERROR' })
  })
})

t.test('client reads replies split byte by byte', async (t) => {
  const fake = await startFakeQmp(t, {
    onCommand: (cmd, conn) => {
      void (async () => {
        const line = Buffer.from(JSON.stringify({ return: { status: 'paused', singlestep: false, running: false }, id: cmd.id }) + '\r\n')
        for (const b of line) {
          conn.raw(Buffer.from([b]))
          await sleep(1)
        }
      })()
    },
  })
  // The greeting itself also arrives byte by byte in a second client below.
  const qmp = new QmpClient()
  await qmp.connect({ path: fake.path })
  t.teardown(() => qmp.disconnect())
  t.same(await qmp.execute('query-status'), { status: 'paused', singlestep: false, running: false })
})

t.test('client reads a greeting split byte by byte, with a multi-byte package name', async (t) => {
  const greeting = { QMP: { version: { qemu: { micro: 0, minor: 2, major: 7 }, package: 'Débian ✓' }, capabilities: [] } }
  const fake = await startFakeQmp(t, { greeting: false })
  const qmp = new QmpClient()
  t.teardown(() => qmp.disconnect())
  const connecting = qmp.connect({ path: fake.path })
  const conn = await fake.connection()
  for (const b of Buffer.from(JSON.stringify(greeting) + '\r\n')) {
    conn.raw(Buffer.from([b]))
    await sleep(0)
  }
  const g = await connecting
  t.equal(g.version.package, 'Débian ✓')
  t.equal(qmp.state, 'running')
})

t.test('client matches several replies and an event arriving in one chunk, out of order', async (t) => {
  const fake = await startFakeQmp(t, { onCommand: () => {} })
  const qmp = new QmpClient()
  await qmp.connect({ path: fake.path })
  t.teardown(() => qmp.disconnect())
  const conn = await fake.connection()
  const stop = qmp.waitForEvent('STOP', { timeoutMs: 5000 })
  const a = qmp.executeUnchecked('query-name')
  const b = qmp.hmp('info status')
  const c = qmp.execute('query-version')
  const [ca, cb, cc] = await conn.waitForCommands(3)
  const lines = [
    JSON.stringify({ return: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'x' }, id: cc?.id }),
    JSON.stringify({ timestamp: { seconds: 1, microseconds: 1 }, event: 'STOP' }),
    JSON.stringify({ return: 'VM status: paused\r\n', id: cb?.id }),
    JSON.stringify({ return: { name: 'vm0' }, id: ca?.id }),
  ]
  conn.raw(lines.join('\r\n') + '\r\n')
  t.same(await a, { name: 'vm0' })
  t.equal(await b, 'VM status: paused\r\n')
  t.same(await c, { qemu: { major: 7, minor: 2, micro: 22 }, package: 'x' })
  const ev = await stop
  t.same(ev.data, {}, 'an event without data gets data: {}')
  t.same(ev.timestamp, { seconds: 1, microseconds: 1 })
})

t.test('client reads a 20 MiB reply line', async (t) => {
  const big = 'é'.repeat(10 * 1024 * 1024) // 20 MiB of UTF-8, split inside characters by the socket
  const fake = await startFakeQmp(t, {
    onCommand: (cmd, conn) =>
      cmd.execute === 'query-named-block-nodes' ? conn.send({ return: [{ file: big, 'node-name': 'n0' }], id: cmd.id }) : conn.reply(cmd),
  })
  const qmp = new QmpClient()
  await qmp.connect({ path: fake.path })
  t.teardown(() => qmp.disconnect())
  const started = Date.now()
  const nodes = (await qmp.executeUnchecked('query-named-block-nodes', { flat: true }, { timeoutMs: 60_000 })) as Array<{
    file: string
  }>
  t.equal(nodes.length, 1)
  t.equal(nodes[0]?.file.length, big.length)
  t.ok(nodes[0]?.file === big, 'content intact')
  t.ok(Date.now() - started < 20_000, `took ${Date.now() - started} ms`)
  t.same(await qmp.executeUnchecked('query-name'), {}, 'session still usable')
})

t.test('a garbage line ends the session with a protocol error cause', async (t) => {
  const fake = await startFakeQmp(t, { onCommand: () => {} })
  const qmp = new QmpClient()
  await qmp.connect({ path: fake.path })
  const conn = await fake.connection()
  const disconnects: QmpdError[] = []
  qmp.on('disconnected', (c) => disconnects.push(c))
  const pending = qmp.execute('query-status')
  await conn.waitForCommands(1)
  conn.send('this is not json')
  const err = await pending.then(
    () => t.fail('should reject'),
    (e: unknown) => e,
  )
  t.type(err, QmpDisconnectedError)
  const cause = (err as QmpDisconnectedError).cause as QmpdError
  t.equal(cause.code, 'QMP_PROTOCOL_ERROR')
  t.equal(cause.data['reason'], 'protocol-error')
  t.match(cause.message, /not JSON: this is not json/)
  t.equal(qmp.state, 'idle')
  t.equal(disconnects.length, 1)
  t.equal(disconnects[0], cause)
  t.equal(qmp.lastDisconnectCause, cause)
})

t.test('a JSON value that is not an object ends the session', async (t) => {
  const fake = await startFakeQmp(t, { onCommand: (cmd, conn) => conn.send('[1,2,3]') })
  const qmp = new QmpClient()
  await qmp.connect({ path: fake.path })
  await t.rejects(qmp.execute('query-status'), { code: 'QMP_DISCONNECTED' })
  t.equal(qmp.lastDisconnectCause?.code, 'QMP_PROTOCOL_ERROR')
  t.equal(qmp.state, 'idle')
})

t.test('a line beyond maxLineBytes ends the session', async (t) => {
  const fake = await startFakeQmp(t, { onCommand: (cmd, conn) => conn.send({ return: 'x'.repeat(5000), id: cmd.id }) })
  const qmp = new QmpClient({ maxLineBytes: 1024 })
  await qmp.connect({ path: fake.path })
  await t.rejects(qmp.execute('query-status'), QmpDisconnectedError)
  t.equal(qmp.lastDisconnectCause?.code, 'QMP_PROTOCOL_ERROR')
  t.match(qmp.lastDisconnectCause?.message, /longer than 1024 bytes/)
})
