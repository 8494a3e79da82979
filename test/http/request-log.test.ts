// Per-request log lines are at debug: an info logger gets none, a debug one gets both.
import { Writable } from 'node:stream'
import { pino } from 'pino'
import t, { type Test } from 'tap'
import { EventBus } from '../../src/events/bus.ts'
import { buildApp, type Services } from '../../src/http/app.ts'

/** An app over no services (GET /healthz calls none) logging JSON lines into `lines`. */
async function appLogging(t: Test, level: string, lines: Array<Record<string, unknown>>): Promise<Awaited<ReturnType<typeof buildApp>>> {
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString().split('\n')) if (l) lines.push(JSON.parse(l) as Record<string, unknown>)
      done()
    },
  })
  const app = await buildApp({ services: { bus: new EventBus(), vms: { list: async () => [] } } as unknown as Services, logger: pino({ level }, sink), version: 't' })
  t.teardown(() => app.close())
  return app
}

t.test('at info, a request logs nothing; at debug, incoming and completed', async (t) => {
  const info: Array<Record<string, unknown>> = []
  const a = await appLogging(t, 'info', info)
  t.equal((await a.inject({ method: 'GET', url: '/healthz' })).statusCode, 200)
  t.same(info.filter((l) => /request/.test(String(l['msg']))), [], 'no per-request line at info')

  const debug: Array<Record<string, unknown>> = []
  const b = await appLogging(t, 'debug', debug)
  t.equal((await b.inject({ method: 'GET', url: '/healthz' })).statusCode, 200)
  const msgs = debug.filter((l) => l['level'] === 20).map((l) => l['msg'])
  t.ok(msgs.includes('incoming request'), 'incoming request at debug')
  t.ok(msgs.includes('request completed'), 'request completed at debug')
})
