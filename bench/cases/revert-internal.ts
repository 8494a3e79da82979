// Revert to an internal checkpoint on a running VM: qmpd (POST snapshots/{snap}/revert) vs raw
// QMP: stop, snapshot-load job (JOB_STATUS_CHANGE concluded, job-dismiss), cont — the same QEMU
// steps qmpd takes.
import { bothSides, compare, type Case } from '../lib/case.ts'
import { WARMUP_MS, withGuestPair } from '../lib/guestvm.ts'
import { rawCont, rawDowntime, rawJob } from '../lib/raw.ts'
import { summarize } from '../lib/stats.ts'
import { rawSnapshotSave } from './internal.ts'

export const revertInternalCase: Case = {
  name: 'revert-internal',
  title: 'revert to an internal checkpoint (snapshot-load in place)',
  async run(ctx) {
    return withGuestPair(ctx, 'ir', async ({ bd, raw, alt }) => {
      await alt.qmpdSide(WARMUP_MS)
      await bd.op('/v1/vms/ir/snapshots', { name: 'c1', kind: 'internal', memory: true })
      await alt.rawSide(WARMUP_MS)
      await rawSnapshotSave(raw, 'c1')
      const q: number[] = []
      const qDown: number[] = []
      const r: number[] = []
      const rDown: number[] = []
      // Cheap: twice the repetitions (QEMU's own snapshot-load time varies a lot from run to run).
      for (let i = 0; i < ctx.reps * 2; i++) {
        await bothSides(
          i,
          async () => {
            await alt.qmpdSide(300)
            const t0 = performance.now()
            const job = await bd.op('/v1/vms/ir/snapshots/c1/revert', {})
            q.push(performance.now() - t0)
            qDown.push(Number(job.result.downtimeMs))
            if (job.result.state !== 'running') throw new Error(`revert left the VM ${job.result.state}`)
          },
          async () => {
            await alt.rawSide(300)
            const dt = rawDowntime(raw.qmp)
            const t1 = performance.now()
            await raw.qmp.cmd('stop')
            const id = `load-${i}`
            await rawJob(raw.qmp, id, () => raw.qmp.cmd('snapshot-load', { 'job-id': id, tag: 'c1', vmstate: 'vda-f0', devices: ['vda-f0', 'vdb-f0'] }), { finalize: false })
            await rawCont(raw.qmp)
            r.push(performance.now() - t1)
            rDown.push(dt.end())
          },
        )
        ctx.log(`rep ${i}: qmpd ${q[i]!.toFixed(0)} ms, raw ${r[i]!.toFixed(0)} ms`)
      }
      return [
        compare(
          {
            case: 'revert-internal',
            metric: 'revert internal checkpoint (stop, snapshot-load, cont)',
            unit: 'ms',
            qmpd: { name: 'qmpd POST revert', stats: summarize(q) },
            baseline: { name: 'raw stop+snapshot-load job+cont', stats: summarize(r) },
            extra: { qmpdPauseMedianMs: summarize(qDown).median, rawPauseMedianMs: summarize(rDown).median },
          },
          { maxRatio: 1.1 },
        ),
      ]
    })
  },
}
