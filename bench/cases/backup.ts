// Push-mode backup of a 256 MiB disk (vdb, filled) of a running standard guest: a full point, then
// an incremental one after the guest wrote on, through qmpd (POST …/backups ?wait=true), beside
// `qemu-img convert` of the same 256 MiB in the same run. Reports times and the points' sizes.
import { mkdirSync, statSync } from 'node:fs'
import { join } from 'node:path'
import type { Case, CaseContext, Row } from '../lib/case.ts'
import { GUEST, sleep } from '../lib/guestvm.ts'
import { bootDisk, convert, fill, qcow2 } from '../lib/images.ts'
import { benchLogger, startBenchDaemon, vmDir, type BenchDaemon } from '../lib/qmpd.ts'
import { rmrf } from '../lib/raw.ts'
import { summarize } from '../lib/stats.ts'

const MIB = 256

/** The backup case: informational rows (no target), the numbers the closing note asks for. */
export const backupCase: Case = {
  name: 'backup256',
  title: `full and incremental backup of a ${MIB} MiB disk vs qemu-img convert`,
  async run(ctx: CaseContext): Promise<Row[]> {
    let bd: BenchDaemon | undefined
    try {
      bd = await startBenchDaemon(join(ctx.work, 'state'), benchLogger(ctx.logLevel, ctx.logFile))
      const src = join(ctx.work, 'convert-src.qcow2')
      await qcow2(src, MIB)
      await fill(src, 0, MIB)
      const full: number[] = []
      const inc: number[] = []
      const cv: number[] = []
      const fullMB: number[] = []
      const incMB: number[] = []
      for (let i = 0; i < ctx.reps; i++) {
        const vm = `bk${i}`
        const dir = vmDir(bd, vm)
        mkdirSync(join(dir, 'backups'), { recursive: true })
        await bootDisk(join(dir, 'vda.qcow2'), GUEST.diskMiB, GUEST.stampMiB)
        await qcow2(join(dir, 'vdb.qcow2'), MIB)
        await fill(join(dir, 'vdb.qcow2'), 0, MIB)
        const def = await bd.api('POST', '/v1/vms', { name: vm, memoryMiB: GUEST.memoryMiB, disks: [{ id: 'vda', file: join(dir, 'vda.qcow2'), format: 'qcow2' }, { id: 'vdb', file: join(dir, 'vdb.qcow2'), format: 'qcow2' }] })
        if (def.status !== 201) throw new Error(`define ${vm}: ${def.status} ${JSON.stringify(def.body)}`)
        await bd.op(`/v1/vms/${vm}/start`)
        await sleep(ctx.quick ? 300 : 500)
        let t0 = performance.now()
        const f = await bd.op(`/v1/vms/${vm}/backups`, { mode: 'full', dir: 'backups', disks: ['vdb'] })
        full.push(performance.now() - t0)
        if (f.result.point.mode !== 'full') throw new Error(`full backup: ${JSON.stringify(f.result)}`)
        fullMB.push(statSync(f.result.point.disks[0].file).size / 1e6)
        // The guest writes its slot sectors on every disk meanwhile: that is what the incremental copies.
        await sleep(ctx.quick ? 300 : 1000)
        t0 = performance.now()
        const n = await bd.op(`/v1/vms/${vm}/backups`, { mode: 'incremental', dir: 'backups' })
        inc.push(performance.now() - t0)
        if (n.result.point.mode !== 'incremental') throw new Error(`incremental backup ran ${n.result.point.mode}: ${n.result.point.reason}`)
        incMB.push(statSync(n.result.point.disks[0].file).size / 1e6)
        await bd.op(`/v1/vms/${vm}/stop`, { force: true })
        await bd.api('DELETE', `/v1/vms/${vm}`)
        await rmrf(dir)
        cv.push(await convert(src, join(ctx.work, 'convert-dst.qcow2')))
        ctx.log(`rep ${i}: full ${full[i]!.toFixed(0)} ms (${fullMB[i]!.toFixed(1)} MB), incremental ${inc[i]!.toFixed(0)} ms (${incMB[i]!.toFixed(2)} MB), convert ${cv[i]!.toFixed(0)} ms`)
      }
      const cvS = summarize(cv)
      const row = (metric: string, ms: number[], mb: number[]): Row => {
        const s = summarize(ms)
        return {
          case: 'backup256',
          metric,
          unit: 'ms',
          qmpd: { name: `qmpd POST backups ?wait=true`, stats: s },
          baseline: { name: `qemu-img convert of ${MIB} MiB`, stats: cvS },
          ratio: s.median / cvS.median,
          extra: { mib: MIB, fileMB: summarize(mb).median },
          note: 'informational (no target)',
        }
      }
      return [row(`full backup of a ${MIB} MiB disk`, full, fullMB), row(`incremental backup after ~1 s of guest writes`, inc, incMB)]
    } finally {
      await bd?.close()
    }
  },
}
