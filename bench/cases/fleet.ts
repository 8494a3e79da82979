// 50 VMs: each takes an external disk snapshot at once (50 concurrent requests), and the daemon
// sits idle with all 50 attached. The daemon runs inside the bench process, so RSS and CPU are
// those of the bench process (which hosts nothing else while this case runs). HTTP bursts come
// from a separate client process, and an idle Node.js process measures its own event-loop delay
// during every burst: the floor the host itself imposes at that moment.
import { mkdirSync, readFileSync } from 'node:fs'
import type { AddressInfo } from 'node:net'
import { setPriority } from 'node:os'
import { join } from 'node:path'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { compare, type Case, type Row } from '../lib/case.ts'
import { sleep } from '../lib/guestvm.ts'
import { bootDisk, idleBootDisk } from '../lib/images.ts'
import { profiled } from '../lib/profile.ts'
import { startSidecar, type Sidecar } from '../lib/sidecar.ts'
import { SyncProbe } from '../lib/syncprobe.ts'
import { benchLogger, startBenchDaemon, vmDir, type BenchDaemon } from '../lib/qmpd.ts'
import { summarize, type Stats } from '../lib/stats.ts'

const VMS = 50
const MB = 1e6

interface Sent {
  ms: number
  status: number
  body: string
}

interface Burst {
  latency: Stats
  /** Event-loop delay p99 of each burst (a fresh histogram per burst), daemon and idle process. */
  eldP99: Stats
  floorP99: Stats
  /** CPU time (user + system) the bench process used during the burst. */
  cpuMs: number
  wallMs: number
  failures: string[]
  eldMaxMs: number
  /** The same measurement in an idle Node.js process during the bursts. */
  floorMaxMs: number
  /** Time the daemon's main thread was runnable but waiting for a CPU (/proc schedstat). */
  runQueueWaitMs: number
  /** CPU time the hypervisor took from this machine during the bursts (steal, both CPUs). */
  stealMs: number
  peakRssMB: number
}

/** CPU time (ms, all CPUs) the hypervisor gave to other guests: /proc/stat's steal column. */
function stealMs(): number {
  const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/)
  return (Number(f[8] ?? 0) * 1000) / 100 // USER_HZ is 100 on Linux
}

/** Nanoseconds the main thread has run and waited on the run queue so far. */
function schedstat(): [number, number] {
  const f = readFileSync(`/proc/${process.pid}/task/${process.pid}/schedstat`, 'utf8').split(' ').map(Number)
  return [f[0] ?? 0, f[1] ?? 0]
}

/**
 * Fires one snapshot request per VM at once, `rounds` times (a new snapshot name each round), and
 * measures latencies, the event-loop delay of each round (in the daemon and in the idle floor
 * process; a fresh histogram per round, since one re-enabled after a pause counts the pause) and RSS.
 */
async function burst(vms: string[], send: (vms: string[], round: number) => Promise<Sent[]>, floor: Sidecar, rounds: number): Promise<Burst> {
  const p99s: number[] = []
  const floorP99s: number[] = []
  let eldMax = 0
  let floorMax = 0
  let peakRss = process.memoryUsage().rss
  const sampler = setInterval(() => {
    peakRss = Math.max(peakRss, process.memoryUsage().rss)
  }, 20)
  const sent: Sent[] = []
  const failures: string[] = []
  let wallMs = 0
  let cpuMs = 0
  let waitNs = 0
  let steal = 0
  for (let round = 0; round < rounds; round++) {
    if (round > 0) await sleep(300)
    await floor.ask({ cmd: 'eld-start' })
    const eld = monitorEventLoopDelay({ resolution: 1 })
    eld.enable()
    const ss0 = schedstat()
    const st0 = stealMs()
    const cpu0 = process.cpuUsage()
    const t0 = performance.now()
    const out = await send(vms, round)
    steal += stealMs() - st0
    wallMs += performance.now() - t0
    const cpu = process.cpuUsage(cpu0)
    waitNs += schedstat()[1] - ss0[1]
    eld.disable()
    const fl = await floor.ask<{ p99: number; max: number }>({ cmd: 'eld-stop' })
    p99s.push(eld.percentile(99) / 1e6)
    eldMax = Math.max(eldMax, eld.max / 1e6)
    floorP99s.push(fl.p99)
    floorMax = Math.max(floorMax, fl.max)
    cpuMs += (cpu.user + cpu.system) / 1000
    sent.push(...out)
    out.forEach((r, i) => r.status === 200 || failures.push(`${vms[i]} (round ${round + 1}): ${r.status} ${r.body}`))
  }
  clearInterval(sampler)
  peakRss = Math.max(peakRss, process.memoryUsage().rss)
  return {
    latency: summarize(sent.map((r) => r.ms)),
    cpuMs,
    wallMs,
    failures,
    eldP99: summarize(p99s),
    floorP99: summarize(floorP99s),
    eldMaxMs: eldMax,
    floorMaxMs: floorMax,
    runQueueWaitMs: waitNs / 1e6,
    stealMs: steal,
    peakRssMB: peakRss / MB,
  }
}

export const fleetCase: Case = {
  name: 'burst50',
  provides: ['idle50'],
  title: '50 VMs: concurrent external snapshots, then idle',
  async run(ctx) {
    let bd: BenchDaemon | undefined
    let tcpApp: Awaited<ReturnType<BenchDaemon['daemon']['app']>> | undefined
    const floor = startSidecar()
    const client = startSidecar()
    try {
      bd = await startBenchDaemon(join(ctx.work, 'state'), benchLogger(ctx.logLevel, ctx.logFile))
      const d = bd
      const names = (prefix: string) => Array.from({ length: VMS }, (_, i) => `${prefix}${String(i).padStart(2, '0')}`)
      const all = (vms: string[], action: 'pause' | 'resume'): Promise<unknown> => Promise.all(vms.map((vm) => d.op(`/v1/vms/${vm}/${action}`)))
      /** Defines and starts 50 VMs (paused, five at a time: fifty spinning guests would slow every later start), then resumes them. */
      const fleet = async (prefix: string, guest: 'idle' | 'spinning'): Promise<string[]> => {
        const vms = names(prefix)
        const t0 = performance.now()
        for (let i = 0; i < vms.length; i += 5) {
          await Promise.all(
            vms.slice(i, i + 5).map(async (vm) => {
              const file = join(vmDir(d, vm), 'vda.qcow2')
              mkdirSync(vmDir(d, vm), { recursive: true })
              if (guest === 'idle') await idleBootDisk(file, 16)
              else await bootDisk(file, 16, 0)
              const res = await d.api('POST', '/v1/vms', { name: vm, memoryMiB: 16, disks: [{ id: 'vda', file, format: 'qcow2' }] })
              if (res.status !== 201) throw new Error(`define ${vm}: ${res.status} ${JSON.stringify(res.body)}`)
              await d.op(`/v1/vms/${vm}/start`, { paused: true })
            }),
          )
        }
        await all(vms, 'resume')
        ctx.log(`${VMS} ${guest} guests running after ${((performance.now() - t0) / 1000).toFixed(1)} s`)
        await sleep(1000)
        return vms
      }
      const rows: Row[] = []
      const rssBefore = process.memoryUsage().rss / MB
      const runs: Array<[string, Burst, unknown]> = []
      const probe = ctx.probe ? new SyncProbe() : undefined
      if (probe) {
        probe.wrapDb(d.daemon.db)
        probe.wrapFs()
      }
      let port = 0
      if (ctx.selected.has('burst50')) {
        tcpApp = await d.daemon.app()
        await tcpApp.listen({ host: '127.0.0.1', port: 0 })
        port = (tcpApp.server.address() as AddressInfo).port
      }
      const body = (tag: string) => ({ name: tag, kind: 'external', memory: false })
      const path = (vm: string) => `/v1/vms/${vm}/snapshots?wait=true&timeoutSec=600`
      const viaInject = (tag: string) => (vms: string[], round: number) =>
        Promise.all(
          vms.map(async (vm): Promise<Sent> => {
            const s = performance.now()
            const res = await d.app.inject({ method: 'POST', url: path(vm), headers: { 'content-type': 'application/json' }, payload: JSON.stringify(body(`${tag}r${round}`)) })
            return { ms: performance.now() - s, status: res.statusCode, body: res.statusCode === 200 ? '' : res.body.slice(0, 300) }
          }),
        )
      const viaClient = (tag: string) => async (vms: string[], round: number) =>
        (await client.ask<{ results: Sent[] }>({ cmd: 'burst', port, requests: vms.map((vm) => ({ path: path(vm), body: body(`${tag}r${round}`) })) })).results
      // Bursts per variant, measured as one: a single burst's ~100 event-loop samples make its
      // p99 little more than its maximum.
      const rounds = ctx.quick ? 1 : 3
      const one = async (label: string, vms: string[], send: (vms: string[], round: number) => Promise<Sent[]>): Promise<void> => {
        await sleep(500)
        let b: Burst
        if (probe) {
          probe.acc.clear()
          probe.on = true
        }
        if (ctx.profile) {
          const file = join(ctx.work, `burst-${runs.length + 1}.cpuprofile`)
          const p = await profiled(file, () => burst(vms, send, floor, rounds))
          b = p.value
          ctx.log(`${label}: profile ${file}; longest busy stretch ${p.longestTaskMs} ms; top self time:\n${p.top.map((t) => `      ${t.selfMs.toFixed(1).padStart(7)} ms  ${t.frame}`).join('\n')}`)
        } else {
          b = await burst(vms, send, floor, rounds)
        }
        let diag: unknown
        if (probe) {
          probe.on = false
          diag = probe.toJSON()
          ctx.log(`${label}: synchronous calls during the burst:\n${probe.report().map((l) => `      ${l}`).join('\n')}`)
        }
        runs.push([label, b, diag])
        ctx.log(
          `${label}: wall ${b.wallMs.toFixed(0)} ms, p99 ${b.latency.p99.toFixed(0)} ms, ELD p99 per burst, median ${b.eldP99.median.toFixed(1)} ms (max ${b.eldMaxMs.toFixed(0)}; idle process ${b.floorP99.median.toFixed(1)} / ${b.floorMaxMs.toFixed(0)}), run-queue wait ${b.runQueueWaitMs.toFixed(0)} ms, steal ${b.stealMs.toFixed(0)} ms, CPU ${b.cpuMs.toFixed(0)} ms, peak RSS ${b.peakRssMB.toFixed(0)} MB, failures ${b.failures.length}`,
        )
      }

      // Phase 1: fifty running guests that idle (HLT), as on a host of mostly idle VMs.
      const idle = await fleet('i', 'idle')
      if (ctx.selected.has('burst50')) {
        await one('guests running, idle, in-process inject', idle, viaInject('b1'))
        await one('guests running, idle, HTTP from a client process', idle, viaClient('b2'))
        await all(idle, 'pause')
        await one('guests paused, in-process inject', idle, viaInject('b3'))
        await one('guests paused, HTTP from a client process', idle, viaClient('b4'))
        await all(idle, 'resume')
      }
      if (ctx.selected.has('idle50')) {
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
          metric: `daemon idle with ${VMS} running VMs attached: CPU over ${(wall / 1000).toFixed(0)} s (process.cpuUsage of the bench process)`,
          unit: '% of a core',
          qmpd: { name: 'CPU', stats: summarize([pct]) },
          target: '< 1% of a core',
          pass: pct < 1,
          extra: { rssMB: rss, userMs: cpu.user / 1000, systemMs: cpu.system / 1000 },
          note: `RSS ${rss.toFixed(0)} MB`,
        })
      }

      if (ctx.selected.has('burst50')) {
        // Phase 2: fifty guests spinning a vCPU each (the test guest's counting loop) on two cores:
        // 25 runnable vCPUs per core compete with the daemon. The idle-process floor shows what the
        // host's scheduler and filesystem alone impose then.
        await Promise.all(idle.map((vm) => d.op(`/v1/vms/${vm}/stop`, { force: true })))
        const spinning = await fleet('s', 'spinning')
        await one('guests spinning, in-process inject', spinning, viaInject('b5'))
        await one('guests spinning, HTTP from a client process', spinning, viaClient('b6'))
        // Control: the daemon's event-loop thread at nice -10 (setpriority on the main thread
        // only; the QEMUs and the floor process keep nice 0), like a host that gives its
        // management daemon priority over guest vCPUs (libvirt's machine.slice does it with cgroup weights).
        let reniced = false
        try {
          setPriority(process.pid, -10)
          reniced = true
        } catch (err) {
          ctx.log(`cannot raise the daemon's priority (${(err as Error).message}); skipping the nice -10 control`)
        }
        if (reniced) {
          try {
            await one('guests spinning, daemon thread nice -10, in-process inject', spinning, viaInject('b7'))
          } finally {
            setPriority(process.pid, 0)
          }
        }
      }
      probe?.restore()
      for (const [label, b, diag] of runs) {
        const base = { case: 'burst50', unit: 'ms' as const }
        rows.push({
          ...base,
          metric: `50 concurrent external disk snapshots (${label}), ${rounds} bursts: all succeed; latency`,
          target: 'every request succeeds',
          pass: b.failures.length === 0,
          qmpd: { name: 'latency per request', stats: b.latency },
          extra: { ok: VMS * rounds - b.failures.length, wallMs: b.wallMs, p99Ms: b.latency.p99, cpuMs: b.cpuMs },
          note: b.failures.length
            ? `failures: ${b.failures.slice(0, 3).join('; ')}`
            : `p99 ${b.latency.p99.toFixed(0)} ms; wall of the ${rounds} bursts ${b.wallMs.toFixed(0)} ms; bench-process CPU during them ${b.cpuMs.toFixed(0)} ms (${(b.cpuMs / (VMS * rounds)).toFixed(1)} ms per snapshot)`,
        })
        rows.push(
          compare(
            {
              ...base,
              metric: `50 concurrent snapshots (${label}): event-loop delay p99 of each burst`,
              qmpd: { name: 'monitorEventLoopDelay p99 per burst', stats: b.eldP99 },
              baseline: { name: 'idle Node.js process, same bursts (floor)', stats: b.floorP99 },
              extra: { eldMaxMs: b.eldMaxMs, floorMaxMs: b.floorMaxMs, runQueueWaitMs: b.runQueueWaitMs, stealMs: b.stealMs, cpuMs: b.cpuMs, wallMs: b.wallMs },
              note: `max ${b.eldMaxMs.toFixed(0)} ms (idle process: ${b.floorMaxMs.toFixed(0)} ms); the daemon's thread waited ${b.runQueueWaitMs.toFixed(0)} ms for a CPU during the ${b.wallMs.toFixed(0)} ms of bursts; the hypervisor took ${b.stealMs.toFixed(0)} ms of CPU from this machine (steal)`,
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
      return rows
    } finally {
      await floor.close().catch(() => {})
      await client.close().catch(() => {})
      await tcpApp?.close().catch(() => {})
      if (bd) {
        // Stopping the VMs one job each through the API: force quit each.
        ctx.log('stopping the VMs')
        await bd.close()
      }
    }
  },
}
