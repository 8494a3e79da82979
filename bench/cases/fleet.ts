// 50 VMs: each takes an external disk snapshot at once (50 concurrent requests), and then the
// daemon sits idle with all 50 attached. The daemon runs inside the bench process, so RSS and CPU
// are those of the bench process (which hosts nothing else while this case runs).
import { mkdirSync } from 'node:fs'
import { Agent, request } from 'node:http'
import type { AddressInfo } from 'node:net'
import { setPriority } from 'node:os'
import { join } from 'node:path'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { compare, type Case, type Row } from '../lib/case.ts'
import { sleep } from '../lib/guestvm.ts'
import { bootDisk } from '../lib/images.ts'
import { profiled } from '../lib/profile.ts'
import { SyncProbe } from '../lib/syncprobe.ts'
import { benchLogger, startBenchDaemon, vmDir, type BenchDaemon } from '../lib/qmpd.ts'
import { summarize, type Stats } from '../lib/stats.ts'

const VMS = 50
const MB = 1e6

function httpPost(agent: Agent, port: number, path: string, body: unknown): Promise<{ status: number; body: string }> {
  const payload = JSON.stringify(body)
  return new Promise((resolve, reject) => {
    const req = request(
      { host: '127.0.0.1', port, path, method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } },
      (res) => {
        let text = ''
        res.setEncoding('utf8')
        res.on('data', (c: string) => (text += c))
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }))
        res.on('error', reject)
      },
    )
    req.on('error', reject)
    req.end(payload)
  })
}

interface Burst {
  latency: Stats
  /** CPU time (user + system) the bench process used during the burst. */
  cpuMs: number
  wallMs: number
  failures: string[]
  eldP99Ms: number
  eldMaxMs: number
  peakRssMB: number
}

/** Fires one snapshot request per VM at once and measures latencies, event-loop delay and RSS. */
async function burst(vms: string[], send: (vm: string) => Promise<{ status: number; body: string }>): Promise<Burst> {
  const eld = monitorEventLoopDelay({ resolution: 1 })
  let peakRss = process.memoryUsage().rss
  const sampler = setInterval(() => {
    peakRss = Math.max(peakRss, process.memoryUsage().rss)
  }, 20)
  const failures: string[] = []
  eld.enable()
  const cpu0 = process.cpuUsage()
  const t0 = performance.now()
  const lat = await Promise.all(
    vms.map(async (vm) => {
      const s = performance.now()
      const res = await send(vm)
      const ms = performance.now() - s
      if (res.status !== 200) failures.push(`${vm}: ${res.status} ${res.body.slice(0, 300)}`)
      return ms
    }),
  )
  const wallMs = performance.now() - t0
  const cpu = process.cpuUsage(cpu0)
  eld.disable()
  clearInterval(sampler)
  peakRss = Math.max(peakRss, process.memoryUsage().rss)
  return { latency: summarize(lat), cpuMs: (cpu.user + cpu.system) / 1000, wallMs, failures, eldP99Ms: eld.percentile(99) / 1e6, eldMaxMs: eld.max / 1e6, peakRssMB: peakRss / MB }
}

export const fleetCase: Case = {
  name: 'burst50',
  provides: ['idle50'],
  title: '50 VMs: concurrent external snapshots, then idle',
  async run(ctx) {
    let bd: BenchDaemon | undefined
    const agent = new Agent({ keepAlive: true, maxSockets: VMS })
    let tcpApp: Awaited<ReturnType<BenchDaemon['daemon']['app']>> | undefined
    try {
      bd = await startBenchDaemon(join(ctx.work, 'state'), benchLogger(ctx.logLevel, ctx.logFile))
      const vms = Array.from({ length: VMS }, (_, i) => `f${String(i).padStart(2, '0')}`)
      const tStart = performance.now()
      // Started paused, five at a time (fifty guests spinning under TCG on two cores would slow
      // every later start down), then resumed all together.
      for (let i = 0; i < vms.length; i += 5) {
        await Promise.all(
          vms.slice(i, i + 5).map(async (vm) => {
            const file = join(vmDir(bd!, vm), 'vda.qcow2')
            mkdirSync(vmDir(bd!, vm), { recursive: true })
            await bootDisk(file, 16, 0)
            const res = await bd!.api('POST', '/v1/vms', { name: vm, memoryMiB: 16, disks: [{ id: 'vda', file, format: 'qcow2' }] })
            if (res.status !== 201) throw new Error(`define ${vm}: ${res.status} ${JSON.stringify(res.body)}`)
            await bd!.op(`/v1/vms/${vm}/start`, { paused: true })
          }),
        )
      }
      const all = (action: 'pause' | 'resume'): Promise<unknown> => Promise.all(vms.map((vm) => bd!.op(`/v1/vms/${vm}/${action}`)))
      await all('resume')
      ctx.log(`${VMS} VMs running after ${((performance.now() - tStart) / 1000).toFixed(1)} s`)
      await sleep(1000)
      const rows: Row[] = []
      const rssBefore = process.memoryUsage().rss / MB

      if (ctx.selected.has('burst50')) {
        tcpApp = await bd.daemon.app()
        await tcpApp.listen({ host: '127.0.0.1', port: 0 })
        const port = (tcpApp.server.address() as AddressInfo).port
        const viaInject = (tag: string) => async (vm: string) => {
          const res = await bd!.app.inject({
            method: 'POST',
            url: `/v1/vms/${vm}/snapshots?wait=true&timeoutSec=600`,
            headers: { 'content-type': 'application/json' },
            payload: JSON.stringify({ name: tag, kind: 'external', memory: false }),
          })
          return { status: res.statusCode, body: res.body }
        }
        const viaTcp = (tag: string) => (vm: string) => httpPost(agent, port, `/v1/vms/${vm}/snapshots?wait=true&timeoutSec=600`, { name: tag, kind: 'external', memory: false })
        const runs: Array<[string, Burst, unknown]> = []
        const probe = ctx.probe ? new SyncProbe() : undefined
        if (probe) {
          probe.wrapDb(bd.daemon.db)
          probe.wrapFs()
        }
        const one = async (label: string, send: (vm: string) => Promise<{ status: number; body: string }>): Promise<void> => {
          await sleep(500)
          let b: Burst
          if (probe) {
            probe.acc.clear()
            probe.on = true
          }
          if (ctx.profile) {
            const file = join(ctx.work, `burst-${runs.length + 1}.cpuprofile`)
            const p = await profiled(file, () => burst(vms, send))
            b = p.value
            ctx.log(`${label}: profile ${file}; longest busy stretch ${p.longestTaskMs} ms; top self time:\n${p.top.map((t) => `      ${t.selfMs.toFixed(1).padStart(7)} ms  ${t.frame}`).join('\n')}`)
          } else {
            b = await burst(vms, send)
          }
          let diag: unknown
          if (probe) {
            probe.on = false
            diag = probe.toJSON()
            ctx.log(`${label}: synchronous calls during the burst:\n${probe.report().map((l) => `      ${l}`).join('\n')}`)
          }
          runs.push([label, b, diag])
          ctx.log(
            `${label}: wall ${b.wallMs.toFixed(0)} ms, p99 ${b.latency.p99.toFixed(0)} ms, ELD p99 ${b.eldP99Ms.toFixed(1)} ms (max ${b.eldMaxMs.toFixed(0)}), CPU ${b.cpuMs.toFixed(0)} ms, peak RSS ${b.peakRssMB.toFixed(0)} MB, failures ${b.failures.length}`,
          )
        }
        await one('guests running, in-process inject', viaInject('b1'))
        await one('guests running, loopback TCP', viaTcp('b2'))
        // Control: the same bursts with every guest paused, so that 50 spinning TCG vCPUs do not
        // compete with the daemon for the two cores; the difference is CPU starvation, not qmpd.
        await all('pause')
        await one('guests paused, in-process inject', viaInject('b3'))
        await one('guests paused, loopback TCP', viaTcp('b4'))
        await all('resume')
        // Control: guests running, but the daemon's event-loop thread at nice -10 (setpriority on
        // the main thread only; the QEMUs keep nice 0), like a host that gives its management
        // daemon priority over guest vCPUs (libvirt's machine.slice does it with cgroup weights).
        let reniced = false
        try {
          setPriority(process.pid, -10)
          reniced = true
        } catch (err) {
          ctx.log(`cannot raise the daemon's priority (${(err as Error).message}); skipping the nice -10 control`)
        }
        if (reniced) {
          try {
            await one('guests running, daemon thread nice -10, in-process inject', viaInject('b5'))
          } finally {
            setPriority(process.pid, 0)
          }
        }
        probe?.restore()
        for (const [label, b, diag] of runs) {
          const base = { case: 'burst50', unit: 'ms' as const }
          rows.push({
            ...base,
            metric: `50 concurrent external disk snapshots (${label}): all succeed; latency`,
            target: 'all 50 succeed',
            pass: b.failures.length === 0,
            qmpd: { name: 'latency per request', stats: b.latency },
            extra: { ok: VMS - b.failures.length, wallMs: b.wallMs, p99Ms: b.latency.p99, cpuMs: b.cpuMs },
            note: b.failures.length
              ? `failures: ${b.failures.slice(0, 3).join('; ')}`
              : `p99 ${b.latency.p99.toFixed(0)} ms; burst wall ${b.wallMs.toFixed(0)} ms; bench-process CPU during the burst ${b.cpuMs.toFixed(0)} ms`,
          })
          rows.push(
            compare(
              {
                ...base,
                metric: `50 concurrent snapshots (${label}): event-loop delay p99`,
                qmpd: { name: 'monitorEventLoopDelay p99', stats: summarize([b.eldP99Ms]) },
                extra: { eldMaxMs: b.eldMaxMs, cpuMs: b.cpuMs, wallMs: b.wallMs },
                ...(diag ? { diagnostics: { syncCalls: diag } } : {}),
              },
              { maxAbs: 20 },
            ),
          )
          rows.push(
            compare(
              {
                ...base,
                unit: 'MB',
                metric: `50 concurrent snapshots (${label}): peak RSS (bench process hosting the daemon)`,
                qmpd: { name: 'peak RSS', stats: summarize([b.peakRssMB]) },
                extra: { rssBeforeBurstsMB: rssBefore },
              },
              { maxAbs: 200 },
            ),
          )
        }
      }

      if (ctx.selected.has('idle50')) {
        await tcpApp?.close()
        tcpApp = undefined
        await sleep(1000)
        const windowMs = ctx.quick ? 5000 : 10_000
        const cpu0 = process.cpuUsage()
        const w0 = performance.now()
        await sleep(windowMs)
        const cpu = process.cpuUsage(cpu0)
        const wall = performance.now() - w0
        const pct = ((cpu.user + cpu.system) / 1000 / wall) * 100
        const rss = process.memoryUsage().rss / MB
        ctx.log(`idle: ${pct.toFixed(3)} % of a core over ${(wall / 1000).toFixed(1)} s, RSS ${rss.toFixed(0)} MB`)
        rows.push({
          case: 'idle50',
          metric: `daemon idle with ${VMS} VMs attached: CPU over ${(wall / 1000).toFixed(0)} s (process.cpuUsage of the bench process)`,
          unit: '% of a core',
          qmpd: { name: 'CPU', stats: summarize([pct]) },
          target: '< 1% of a core',
          pass: pct < 1,
          extra: { rssMB: rss, userMs: cpu.user / 1000, systemMs: cpu.system / 1000 },
          note: `RSS ${rss.toFixed(0)} MB`,
        })
      }
      return rows
    } finally {
      agent.destroy()
      await tcpApp?.close().catch(() => {})
      if (bd) {
        // Stopping 50 VMs one job at a time through the API: force quit each.
        ctx.log('stopping the VMs')
        await bd.close()
      }
    }
  },
}
