// The control plane as chains and fleets grow: GET /v1/vms with 100 stopped VMs (beside a stat of
// every file of their chains) and GET /v1/vms/{vm} on a 300-deep running chain (beside raw query-block).
import { mkdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { compare, type Case, type Row } from '../lib/case.ts'
import { bootDisk, qcow2, run } from '../lib/images.ts'
import { benchQemu } from '../lib/qemu-choice.ts'
import { benchLogger, startBenchDaemon, vmDir, type BenchDaemon } from '../lib/qmpd.ts'
import { launchRaw, vmDef, type RawVm } from '../lib/raw.ts'
import { summarize } from '../lib/stats.ts'

async function timedGet(bd: BenchDaemon, url: string, out: number[]): Promise<string> {
  const t0 = performance.now()
  const res = await bd.app.inject({ method: 'GET', url })
  out.push(performance.now() - t0)
  if (res.statusCode !== 200) throw new Error(`GET ${url}: ${res.statusCode} ${res.body.slice(0, 500)}`)
  return res.body
}

/** A chain of `depth` overlays on a 16 MiB boot disk in `dir`; returns the top file. */
async function deepChain(dir: string, depth: number): Promise<string> {
  await mkdir(dir, { recursive: true })
  let file = join(dir, 'l0.qcow2')
  await bootDisk(file, 16, 0)
  for (let i = 1; i <= depth; i++) {
    const next = join(dir, `l${i}.qcow2`)
    // -u with the size given: qemu-img does not open the backing chain (O(depth) per layer otherwise).
    await run(benchQemu().qemuImg, ['create', '-q', '-u', '-f', 'qcow2', '-b', file, '-F', 'qcow2', next, '16M'])
    file = next
  }
  return file
}

export const listStoppedCase: Case = {
  name: 'list100',
  title: 'GET /v1/vms with 100 stopped VMs (2-layer chains), warm',
  async run(ctx) {
    const vms = 100
    let bd: BenchDaemon | undefined
    try {
      bd = await startBenchDaemon(join(ctx.work, 'state'), benchLogger(ctx.logLevel, ctx.logFile))
      const files: string[] = []
      for (let i = 0; i < vms; i++) {
        const name = `s${String(i).padStart(3, '0')}`
        const dir = vmDir(bd, name)
        await mkdir(dir, { recursive: true })
        await qcow2(join(dir, 'base.qcow2'), 16)
        await qcow2(join(dir, 'disk.qcow2'), 16, join(dir, 'base.qcow2'))
        files.push(join(dir, 'disk.qcow2'), join(dir, 'base.qcow2'))
        const res = await bd.api('POST', '/v1/vms', { name, memoryMiB: 16, machine: 'q35', disks: [{ id: 'vda', file: join(dir, 'disk.qcow2'), format: 'qcow2', bus: 'virtio' }] })
        if (res.status !== 201) throw new Error(`define ${name}: ${res.status} ${JSON.stringify(res.body)}`)
      }
      ctx.log(`${vms} stopped VMs defined`)
      const url = `/v1/vms?limit=${vms}`
      const cold: number[] = []
      const first = JSON.parse(await timedGet(bd, url, cold)) as { vms: Array<{ disks: Array<{ chain: unknown[] }> }> }
      if (first.vms.length !== vms || first.vms.some((v) => v.disks[0]?.chain.length !== 2)) throw new Error('the list does not show 100 VMs with 2-layer chains')
      const inspectionsAfterCold = bd.daemon.vms.chainInspections
      const warm: number[] = []
      const statAll: number[] = []
      const page: number[] = []
      const scratch: number[] = []
      for (let i = 0; i < 30; i++) await timedGet(bd, url, scratch) // JIT, fastify caches
      const n = ctx.reps * 20
      for (let i = 0; i < n; i++) {
        await timedGet(bd, url, warm)
        const t0 = performance.now()
        await Promise.all(files.map((f) => stat(f, { bigint: true })))
        statAll.push(performance.now() - t0)
        const t1 = performance.now()
        await bd.daemon.vms.page({ limit: vms })
        page.push(performance.now() - t1)
      }
      const warmInspections = bd.daemon.vms.chainInspections - inspectionsAfterCold
      // What the list cost before the cache: one qemu-img info --backing-chain per disk, in series.
      const info: number[] = []
      for (let i = 0; i < vms; i += 10) {
        const t0 = performance.now()
        await run(benchQemu().qemuImg, ['info', '-U', '--backing-chain', '--output=json', files[i * 2]!])
        info.push(performance.now() - t0)
      }
      const infoMedian = summarize(info).median
      const rows: Row[] = [
        compare(
          {
            case: 'list100',
            metric: 'GET /v1/vms, 100 stopped VMs (2-layer chains), warm, in-process inject',
            unit: 'ms',
            qmpd: { name: 'qmpd GET /v1/vms?limit=100', stats: summarize(warm) },
            baseline: { name: 'fs.stat of the 200 chain files (Promise.all)', stats: summarize(statAll) },
            extra: { viewsOnlyMedianMs: summarize(page).median, firstListMs: cold[0]!, qemuImgInfoPerDiskMs: infoMedian, qemuImgInfoFor100DisksMs: infoMedian * vms, warmQemuImgRuns: warmInspections },
            note: `building the 100 views (VmManager.page, no HTTP) ${summarize(page).median.toFixed(1)} ms of it; first list after the defines (each define already read its chain) ${cold[0]!.toFixed(0)} ms; one qemu-img info --backing-chain ${infoMedian.toFixed(1)} ms (×100 = ${(infoMedian * vms).toFixed(0)} ms, the cost per call before the cache); warm lists ran ${warmInspections} qemu-img`,
          },
          { maxAbs: 20 },
        ),
      ]
      if (warmInspections !== 0) rows[0] = { ...rows[0]!, pass: false, note: `${rows[0]!.note}; a warm list must run none` }
      return rows
    } finally {
      await bd?.close()
    }
  },
}

export const deepChainCase: Case = {
  name: 'deep300',
  title: 'GET /v1/vms/{vm} of a running VM on a 300-deep chain',
  async run(ctx) {
    const depth = ctx.quick ? 100 : 300
    let bd: BenchDaemon | undefined
    let raw: RawVm | undefined
    try {
      bd = await startBenchDaemon(join(ctx.work, 'state'), benchLogger(ctx.logLevel, ctx.logFile))
      const top = await deepChain(vmDir(bd, 'deep'), depth)
      const res = await bd.api('POST', '/v1/vms', { name: 'deep', memoryMiB: 32, machine: 'q35', disks: [{ id: 'vda', file: top, format: 'qcow2', bus: 'virtio' }] })
      if (res.status !== 201) throw new Error(`define deep: ${res.status} ${JSON.stringify(res.body)}`)
      // Both guests stay paused: only the monitor and qmpd work, neither vCPU takes a core.
      await bd.op('/v1/vms/deep/start', { paused: true })
      const rawDir = join(ctx.work, 'raw')
      const rawTop = await deepChain(join(rawDir, 'disks'), depth)
      raw = await launchRaw(join(rawDir, 'run'), vmDef('rawdeep', 32, [{ id: 'vda', file: rawTop }]), [{ id: 'vda', file: rawTop, format: 'qcow2', gen: 0 }])
      ctx.log(`chains of ${depth} overlays built, both QEMUs up`)
      const url = '/v1/vms/deep'
      const view = JSON.parse(await timedGet(bd, url, [])) as { disks: Array<{ chain: unknown[] }> }
      if (view.disks[0]?.chain.length !== depth + 1) throw new Error(`GET shows ${view.disks[0]?.chain.length} layers, want ${depth + 1}`)
      const qmp = bd.daemon.vms.qmp('deep')
      const warm: number[] = []
      const cold: number[] = []
      const rawQb: number[] = []
      const scratch: number[] = []
      for (let i = 0; i < 30; i++) await timedGet(bd, url, scratch)
      const readsBefore = bd.daemon.vms.liveDisks.reads
      const n = ctx.reps * 20
      for (let i = 0; i < n; i++) await timedGet(bd, url, warm)
      const warmReads = bd.daemon.vms.liveDisks.reads - readsBefore
      for (let i = 0; i < n; i++) {
        const t0 = performance.now()
        await raw.qmp.cmd('query-block')
        rawQb.push(performance.now() - t0)
      }
      // The first GET after a change (cache dropped): one query-block and the view built from it.
      for (let i = 0; i < ctx.reps * 2; i++) {
        bd.daemon.vms.liveDisks.invalidate(qmp)
        await timedGet(bd, url, cold)
      }
      const qbMedian = summarize(rawQb).median
      const row = compare(
        {
          case: 'deep300',
          metric: `GET /v1/vms/{vm}, running VM, ${depth}-deep chain, warm, in-process inject`,
          unit: 'ms',
          qmpd: { name: 'qmpd GET /v1/vms/{vm}', stats: summarize(warm) },
          baseline: { name: `raw QMP query-block (${depth}-deep chain)`, stats: summarize(rawQb) },
          extra: { coldGetMedianMs: summarize(cold).median, rawQueryBlockMedianMs: qbMedian, warmQueryBlocks: warmReads, depth },
          note: `the first GET after a graph change runs one query-block: median ${summarize(cold).median.toFixed(1)} ms (raw query-block alone ${qbMedian.toFixed(1)} ms); warm GETs ran ${warmReads} query-block`,
        },
        { maxAbs: 20 },
      )
      return [warmReads !== 0 ? { ...row, pass: false, note: `${row.note}; a warm GET must run none` } : row]
    } finally {
      await raw?.quit()
      await bd?.close()
    }
  },
}
