// Internal system checkpoint: qmpd (POST snapshots kind internal, memory true) vs a raw
// snapshot-save job (job-id, tag, vmstate, devices; JOB_STATUS_CHANGE concluded; job-dismiss).
import { bothSides, compare, type Case } from '../lib/case.ts'
import { WARMUP_MS, withGuestPair } from '../lib/guestvm.ts'
import { rawDowntime, rawJob, type RawVm } from '../lib/raw.ts'
import { summarize } from '../lib/stats.ts'

/** A raw snapshot-save of both standard disks (vmstate on vda); returns total and guest-pause ms. */
export async function rawSnapshotSave(raw: RawVm, tag: string): Promise<{ ms: number; downtimeMs: number }> {
  const dt = rawDowntime(raw.qmp)
  const id = `save-${tag}`
  const t0 = performance.now()
  await rawJob(raw.qmp, id, () => raw.qmp.cmd('snapshot-save', { 'job-id': id, tag, vmstate: 'vda-f0', devices: ['vda-f0', 'vdb-f0'] }), { finalize: false })
  const ms = performance.now() - t0
  return { ms, downtimeMs: dt.end() }
}

export const internalCheckpointCase: Case = {
  name: 'internal',
  title: 'internal system checkpoint (RAM + disks in the qcow2s)',
  async run(ctx) {
    return withGuestPair(ctx, 'ic', async ({ bd, raw, alt }) => {
      const q: number[] = []
      const qDown: number[] = []
      const r: number[] = []
      const rDown: number[] = []
      // Twice the repetitions: QEMU's own snapshot-save time varies from run to run.
      // The guest stamps its pages once after boot (WARMUP_MS); a pause keeps RAM as it is, so
      // later repetitions only let the resumed guest settle.
      for (let i = 0; i < ctx.reps * 2; i++) {
        await bothSides(
          i,
          async () => {
            await alt.qmpdSide(i === 0 ? WARMUP_MS : 300)
            const t0 = performance.now()
            const job = await bd.op('/v1/vms/ic/snapshots', { name: `c${i}`, kind: 'internal', memory: true })
            q.push(performance.now() - t0)
            qDown.push(Number(job.result.downtimeMs))
          },
          async () => {
            await alt.rawSide(i === 0 ? WARMUP_MS : 300)
            const got = await rawSnapshotSave(raw, `c${i}`)
            r.push(got.ms)
            rDown.push(got.downtimeMs)
          },
        )
        ctx.log(`rep ${i}: qmpd ${q[i]!.toFixed(0)} ms (pause ${qDown[i]} ms), raw ${r[i]!.toFixed(0)} ms (pause ${rDown[i]!.toFixed(0)} ms)`)
      }
      const qd = summarize(qDown)
      const rd = summarize(rDown)
      return [
        compare(
          {
            case: 'internal',
            metric: 'internal checkpoint (snapshot-save), total',
            unit: 'ms',
            qmpd: { name: 'qmpd POST snapshots internal memory', stats: summarize(q) },
            baseline: { name: 'raw QMP snapshot-save job', stats: summarize(r) },
            extra: { qmpdPauseMedianMs: qd.median, rawPauseMedianMs: rd.median },
          },
          { maxRatio: 1.1 },
        ),
        compare(
          {
            case: 'internal',
            metric: 'internal checkpoint, guest pause (result.downtimeMs; raw: STOP→RESUME)',
            unit: 'ms',
            qmpd: { name: 'qmpd downtimeMs', stats: qd },
            baseline: { name: 'raw STOP→RESUME', stats: rd },
            note: 'snapshot-save stops the guest for the whole RAM write on both sides (QEMU behaviour); reported, no target',
          },
          {},
        ),
      ]
    })
  },
}
