// Live external checkpoint: qmpd (POST snapshots kind external, memory true, live true) vs the same
// QEMU steps over raw QMP: stop, transaction of blockdev-snapshot-sync for both disks, migrate with
// the background-snapshot capability to a unix socket the bench serves into a file (fsynced), wait
// for completed; QEMU resumes the guest when the background snapshot starts.
import { join } from 'node:path'
import { bothSides, compare, type Case } from '../lib/case.ts'
import { WARMUP_MS, withGuestPair } from '../lib/guestvm.ts'
import { migrationEnd, rawCont, rawDowntime, serveToFile, type RawVm } from '../lib/raw.ts'
import { summarize } from '../lib/stats.ts'

const UNCAPPED = 2 ** 40

/**
 * A raw checkpoint of both disks plus RAM to `file`: `background` uses background-snapshot (the
 * guest resumes at once), otherwise the guest stays stopped for the RAM write and is resumed after.
 * `gen` holds the current top node generation per disk and is advanced.
 */
export async function rawCheckpoint(
  raw: RawVm,
  opts: { file: string; overlayDir: string; tag: string; gen: { vda: number; vdb: number }; background: boolean },
): Promise<{ ms: number; downtimeMs: number; bytes: number }> {
  const { qmp } = raw
  const dt = rawDowntime(qmp)
  const t0 = performance.now()
  const sockName = `mig-${opts.tag}.sock`
  const server = await serveToFile(join(raw.dir, sockName), opts.file)
  try {
    await qmp.cmd('migrate-set-capabilities', {
      capabilities: [
        { capability: 'events', state: true },
        { capability: 'background-snapshot', state: opts.background },
      ],
    })
    await qmp.cmd('migrate-set-parameters', { 'max-bandwidth': UNCAPPED })
    await qmp.cmd('stop')
    const actions = (['vda', 'vdb'] as const).map((d) => ({
      type: 'blockdev-snapshot-sync',
      data: {
        'node-name': `${d}-f${opts.gen[d]}`,
        'snapshot-file': join(opts.overlayDir, `${d}-${opts.tag}.qcow2`),
        'snapshot-node-name': `${d}-f${opts.gen[d] + 1}`,
        format: 'qcow2',
        mode: 'absolute-paths',
      },
    }))
    await qmp.cmd('transaction', { actions })
    opts.gen.vda++
    opts.gen.vdb++
    const done = migrationEnd(qmp)
    await qmp.cmd('migrate', { uri: `unix:${sockName}` })
    const status = await done
    if (status !== 'completed') throw new Error(`raw migration ${status}`)
    const bytes = await server.done()
    const st = await qmp.cmd('query-status')
    if (!st.running) await rawCont(qmp)
    const ms = performance.now() - t0
    return { ms, downtimeMs: dt.end(), bytes }
  } finally {
    server.close()
  }
}

export const liveCheckpointCase: Case = {
  name: 'live',
  title: 'live external checkpoint (background-snapshot)',
  async run(ctx) {
    return withGuestPair(ctx, 'lc', async ({ bd, raw, rawDir, alt }) => {
      const gen = { vda: 0, vdb: 0 }
      const q: number[] = []
      const qDown: number[] = []
      const r: number[] = []
      const rDown: number[] = []
      let method = ''
      let bytes = 0
      // Twice the repetitions: the guest pause is a few tens of ms and noisy.
      // The guest stamps its pages once after boot (WARMUP_MS); a pause keeps RAM as it is, so
      // later repetitions only let the resumed guest settle.
      for (let i = 0; i < ctx.reps * 2; i++) {
        await bothSides(
          i,
          async () => {
            await alt.qmpdSide(i === 0 ? WARMUP_MS : 300)
            const t0 = performance.now()
            const job = await bd.op('/v1/vms/lc/snapshots', { name: `l${i}`, kind: 'external', memory: true, live: true })
            q.push(performance.now() - t0)
            qDown.push(Number(job.result.downtimeMs))
            method = job.result.snapshot.ramMethod
          },
          async () => {
            await alt.rawSide(i === 0 ? WARMUP_MS : 300)
            const got = await rawCheckpoint(raw, { file: join(rawDir, `l${i}.vmstate`), overlayDir: join(rawDir, 'disks'), tag: `l${i}`, gen, background: true })
            bytes = got.bytes
            r.push(got.ms)
            rDown.push(got.downtimeMs)
          },
        )
        ctx.log(`rep ${i}: qmpd ${q[i]!.toFixed(0)} ms (pause ${qDown[i]} ms, ${method}), raw ${r[i]!.toFixed(0)} ms (pause ${rDown[i]!.toFixed(1)} ms)`)
      }
      const qd = summarize(qDown)
      const rd = summarize(rDown)
      return [
        compare(
          {
            case: 'live',
            metric: 'live external checkpoint, guest pause (result.downtimeMs)',
            unit: 'ms',
            qmpd: { name: 'qmpd downtimeMs', stats: qd },
            baseline: { name: 'raw STOP→RESUME', stats: rd },
            extra: { ramMethod: method },
            note: 'target is absolute on qmpd; the raw pause is shown for reference',
          },
          { maxAbs: 50 },
        ),
        compare(
          {
            case: 'live',
            metric: 'live external checkpoint, total',
            unit: 'ms',
            qmpd: { name: 'qmpd POST snapshots external memory live', stats: summarize(q) },
            baseline: { name: 'raw stop+transaction+bg-snapshot migrate', stats: summarize(r) },
            extra: { vmstateBytes: bytes },
          },
          { maxRatio: 1.3 },
        ),
      ]
    })
  },
}
