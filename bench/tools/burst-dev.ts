// Development aid (not part of npm run bench): 50 paused VMs, repeated bursts of 50 concurrent
// external snapshots through inject; per burst: event-loop delay, CPU, and how long the main
// thread waited for a CPU (/proc schedstat). Starts in ~5 s, so a change can be tried in seconds.
//   node --import tsx bench/tools/burst-dev.ts [bursts] [--profile] [--trace] [--nice] [--nockpt]
//   --profile: CPU profile of the last burst (/tmp/burst.cpuprofile), top self-time frames printed
//   --trace: callbacks longer than 8 ms and GC pauses longer than 3 ms during the bursts
//   --nice: the main thread at nice -10;  --nockpt: SQLite's WAL auto-checkpoint off
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { createHook } from 'node:async_hooks'
import { monitorEventLoopDelay, PerformanceObserver } from 'node:perf_hooks'

// Long callbacks (macrotasks) and GC pauses during the bursts.
const types = new Map<number, string>()
const starts = new Map<number, number>()
const long: Array<[string, number]> = []
let tracing = false
if (process.argv.includes('--trace')) {
  createHook({
    init(id, type) {
      if (type !== 'PROMISE') types.set(id, type)
    },
    before(id) {
      if (tracing && types.has(id)) starts.set(id, performance.now())
    },
    after(id) {
      const t = starts.get(id)
      if (t !== undefined) {
        starts.delete(id)
        const ms = performance.now() - t
        if (ms > 8) long.push([types.get(id)!, ms])
      }
    },
    destroy(id) {
      types.delete(id)
    },
  }).enable()
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) if (tracing && e.duration > 3) long.push([`gc kind ${(e as any).detail?.kind}`, e.duration])
  }).observe({ entryTypes: ['gc'] })
}
import { bootDisk } from '../lib/images.ts'
import { profiled } from '../lib/profile.ts'
import { benchLogger, startBenchDaemon, vmDir } from '../lib/qmpd.ts'
import { killAllSync } from '../lib/reaper.ts'

const VMS = 50
const bursts = Number(process.argv[2] ?? 3)
const work = mkdtempSync('/var/tmp/qb-dev-')
const bd = await startBenchDaemon(join(work, 'state'), benchLogger('silent', undefined))
try {
  const vms = Array.from({ length: VMS }, (_, i) => `f${String(i).padStart(2, '0')}`)
  for (let i = 0; i < vms.length; i += 5) {
    await Promise.all(
      vms.slice(i, i + 5).map(async (vm) => {
        const file = join(vmDir(bd, vm), 'vda.qcow2')
        mkdirSync(vmDir(bd, vm), { recursive: true })
        await bootDisk(file, 16, 0)
        const res = await bd.api('POST', '/v1/vms', { name: vm, memoryMiB: 16, disks: [{ id: 'vda', file, format: 'qcow2' }] })
        if (res.status !== 201) throw new Error(JSON.stringify(res.body))
        await bd.op(`/v1/vms/${vm}/start`, { paused: true })
      }),
    )
  }
  if (process.argv.includes('--nice')) (await import('node:os')).setPriority(process.pid, -10)
  if (process.argv.includes('--nockpt')) bd.daemon.db.pragma('wal_autocheckpoint = 0')
  for (let b = 0; b < bursts; b++) {
    await new Promise((r) => setTimeout(r, 300))
    const eld = monitorEventLoopDelay({ resolution: 1 })
    eld.enable()
    tracing = true
    long.length = 0
    const cpu0 = process.cpuUsage()
    const ss0 = readFileSync(`/proc/${process.pid}/task/${process.pid}/schedstat`, 'utf8').split(' ').map(Number)
    const t0 = performance.now()
    const run = () =>
      Promise.all(
        vms.map(async (vm) => {
          const res = await bd.app.inject({
            method: 'POST',
            url: `/v1/vms/${vm}/snapshots?wait=true`,
            headers: { 'content-type': 'application/json' },
            payload: JSON.stringify({ name: `s${b}`, kind: 'external', memory: false }),
          })
          if (res.statusCode !== 200) throw new Error(res.body)
        }),
      )
    if (process.argv.includes('--profile') && b === bursts - 1) {
      const p = await profiled('/tmp/burst.cpuprofile', run, 100)
      console.log(`longest busy ${p.longestTaskMs} ms`)
      for (const t of p.top) console.log(`  ${t.selfMs.toFixed(1).padStart(7)}  ${t.frame}`)
    } else await run()
    const wall = performance.now() - t0
    const cpu = process.cpuUsage(cpu0)
    const ss1 = readFileSync(`/proc/${process.pid}/task/${process.pid}/schedstat`, 'utf8').split(' ').map(Number)
    console.log(`   main thread: ran ${((ss1[0]! - ss0[0]!) / 1e6).toFixed(0)} ms, waited on the run queue ${((ss1[1]! - ss0[1]!) / 1e6).toFixed(0)} ms, slices ${ss1[2]! - ss0[2]!}`)
    eld.disable()
    tracing = false
    if (long.length) console.log('   long: ' + long.map(([t, ms]) => `${t} ${ms.toFixed(1)}`).join(', '))
    ;(globalThis as any).gc?.()
    console.log(`   heap used after GC ${(process.memoryUsage().heapUsed / 1e6).toFixed(1)} MB, rss ${(process.memoryUsage().rss / 1e6).toFixed(0)} MB`)
    console.log(`burst ${b}: wall ${wall.toFixed(0)} ms, cpu ${((cpu.user + cpu.system) / 1000).toFixed(0)} ms (user ${(cpu.user / 1000).toFixed(0)}), ELD p50 ${(eld.percentile(50) / 1e6).toFixed(1)} p99 ${(eld.percentile(99) / 1e6).toFixed(1)} max ${(eld.max / 1e6).toFixed(1)} ms, samples ${eld.count}`)
  }
} finally {
  await bd.close()
  killAllSync()
  rmSync(work, { recursive: true, force: true })
}
