// GET /v1/vms/{vm} (in-process inject and real loopback TCP with keep-alive) beside a raw QMP
// query-status round trip on the same QEMU configuration.
import { Agent, request } from 'node:http'
import type { AddressInfo } from 'node:net'
import { join } from 'node:path'
import { bothSides, compare, type Case, type Row } from '../lib/case.ts'
import { Alternator, qmpdGuest, rawGuest, WARMUP_MS } from '../lib/guestvm.ts'
import { benchLogger, startBenchDaemon, type BenchDaemon } from '../lib/qmpd.ts'
import type { RawVm } from '../lib/raw.ts'
import { profiled } from '../lib/profile.ts'
import { summarize } from '../lib/stats.ts'

function httpGet(agent: Agent, port: number, path: string, token: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, path, agent, headers: { authorization: `Bearer ${token}` } }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => (body += c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end()
  })
}

export const getCase: Case = {
  name: 'get',
  title: 'GET /v1/vms/{vm} vs raw query-status round trip',
  async run(ctx) {
    const perBlock = ctx.quick ? 40 : 100
    const blocks = Math.max(2, ctx.reps)
    let bd: BenchDaemon | undefined
    let raw: RawVm | undefined
    const agent = new Agent({ keepAlive: true, maxSockets: 1 })
    let tcpApp: Awaited<ReturnType<BenchDaemon['daemon']['app']>> | undefined
    try {
      bd = await startBenchDaemon(join(ctx.work, 'state'), benchLogger(ctx.logLevel, ctx.logFile))
      await qmpdGuest(bd, 'get')
      raw = await rawGuest(join(ctx.work, 'raw'), 'rawget')
      const alt = new Alternator(bd, 'get', raw)
      const token = 'bench-token-0123456789'
      tcpApp = await bd.daemon.app({ token })
      await tcpApp.listen({ host: '127.0.0.1', port: 0 })
      const port = (tcpApp.server.address() as AddressInfo).port
      await alt.qmpdSide(WARMUP_MS)

      const inject: number[] = []
      const tcp: number[] = []
      const rawStatus: number[] = []
      const rawBlock: number[] = []
      let bodyBytes = 0
      // Warm-up: JIT, fastify's route caches, the keep-alive connection.
      for (let i = 0; i < 50; i++) {
        await bd.app.inject({ method: 'GET', url: '/v1/vms/get' })
        await httpGet(agent, port, '/v1/vms/get', token)
      }
      for (let b = 0; b < blocks; b++) {
        await bothSides(
          b,
          async () => {
            await alt.qmpdSide(200)
            for (let i = 0; i < perBlock; i++) {
              const t0 = performance.now()
              const res = await bd!.app.inject({ method: 'GET', url: '/v1/vms/get' })
              inject.push(performance.now() - t0)
              if (res.statusCode !== 200) throw new Error(`GET: ${res.statusCode} ${res.body}`)
              bodyBytes = res.body.length
            }
            for (let i = 0; i < perBlock; i++) {
              const t0 = performance.now()
              const res = await httpGet(agent, port, '/v1/vms/get', token)
              tcp.push(performance.now() - t0)
              if (res.status !== 200) throw new Error(`GET over TCP: ${res.status} ${res.body}`)
            }
          },
          async () => {
            await alt.rawSide(200)
            if (b === 0) for (let i = 0; i < 50; i++) await raw!.qmp.cmd('query-status')
            for (let i = 0; i < perBlock; i++) {
              const t0 = performance.now()
              await raw!.qmp.cmd('query-status')
              rawStatus.push(performance.now() - t0)
            }
            for (let i = 0; i < perBlock; i++) {
              const t0 = performance.now()
              await raw!.qmp.cmd('query-block')
              rawBlock.push(performance.now() - t0)
            }
          },
        )
      }
      if (ctx.profile) {
        // Not counted: 500 more GETs under the CPU profiler, to see where qmpd's time goes.
        await alt.qmpdSide(200)
        const file = join(ctx.work, 'get.cpuprofile')
        const p = await profiled(file, async () => {
          for (let i = 0; i < 500; i++) await bd!.app.inject({ method: 'GET', url: '/v1/vms/get' })
        })
        ctx.log(`profile ${file}; top self time over 500 GETs:\n${p.top.map((t) => `      ${t.selfMs.toFixed(1).padStart(7)} ms  ${t.frame}`).join('\n')}`)
      }
      const baseline = { name: 'raw QMP query-status', stats: summarize(rawStatus) }
      const qb = summarize(rawBlock)
      const rows: Row[] = [
        compare(
          {
            case: 'get',
            metric: 'GET /v1/vms/{vm}, in-process inject',
            unit: 'ms',
            qmpd: { name: 'qmpd inject', stats: summarize(inject) },
            baseline,
            extra: { rawQueryBlockMedianMs: qb.median, responseBytes: bodyBytes },
            note: `qmpd's GET runs query-block (raw query-block median ${qb.median.toFixed(2)} ms); the target compares with query-status`,
          },
          { maxAbs: 2, maxRatio: 5 },
        ),
        compare(
          {
            case: 'get',
            metric: 'GET /v1/vms/{vm}, loopback TCP keep-alive + bearer token',
            unit: 'ms',
            qmpd: { name: 'qmpd node:http', stats: summarize(tcp) },
            baseline,
            extra: { rawQueryBlockMedianMs: qb.median },
          },
          { maxAbs: 2, maxRatio: 5 },
        ),
      ]
      return rows
    } finally {
      agent.destroy()
      await tcpApp?.close().catch(() => {})
      await raw?.quit()
      await bd?.close()
    }
  },
}
