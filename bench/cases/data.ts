// Data movement on the second disk (vdb) of a running standard guest: active commit with pivot,
// pull (block-stream) and copy (blockdev-mirror + pivot). qmpd (POST …/disks/vdb/commit|pull|copy
// ?wait=true) vs the same QEMU job over raw QMP (job-id, auto-finalize/dismiss off, job-complete
// when ready, job-finalize, job-dismiss), beside `dd conv=fsync` and `qemu-img convert` of the same
// amount of data. Every repetition gets fresh images (qemu-io write -P) and a fresh QEMU per side.
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { bothSides, compare, type Case, type CaseContext, type Row } from '../lib/case.ts'
import { GUEST, rawGuest, sleep } from '../lib/guestvm.ts'
import { bootDisk, convert, ddFsync, fill, qcow2, run } from '../lib/images.ts'
import { benchLogger, startBenchDaemon, vmDir, type BenchDaemon } from '../lib/qmpd.ts'
import { rawJob, rmrf, type RawVm } from '../lib/raw.ts'
import { summarize } from '../lib/stats.ts'

type Op = 'commit' | 'pull' | 'copy'

/**
 * Images that stay the same across repetitions (in `dir`): the boot disk, and the data the
 * operation reads but never writes (pull: the filled base; copy: the filled source).
 */
async function prepareShared(dir: string, op: Op, mib: number): Promise<void> {
  mkdirSync(dir, { recursive: true })
  await bootDisk(join(dir, 'vda.qcow2'), GUEST.diskMiB, GUEST.stampMiB)
  if (op === 'pull') {
    await qcow2(join(dir, 'vdb-base.qcow2'), GUEST.diskMiB)
    await fill(join(dir, 'vdb-base.qcow2'), 0, mib)
  } else if (op === 'copy') {
    await qcow2(join(dir, 'vdb.qcow2'), GUEST.diskMiB)
    await fill(join(dir, 'vdb.qcow2'), 0, mib)
  }
}

/**
 * The guest's disks for one repetition: commit gets a fresh empty base and a top filled with `mib`
 * MiB in `repDir`; pull a fresh empty top on the shared base; copy runs on the shared source (a
 * mirror only reads it).
 */
async function prepareRep(shared: string, repDir: string, op: Op, mib: number): Promise<Array<{ id: string; file: string }>> {
  mkdirSync(repDir, { recursive: true })
  let vdb: string
  if (op === 'copy') {
    vdb = join(shared, 'vdb.qcow2')
  } else if (op === 'pull') {
    vdb = join(repDir, 'vdb-top.qcow2')
    await qcow2(vdb, GUEST.diskMiB, join(shared, 'vdb-base.qcow2'))
  } else {
    const base = join(repDir, 'vdb-base.qcow2')
    vdb = join(repDir, 'vdb-top.qcow2')
    await qcow2(base, GUEST.diskMiB)
    await qcow2(vdb, GUEST.diskMiB, base)
    await fill(vdb, 0, mib)
  }
  return [
    { id: 'vda', file: join(shared, 'vda.qcow2') },
    { id: 'vdb', file: vdb },
  ]
}

/** The raw QMP job for one operation on vdb (top node vdb-f0 as buildArgv names it). */
async function rawOp(raw: RawVm, op: Op, dir: string): Promise<number> {
  const { qmp } = raw
  const id = `bench-${op}`
  if (op === 'commit') {
    // The base node's generated name is looked up before the clock starts (a script knows its graph).
    const nodes = (await qmp.cmd('query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string; drv: string; file: string }>
    const base = nodes.find((n) => n.drv === 'qcow2' && n.file.endsWith('vdb-base.qcow2'))
    if (!base) throw new Error('raw: no node for vdb-base.qcow2')
    const t0 = performance.now()
    // Active commit: READY, then job-complete pivots to the base.
    await rawJob(
      qmp,
      id,
      () => qmp.cmd('block-commit', { 'job-id': id, device: 'vdb-f0', 'top-node': 'vdb-f0', 'base-node': base['node-name'], 'auto-finalize': false, 'auto-dismiss': false }),
      { finalize: true },
    )
    return performance.now() - t0
  }
  if (op === 'pull') {
    const t0 = performance.now()
    await rawJob(qmp, id, () => qmp.cmd('block-stream', { 'job-id': id, device: 'vdb-f0', 'auto-finalize': false, 'auto-dismiss': false }), { finalize: true })
    return performance.now() - t0
  }
  const dest = join(dir, 'vdb-copy.qcow2')
  const t0 = performance.now()
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', dest, String(GUEST.diskMiB * 1024 * 1024)])
  await qmp.cmd('blockdev-add', { driver: 'qcow2', 'node-name': 'vdb-copy', file: { driver: 'file', filename: dest }, backing: null })
  // READY = synchronized; job-complete pivots the device to the copy.
  await rawJob(
    qmp,
    id,
    () => qmp.cmd('blockdev-mirror', { 'job-id': id, device: 'vdb-f0', target: 'vdb-copy', sync: 'full', 'auto-finalize': false, 'auto-dismiss': false }),
    { finalize: true },
  )
  return performance.now() - t0
}

function dataCase(name: string, op: Op, mib: number, targeted: boolean): Case {
  const what = { commit: `active commit of ${mib} MiB + pivot`, pull: `pull (block-stream) of ${mib} MiB`, copy: `copy (blockdev-mirror) of ${mib} MiB + pivot` }[op]
  return {
    name,
    title: what,
    async run(ctx: CaseContext): Promise<Row[]> {
      let bd: BenchDaemon | undefined
      let raw: RawVm | undefined
      const settle = ctx.quick ? 300 : 500
      try {
        bd = await startBenchDaemon(join(ctx.work, 'state'), benchLogger(ctx.logLevel, ctx.logFile))
        const q: number[] = []
        const r: number[] = []
        const dd: number[] = []
        const cv: number[] = []
        const src = join(ctx.work, 'convert-src.qcow2')
        await qcow2(src, GUEST.diskMiB)
        await fill(src, 0, mib)
        const qShared = join(bd.stateDir, 'shared')
        const rShared = join(ctx.work, 'raw-shared')
        await Promise.all([prepareShared(qShared, op, mib), prepareShared(rShared, op, mib)])
        for (let i = 0; i < ctx.reps; i++) {
          const vm = `${op}${i}`
          const rdir = join(ctx.work, `raw${i}`)
          // Both sides' images are made before either guest runs (nothing is measured meanwhile).
          const [disks, rdisks] = await Promise.all([prepareRep(qShared, vmDir(bd, vm), op, mib), prepareRep(rShared, join(rdir, 'disks'), op, mib)])

          await bothSides(
            i,
            async () => {
              // qmpd side: a VM defined on the fresh images, started through qmpd.
              const def = await bd!.api('POST', '/v1/vms', { name: vm, memoryMiB: GUEST.memoryMiB, disks: disks.map((d) => ({ id: d.id, file: d.file, format: 'qcow2' })) })
              if (def.status !== 201) throw new Error(`define ${vm}: ${def.status} ${JSON.stringify(def.body)}`)
              await bd!.op(`/v1/vms/${vm}/start`)
              await sleep(settle)
              const body = op === 'copy' ? { dest: 'vdb-copy.qcow2', format: 'qcow2', pivot: true } : {}
              const t0 = performance.now()
              const job = await bd!.op(`/v1/vms/${vm}/disks/vdb/${op}`, body)
              q.push(performance.now() - t0)
              if (op !== 'pull' && job.result.pivoted !== true) throw new Error(`${op} did not pivot: ${JSON.stringify(job.result)}`)
              await bd!.op(`/v1/vms/${vm}/stop`, { force: true })
              const del = await bd!.api('DELETE', `/v1/vms/${vm}`)
              if (del.status !== 204) throw new Error(`delete ${vm}: ${del.status}`)
              await rmrf(vmDir(bd!, vm))
            },
            async () => {
              // raw side: the same images, a QEMU with the same argv.
              raw = await rawGuest(rdir, `raw${vm}`, rdisks)
              await sleep(settle)
              r.push(await rawOp(raw, op, join(rdir, 'disks')))
              await raw.quit()
              raw = undefined
              await rmrf(rdir)
            },
          )

          dd.push(await ddFsync(join(ctx.work, 'dd.bin'), mib))
          cv.push(await convert(src, join(ctx.work, 'convert-dst.qcow2')))
          ctx.log(`rep ${i}: qmpd ${q[i]!.toFixed(0)} ms, raw ${r[i]!.toFixed(0)} ms, dd ${dd[i]!.toFixed(0)} ms, convert ${cv[i]!.toFixed(0)} ms`)
        }
        const qs = summarize(q)
        const rs = summarize(r)
        const mibps = (ms: number): number => mib / (ms / 1000)
        const ddS = summarize(dd)
        const cvS = summarize(cv)
        return [
          compare(
            {
              case: name,
              metric: what,
              unit: 'ms',
              qmpd: { name: `qmpd POST ${op} ?wait=true`, stats: qs },
              baseline: { name: `raw QMP ${op === 'commit' ? 'block-commit' : op === 'pull' ? 'block-stream' : 'qemu-img create + blockdev-add + blockdev-mirror'}`, stats: rs },
              extra: {
                mib,
                qmpdMiBps: mibps(qs.median),
                rawMiBps: mibps(rs.median),
                ddMiBps: mibps(ddS.median),
                convertMiBps: mibps(cvS.median),
                ddMedianMs: ddS.median,
                convertMedianMs: cvS.median,
              },
              ...(targeted ? {} : { note: 'throughput row (no target)' }),
            },
            targeted ? { maxRatio: 1.15 } : {},
          ),
        ]
      } finally {
        await raw?.quit()
        await bd?.close()
      }
    },
  }
}

/** The data-movement cases: targeted sizes from the issue, plus 256 MiB commit and pull for throughput. */
export const dataCases: Case[] = [
  dataCase('commit', 'commit', 128, true),
  dataCase('pull', 'pull', 128, true),
  dataCase('copy', 'copy', 256, true),
  dataCase('commit256', 'commit', 256, false),
  dataCase('pull256', 'pull', 256, false),
]
