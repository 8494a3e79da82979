/**
 * Protocol faults real QEMU does not produce on demand, against a fake QMP server.
 * Behaviour that QEMU itself exhibits is tested in client-qemu.test.ts.
 */

import fs from 'node:fs'
import net from 'node:net'
import path from 'node:path'
import t from 'tap'
import { QmpCommandError, QmpDisconnectedError, QmpdError, TimeoutError } from '../../src/errors.ts'
import { QmpClient, type QmpEvent } from '../../src/qmp/index.ts'
import { recordingLogger, sleep, socketPath, startFakeQmp, type FakeCommand, type FakeConn, type TapLike } from './fake-qmp.ts'

async function connected(t: TapLike, onCommand?: (cmd: FakeCommand, conn: FakeConn) => void, logger = recordingLogger()) {
  const fake = await startFakeQmp(t, { onCommand })
  const qmp = new QmpClient({ logger: logger.logger })
  await qmp.connect({ path: fake.path })
  t.teardown(() => qmp.disconnect())
  return { fake, qmp, conn: await fake.connection(), records: logger.records }
}

t.test('connect', async (t) => {
  t.test('reads the greeting, negotiates without oob and reaches running', async (t) => {
    const fake = await startFakeQmp(t)
    const qmp = new QmpClient()
    t.teardown(() => qmp.disconnect())
    const states: string[] = []
    qmp.on('connected', () => states.push(qmp.state))
    const p = qmp.connect(fake.path)
    t.equal(qmp.state, 'connecting')
    const g = await p
    t.same(g, { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'fake' }, capabilities: ['oob'] })
    t.equal(qmp.state, 'running')
    t.same(states, ['running'])
    t.equal(fake.capabilities.length, 1)
    t.notOk('arguments' in (fake.capabilities[0] ?? {}), 'no enable: oob is off by default')
    t.equal(qmp.oobEnabled, false)
    await t.rejects(qmp.connect(fake.path), { code: 'INVALID_STATE' }, 'connect while running')
  })

  t.test('negotiates oob when asked', async (t) => {
    const fake = await startFakeQmp(t)
    const qmp = new QmpClient()
    t.teardown(() => qmp.disconnect())
    await qmp.connect({ path: fake.path }, { oob: true })
    t.same(fake.capabilities[0]?.arguments, { enable: ['oob'] })
    t.equal(qmp.oobEnabled, true)
    t.same(await qmp.executeUnchecked('x-oob-test', { id: 'a' }, { oob: true }), {})
    t.equal((await fake.connection()).commands[0]?.['exec-oob'], 'x-oob-test')
  })

  t.test('refuses exec-oob when oob was not negotiated', async (t) => {
    const { qmp } = await connected(t)
    await t.rejects(qmp.execute('query-status', undefined, { oob: true }), { code: 'INVALID_STATE' })
  })

  t.test('fails with QMP_CONNECT_FAILED and returns to idle for a nonexistent path', async (t) => {
    const qmp = new QmpClient()
    const err = await qmp.connect(path.join(t.testdir(), 'nope.sock')).catch((e: unknown) => e)
    t.type(err, QmpdError)
    t.equal((err as QmpdError).code, 'QMP_CONNECT_FAILED')
    t.type((err as QmpdError).cause, QmpdError, 'cause is a QmpdError carrying the errno')
    t.match(((err as QmpdError).cause as QmpdError).data, { errno: 'ENOENT', reason: 'socket-error' })
    t.equal(qmp.state, 'idle')
    t.equal(qmp.listenerCount('disconnected'), 0)
  })

  t.test('fails with QMP_CONNECT_FAILED for a socket that refuses', async (t) => {
    // A path that exists but has no listener: what a crashed QEMU leaves behind.
    const p = socketPath(t, 'stale.sock')
    fs.writeFileSync(p, '')
    const qmp = new QmpClient()
    let disconnected = 0
    qmp.on('disconnected', () => disconnected++)
    await t.rejects(qmp.connect({ path: p }), { code: 'QMP_CONNECT_FAILED', cause: { data: { errno: 'ECONNREFUSED' } } })
    t.equal(qmp.state, 'idle')
    t.equal(disconnected, 0, 'a failed connect emits no disconnected')

    const srv = net.createServer()
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
    const port = (srv.address() as net.AddressInfo).port
    await new Promise<void>((r) => srv.close(() => r()))
    await t.rejects(qmp.connect(`127.0.0.1:${port}`), { code: 'QMP_CONNECT_FAILED', cause: { data: { errno: 'ECONNREFUSED' } } })
    t.equal(qmp.state, 'idle')
  })

  t.test('times out when no greeting comes, and can connect afterwards', async (t) => {
    const fake = await startFakeQmp(t, { greeting: false })
    const qmp = new QmpClient()
    t.teardown(() => qmp.disconnect())
    const err = await qmp.connect({ path: fake.path }, { timeoutMs: 100 }).catch((e: unknown) => e)
    t.match(err, { code: 'QMP_CONNECT_FAILED' })
    t.type((err as QmpdError).cause, TimeoutError)
    t.equal(qmp.state, 'idle')
    const p = qmp.connect({ path: fake.path })
    ;(await fake.nthConnection(2)).send({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 0 }, package: '' }, capabilities: [] } })
    await p
    t.equal(qmp.state, 'running')
  })

  t.test('is aborted by its signal', async (t) => {
    const fake = await startFakeQmp(t, { greeting: false })
    const qmp = new QmpClient()
    const ac = new AbortController()
    const p = qmp.connect({ path: fake.path }, { signal: ac.signal })
    setTimeout(() => ac.abort(new Error('user gave up')), 20)
    await t.rejects(p, { code: 'QMP_CONNECT_FAILED', cause: { message: 'user gave up' } })
    t.equal(qmp.state, 'idle')
    await t.rejects(qmp.connect({ path: fake.path }, { signal: ac.signal }), { code: 'QMP_CONNECT_FAILED' }, 'already aborted')
    t.equal(qmp.state, 'idle')
  })

  t.test('fails when the first line is not a greeting', async (t) => {
    const fake = await startFakeQmp(t, { greeting: { return: {} } })
    const qmp = new QmpClient()
    await t.rejects(qmp.connect({ path: fake.path }), { code: 'QMP_CONNECT_FAILED', cause: { code: 'QMP_PROTOCOL_ERROR' } })
    t.equal(qmp.state, 'idle')
  })

  t.test('fails when qmp_capabilities is refused', async (t) => {
    const fake = await startFakeQmp(t, {
      onCapabilities: (cmd, conn) => conn.send({ error: { class: 'GenericError', desc: 'nope' }, id: cmd.id }),
    })
    const qmp = new QmpClient()
    await t.rejects(qmp.connect({ path: fake.path }), { code: 'QMP_CONNECT_FAILED', cause: { qmpClass: 'GenericError' } })
    t.equal(qmp.state, 'idle')
  })

  t.test('works over TCP', async (t) => {
    const fake = await startFakeQmp(t, { tcp: true })
    const qmp = new QmpClient()
    t.teardown(() => qmp.disconnect())
    await qmp.connect({ host: '127.0.0.1', port: fake.port })
    t.same(await qmp.execute('stop'), {})
  })

  t.test('disconnect() during connect aborts it', async (t) => {
    const fake = await startFakeQmp(t, { greeting: false })
    const qmp = new QmpClient()
    const p = qmp.connect({ path: fake.path })
    await fake.connection()
    await qmp.disconnect()
    t.equal(qmp.state, 'idle')
    await t.rejects(p, { code: 'QMP_CONNECT_FAILED' })
  })
})

t.test('commands', async (t) => {
  t.test('reject at once with QmpDisconnectedError when not running', async (t) => {
    const qmp = new QmpClient()
    await t.rejects(qmp.execute('query-status'), QmpDisconnectedError)
    await t.rejects(qmp.hmp('info status'), { code: 'QMP_DISCONNECTED' })
    await t.rejects(qmp.events().next(), QmpDisconnectedError)
    await t.rejects(qmp.waitForEvent('STOP'), QmpDisconnectedError)
  })

  t.test('an error reply becomes QmpCommandError', async (t) => {
    const { qmp } = await connected(t, (cmd, conn) =>
      conn.send({ id: cmd.id, error: { class: 'DeviceNotFound', desc: "Device 'x' not found" } }),
    )
    const err = await qmp.executeUnchecked('block-job-cancel', { device: 'x' }).catch((e: unknown) => e)
    t.type(err, QmpCommandError)
    t.match(err, { code: 'QMP_COMMAND_FAILED', qmpClass: 'DeviceNotFound', command: 'block-job-cancel', desc: "Device 'x' not found" })
    t.equal(qmp.state, 'running')
  })

  t.test('sends arguments and ids, logs send/recv at debug with id, command, ms', async (t) => {
    const { qmp, conn, records } = await connected(t)
    await qmp.execute('job-dismiss', { id: 'j1' })
    await qmp.execute('cont')
    const [a, b] = conn.commands
    t.same(a?.arguments, { id: 'j1' })
    t.equal(a?.execute, 'job-dismiss')
    t.notOk(b && 'arguments' in b, 'no arguments key for commands without arguments')
    t.not(a?.id, b?.id)
    const send = records.find((r) => r['msg'] === 'qmp send' && r['command'] === 'job-dismiss')
    const recv = records.find((r) => r['msg'] === 'qmp recv' && r['command'] === 'job-dismiss')
    t.match(send, { level: 20, id: a?.id, component: 'qmp' })
    t.match(recv, { level: 20, id: a?.id, ms: Number })
  })

  t.test('a reply with an unknown id is dropped with a warning', async (t) => {
    const { qmp, conn, records } = await connected(t, (cmd, conn) => {
      conn.send({ return: { status: 'running', running: true, singlestep: false }, id: 'no-such-id' })
      conn.reply(cmd, { status: 'paused', running: false, singlestep: false })
    })
    t.same(await qmp.execute('query-status'), { status: 'paused', running: false, singlestep: false })
    t.equal(qmp.state, 'running')
    t.ok(records.some((r) => r['level'] === 40 && r['msg'] === 'qmp reply with unknown id dropped' && r['id'] === 'no-such-id'))
    void conn
  })

  t.test('error replies without id fail the command QEMU could not parse, not the session', async (t) => {
    // What QEMU does with a request nested deeper than its parser allows: a burst of errors
    // without id, and no reply with the request's id (see client-qemu and integration tests).
    const idless = (conn: FakeConn, n: number) => {
      conn.send({ error: { class: 'GenericError', desc: 'JSON nesting depth limit exceeded' } })
      for (let i = 1; i < n; i++) conn.send({ error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } })
    }
    const { qmp, conn, records } = await connected(t, (cmd, conn) => {
      if (cmd.execute === 'x-unparsable') idless(conn, 5)
      else conn.reply(cmd, cmd.execute === 'query-version' ? { qemu: { major: 7, minor: 2, micro: 22 }, package: 'fake' } : { status: 'running', running: true, singlestep: false })
    })
    let disconnects = 0
    qmp.on('disconnected', () => disconnects++)

    // Alone: the client's probe (query-version) brings the reply with an id that settles it.
    const started = Date.now()
    const err = await qmp.executeUnchecked('x-unparsable', { a: 1 }).catch((e: unknown) => e)
    t.type(err, QmpCommandError)
    t.match(err, { code: 'QMP_COMMAND_FAILED', command: 'x-unparsable', qmpClass: 'GenericError', desc: /nesting depth limit exceeded.*without id/ })
    t.ok(Date.now() - started < 1000, 'at once, not at its timeout')
    t.same(conn.commands.map((c) => c.execute), ['x-unparsable', 'query-version'], 'one probe for the whole burst')

    // With commands before and after it: only the unparsable one fails.
    const [before, bad, after] = await Promise.allSettled([
      qmp.execute('query-status'),
      qmp.executeUnchecked('x-unparsable'),
      qmp.execute('query-status'),
    ])
    t.equal(before.status, 'fulfilled')
    t.match(bad, { status: 'rejected', reason: { qmpClass: 'GenericError', command: 'x-unparsable' } })
    t.equal(after.status, 'fulfilled')

    t.equal(qmp.state, 'running')
    t.equal(disconnects, 0, 'the session was kept')
    t.equal(qmp.pendingCount, 0)
    t.ok(records.some((r) => r['level'] === 40 && r['msg'] === 'qmp error reply without id (QEMU could not parse a request)'))
    t.equal(records.filter((r) => r['level'] === 40 && r['msg'] === 'qmp error reply without id (QEMU could not parse a request)').length, 2, 'one warning per burst')
    t.same(await qmp.execute('query-status'), { status: 'running', running: true, singlestep: false })
  })

  t.test('a return without id still ends the session (nothing to attribute it to)', async (t) => {
    const { qmp } = await connected(t, (cmd, conn) => conn.send({ return: {} }))
    let disconnects = 0
    qmp.on('disconnected', () => disconnects++)
    const err = await qmp.execute('query-status').catch((e: unknown) => e)
    t.type(err, QmpDisconnectedError)
    t.match((err as QmpDisconnectedError).cause, { code: 'QMP_PROTOCOL_ERROR', message: /without id/ })
    t.equal(qmp.state, 'idle')
    t.equal(disconnects, 1)
  })

  t.test('with out-of-band execution an error without id still ends the session (replies may come out of order)', async (t) => {
    const fake = await startFakeQmp(t, {
      onCommand: (cmd, conn) => conn.send({ error: { class: 'GenericError', desc: "JSON parse error, invalid keyword 'garbage'" } }),
    })
    const qmp = new QmpClient()
    t.teardown(() => qmp.disconnect())
    await qmp.connect({ path: fake.path }, { oob: true })
    const err = await qmp.execute('query-status').catch((e: unknown) => e)
    t.type(err, QmpDisconnectedError)
    t.match((err as QmpDisconnectedError).cause, { code: 'QMP_PROTOCOL_ERROR', message: /without id.*GenericError: JSON parse error/ })
    t.equal(qmp.state, 'idle')
  })

  t.test('a timed-out command rejects with TimeoutError, its late reply is dropped quietly, the client still works', async (t) => {
    const held: FakeCommand[] = []
    const { qmp, conn, records } = await connected(t, (cmd, conn) => {
      if (cmd.execute === 'stop') held.push(cmd)
      else conn.reply(cmd, { status: 'running', running: true, singlestep: false })
    })
    const started = Date.now()
    const err = await qmp.execute('stop', undefined, { timeoutMs: 50 }).catch((e: unknown) => e)
    t.type(err, TimeoutError)
    t.match(err, { code: 'TIMEOUT', data: { command: 'stop', timeoutMs: 50 } })
    t.ok(Date.now() - started >= 45)
    t.equal(qmp.pendingCount, 0)
    conn.reply(held[0] as FakeCommand)
    t.same(await qmp.execute('query-status'), { status: 'running', running: true, singlestep: false })
    t.notOk(records.some((r) => r['msg'] === 'qmp reply with unknown id dropped'), 'late reply is not warned about')
    t.ok(records.some((r) => r['msg'] === 'qmp late reply dropped (command timed out or was aborted)'))
    t.equal(qmp.state, 'running')
  })

  t.test('an aborted command rejects with the signal reason', async (t) => {
    const { qmp } = await connected(t, () => {})
    const ac = new AbortController()
    const p = qmp.execute('cont', undefined, { signal: ac.signal })
    ac.abort(new Error('stop waiting'))
    await t.rejects(p, { message: 'stop waiting' })
    t.equal(qmp.pendingCount, 0)
    await t.rejects(qmp.execute('cont', undefined, { signal: ac.signal }), { message: 'stop waiting' }, 'already aborted')
  })

  t.test('a query-status reply of the wrong shape is rejected, the session continues', async (t) => {
    const { qmp } = await connected(t, (cmd, conn) =>
      conn.reply(cmd, cmd.execute === 'query-status' ? { status: 'sleepy', running: 'yes' } : { name: 'vm' }),
    )
    const err = await qmp.execute('query-status').catch((e: unknown) => e)
    t.match(err, { code: 'QMP_PROTOCOL_ERROR', data: { command: 'query-status', issues: Array } })
    t.same(await qmp.executeUnchecked('query-name'), { name: 'vm' })
  })
})

t.test('disconnect', async (t) => {
  t.test('EOF mid-command rejects pending commands and emits one disconnected', async (t) => {
    const { qmp, conn } = await connected(t, () => {})
    const causes: QmpdError[] = []
    qmp.on('disconnected', (c) => causes.push(c))
    const it = qmp.events()
    const pending = [qmp.execute('query-status'), qmp.execute('stop'), qmp.hmp('info status')]
    await conn.waitForCommands(3)
    conn.event('STOP')
    conn.socket.end()
    const results = await Promise.allSettled(pending)
    for (const r of results) {
      t.equal(r.status, 'rejected')
      if (r.status === 'rejected') {
        t.type(r.reason, QmpDisconnectedError)
        t.match(r.reason.cause, { code: 'QMP_DISCONNECTED', data: { reason: 'eof' } })
      }
    }
    t.equal(qmp.state, 'idle')
    await sleep(20)
    t.equal(causes.length, 1, 'exactly one disconnected event')
    t.equal(qmp.lastDisconnectCause, causes[0])
    t.match((await it.next()).value, { event: 'STOP' }, 'events buffered before EOF are delivered first')
    await t.rejects(it.next(), QmpDisconnectedError)
    t.same(await it.next(), { value: undefined, done: true })
    t.equal(qmp.subscriberCount, 0)
    const late = await qmp.execute('query-status').catch((e: unknown) => e)
    t.type(late, QmpDisconnectedError)
    t.equal((late as QmpDisconnectedError).cause, causes[0], 'a later command carries the last cause')
  })

  t.test('a socket reset counts as the peer going away', async (t) => {
    // What QEMU does when it exits with unread commands in its socket (see client-qemu.test.ts).
    // resetAndDestroy() needs TCP.
    const fake = await startFakeQmp(t, { tcp: true, onCommand: () => {} })
    const qmp = new QmpClient()
    await qmp.connect({ host: '127.0.0.1', port: fake.port })
    const conn = await fake.connection()
    const p = qmp.execute('query-status')
    await conn.waitForCommands(1)
    conn.socket.resetAndDestroy()
    await t.rejects(p, QmpDisconnectedError)
    t.match(qmp.lastDisconnectCause, { code: 'QMP_DISCONNECTED', data: { reason: 'eof', errno: 'ECONNRESET' } })
  })

  t.test('disconnect() rejects pending commands with reason client and emits one disconnected', async (t) => {
    const { qmp, conn } = await connected(t, () => {})
    const causes: QmpdError[] = []
    qmp.on('disconnected', (c) => {
      t.equal(qmp.state, 'idle', 'state is idle when disconnected is emitted')
      causes.push(c)
    })
    const p = qmp.execute('cont')
    const w = qmp.waitForEvent('RESUME')
    await conn.waitForCommands(1)
    const d = qmp.disconnect()
    t.equal(qmp.state, 'disconnecting')
    await t.rejects(p, { code: 'QMP_DISCONNECTED', cause: { data: { reason: 'client' } } })
    await t.rejects(w, QmpDisconnectedError)
    await t.rejects(qmp.execute('cont'), QmpDisconnectedError, 'no commands while disconnecting')
    await d
    await qmp.disconnect()
    t.equal(qmp.state, 'idle')
    t.equal(causes.length, 1)
  })

  t.test('the client reconnects after a disconnect', async (t) => {
    const { qmp, fake, conn } = await connected(t)
    conn.socket.destroy()
    await new Promise((r) => qmp.once('disconnected', r))
    await qmp.connect({ path: fake.path })
    t.same(await qmp.execute('cont'), {})
  })
})

t.test('events', async (t) => {
  t.test('a flood of 50k events with no listener is dropped, then a command is still answered', async (t) => {
    const { qmp, conn } = await connected(t, (cmd, conn) => {
      const line = JSON.stringify({ timestamp: { seconds: 1, microseconds: 1 }, event: 'RTC_CHANGE', data: { offset: 1, 'qom-path': '/m' } })
      conn.raw((line + '\r\n').repeat(50_000))
      conn.reply(cmd, { name: 'after-flood' })
    })
    const before = process.memoryUsage().heapUsed
    t.same(await qmp.executeUnchecked('query-name'), { name: 'after-flood' })
    t.equal(qmp.subscriberCount, 0)
    const grown = process.memoryUsage().heapUsed - before
    t.ok(grown < 64 * 1024 * 1024, `heap grew ${Math.round(grown / 1024)} KiB`)
    void conn
  })

  t.test('listeners see every event of a flood; waitForEvent finds the last one; a capped iterator overflows', async (t) => {
    const N = 50_000
    const { qmp } = await connected(t, (cmd, conn) => {
      const lines: string[] = []
      for (let i = 0; i < N; i++) {
        lines.push(JSON.stringify({ timestamp: { seconds: 1, microseconds: i }, event: 'JOB_STATUS_CHANGE', data: { id: `j${i}`, status: 'running' } }))
      }
      conn.raw(lines.join('\r\n') + '\r\n')
      conn.reply(cmd)
    })
    let seen = 0
    let byName = 0
    qmp.on('event', () => seen++)
    qmp.on('JOB_STATUS_CHANGE', () => byName++)
    const last = qmp.waitForEvent('JOB_STATUS_CHANGE', { filter: (e) => e.data.id === `j${N - 1}`, timeoutMs: 30_000 })
    const capped = qmp.events({ names: ['JOB_STATUS_CHANGE'], maxBuffer: 100 })
    await qmp.execute('cont')
    t.equal(seen, N)
    t.equal(byName, N)
    t.equal((await last).timestamp.microseconds, N - 1)
    for (let i = 0; i < 100; i++) t.equal((await capped.next()).value?.data.id, `j${i}`)
    await t.rejects(capped.next(), { code: 'INTERNAL', data: { reason: 'event-buffer-overflow', maxBuffer: 100 } })
    t.equal(qmp.subscriberCount, 0, 'overflowed and resolved subscriptions are gone')
  })

  t.test('a throwing listener is logged and does not stop dispatch', async (t) => {
    const { qmp, conn, records } = await connected(t)
    const got: string[] = []
    qmp.on('STOP', () => {
      throw new Error('listener bug')
    })
    qmp.on('STOP', (e) => void got.push(e.event))
    const w = qmp.waitForEvent('STOP', { timeoutMs: 2000 })
    conn.event('STOP')
    await w
    t.same(got, ['STOP'])
    t.ok(records.some((r) => r['msg'] === 'qmp listener threw'))
  })

  t.test('iterator: names, filter, buffering before consumption, return() unsubscribes', async (t) => {
    const { qmp, conn } = await connected(t)
    const it = qmp.events({ names: ['BLOCK_JOB_READY', 'BLOCK_JOB_COMPLETED'], filter: (e) => e.data.device === 'job0' })
    const jobData = { type: 'mirror', len: 1, offset: 1, speed: 0 }
    conn.event('BLOCK_JOB_READY', { ...jobData, device: 'other' })
    conn.event('STOP')
    conn.event('BLOCK_JOB_READY', { ...jobData, device: 'job0' })
    conn.event('BLOCK_JOB_COMPLETED', { ...jobData, device: 'job0' })
    await qmp.execute('cont') // the events above were processed before this reply
    const got: Array<QmpEvent<'BLOCK_JOB_READY' | 'BLOCK_JOB_COMPLETED'>> = []
    for await (const e of it) {
      got.push(e)
      if (e.event === 'BLOCK_JOB_COMPLETED') break
    }
    t.same(
      got.map((e) => [e.event, e.data.device]),
      [
        ['BLOCK_JOB_READY', 'job0'],
        ['BLOCK_JOB_COMPLETED', 'job0'],
      ],
    )
    t.equal(qmp.subscriberCount, 0, 'break out of for-await unsubscribed')
  })

  t.test('iterator: timeout rejects with TimeoutError, abort with the reason', async (t) => {
    const { qmp } = await connected(t)
    await t.rejects(qmp.events({ names: ['RESUME'], timeoutMs: 30 }).next(), TimeoutError)
    await t.rejects(qmp.waitForEvent('RESUME', { timeoutMs: 30 }), { code: 'TIMEOUT' })
    const ac = new AbortController()
    const it = qmp.events({ signal: ac.signal })
    const n = it.next()
    ac.abort(new Error('enough'))
    await t.rejects(n, { message: 'enough' })
    t.same(await it.next(), { value: undefined, done: true })
    t.equal(qmp.subscriberCount, 0)
  })

  t.test('events with bad data for a validated event are dropped with a warning', async (t) => {
    const { qmp, conn, records } = await connected(t)
    const w = qmp.waitForEvent('JOB_STATUS_CHANGE', { timeoutMs: 2000 })
    conn.event('JOB_STATUS_CHANGE', { id: 'j', status: 'exploded' })
    conn.event('JOB_STATUS_CHANGE', { id: 'j', status: 'concluded' })
    t.equal((await w).data.status, 'concluded')
    t.ok(records.some((r) => r['msg'] === 'qmp event dropped: unexpected data'))
  })

  t.test('an event outside the typed map is emitted as unknownEvent only', async (t) => {
    const { qmp, conn } = await connected(t)
    const unknown: string[] = []
    let typed = 0
    qmp.on('unknownEvent', (e) => unknown.push(e.event))
    qmp.on('event', () => typed++)
    conn.event('FUTURE_EVENT', { x: 1 })
    await qmp.execute('cont')
    t.same(unknown, ['FUTURE_EVENT'])
    t.equal(typed, 0)
  })

  t.test('a malformed event envelope ends the session', async (t) => {
    const { qmp, conn } = await connected(t)
    conn.send({ event: 'STOP', timestamp: 'yesterday' })
    await new Promise((r) => qmp.once('disconnected', r))
    t.match(qmp.lastDisconnectCause, { code: 'QMP_PROTOCOL_ERROR', message: /malformed event/ })
  })
})
