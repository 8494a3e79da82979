// External disk snapshot of both disks in one transaction: qmpd (POST snapshots kind external,
// memory false, ?wait=true) vs a raw QMP `transaction` of two blockdev-snapshot-sync actions.
import { join } from 'node:path'
import { bothSides, compare, type Case } from '../lib/case.ts'
import { WARMUP_MS, withGuestPair } from '../lib/guestvm.ts'
import { Accounting, medianSplit, type Split } from '../lib/accounting.ts'
import { profiled } from '../lib/profile.ts'
import { summarize } from '../lib/stats.ts'

export const extSnapCase: Case = {
  name: 'extsnap',
  title: 'external disk snapshot, 2 disks, atomic',
  async run(ctx) {
    return withGuestPair(ctx, 'xs', async ({ bd, raw, rawDir, alt }) => {
      const gen = { vda: 0, vdb: 0 }
      const rawSnap = async (tag: string): Promise<number> => {
        const actions = (['vda', 'vdb'] as const).map((d) => ({
          type: 'blockdev-snapshot-sync',
          data: {
            'node-name': `${d}-f${gen[d]}`,
            'snapshot-file': join(rawDir, 'disks', `${d}-${tag}.qcow2`),
            'snapshot-node-name': `${d}-f${gen[d] + 1}`,
            format: 'qcow2',
            mode: 'absolute-paths',
          },
        }))
        const t0 = performance.now()
        await raw.qmp.cmd('transaction', { actions })
        const ms = performance.now() - t0
        gen.vda++
        gen.vdb++
        return ms
      }
      const q: number[] = []
      const r: number[] = []
      // Where qmpd's time goes, per snapshot: QMP commands, journal steps, synchronous SQLite/fs, the rest.
      const acc = new Accounting(bd.daemon.db)
      const splits: Split[] = []
      const commits: number[] = []
      try {
        await alt.qmpdSide(WARMUP_MS)
        await bd.op('/v1/vms/xs/snapshots', { name: 'warm', kind: 'external', memory: false })
        await alt.rawSide(WARMUP_MS)
        await rawSnap('warm')
        // Cheap: four times the repetitions, for a stable median on a noisy machine.
        for (let i = 0; i < ctx.reps * 4; i++) {
          await bothSides(
            i,
            async () => {
              await alt.qmpdSide(300)
              acc.start()
              const t0 = performance.now()
              const job = await bd.op('/v1/vms/xs/snapshots', { name: `s${i}`, kind: 'external', memory: false })
              q.push(performance.now() - t0)
              splits.push(acc.split(q.at(-1)!))
              commits.push(acc.lastCommits)
              if (job.result?.snapshot?.kind !== 'external') throw new Error(`unexpected result ${JSON.stringify(job.result)}`)
            },
            async () => {
              await alt.rawSide(300)
              r.push(await rawSnap(`s${i}`))
            },
          )
        }
        if (ctx.profile) {
          // Not counted: 40 more snapshots under the CPU profiler, to see where qmpd's own time goes.
          await alt.qmpdSide(300)
          const file = join(ctx.work, 'extsnap.cpuprofile')
          const p = await profiled(file, async () => {
            for (let i = 0; i < 40; i++) await bd.op('/v1/vms/xs/snapshots', { name: `p${i}`, kind: 'external', memory: false })
          })
          ctx.log(`profile ${file}; self time over 40 snapshots by file:\n${p.files.map((t) => `      ${t.selfMs.toFixed(1).padStart(7)} ms  ${t.frame}`).join('\n')}\n  top frames:\n${p.top.map((t) => `      ${t.selfMs.toFixed(1).padStart(7)} ms  ${t.frame}`).join('\n')}`)
        }
      } finally {
        acc.restore()
      }
      const qemuMs = splits.map((x) => x['qmp transaction'] ?? 0)
      const steps = medianSplit(splits)
      // What reading the graph costs QEMU by now (qmpd reads it before each snapshot): the raw side's chains are as long.
      await alt.rawSide(300)
      const qnbn: number[] = []
      let qnbnBytes = 0
      for (let i = 0; i < 20; i++) {
        const t0 = performance.now()
        const nodes = await raw.qmp.cmd('query-named-block-nodes', { flat: true })
        qnbn.push(performance.now() - t0)
        qnbnBytes = JSON.stringify(nodes).length
      }
      const qb: number[] = []
      for (let i = 0; i < 20; i++) {
        const t0 = performance.now()
        await raw.qmp.cmd('query-block')
        qb.push(performance.now() - t0)
      }
      ctx.log(`SQLite commits per snapshot: ${[...new Set(commits)].join(', ')}`)
      ctx.log(`qmpd's time per snapshot (medians): ${steps.map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ')}`)
      ctx.log(`qmpd ${q.map((x) => x.toFixed(1)).join(' ')} ms; raw ${r.map((x) => x.toFixed(1)).join(' ')} ms`)
      return [
        compare(
          {
            case: 'extsnap',
            metric: 'external disk snapshot, 2 disks, one transaction',
            unit: 'ms',
            qmpd: { name: 'qmpd POST snapshots external ?wait=true', stats: summarize(q) },
            baseline: { name: 'raw QMP transaction', stats: summarize(r) },
            extra: {
              qmpdTransactionMedianMs: summarize(qemuMs).median,
              qmpdOwnMedianMs: summarize(q.map((x, i) => x - (qemuMs[i] ?? 0))).median,
              sqliteCommitsPerSnapshot: summarize(commits).median,
              ...Object.fromEntries(steps.map(([k, v]) => [`ms: ${k}`, Math.round(v * 100) / 100])),
              rawQueryNamedBlockNodesMs: summarize(qnbn).median, queryNamedBlockNodesBytes: qnbnBytes, rawQueryBlockMs: summarize(qb).median, chainLayers: ctx.reps * 4 + 2,
            },
            note: `qmpd's own transaction took a median ${summarize(qemuMs).median.toFixed(1)} ms (time from the HTTP call to the finished job minus it: ${summarize(q.map((x, i) => x - (qemuMs[i] ?? 0))).median.toFixed(1)} ms); chains grow by one layer per repetition on both sides; raw query-named-block-nodes / query-block timed at the end on the raw guest (qmpd reads the top nodes with one query-block only when its cache is stale)`,
          },
          { maxRatio: 1.2 },
        ),
        // The same target, from qmpd's own work measured directly (its total minus its own
        // transaction): steadier than the two totals when other load makes QEMU's answers vary.
        compare(
          {
            case: 'extsnap',
            metric: "external disk snapshot: qmpd's own work (its total minus its QMP transaction)",
            unit: 'ms',
            qmpd: { name: 'qmpd total - qmpd transaction', stats: summarize(q.map((x, i) => x - (qemuMs[i] ?? 0))) },
            baseline: { name: 'raw QMP transaction', stats: summarize(r) },
            note: `1.2x the transaction leaves qmpd 0.2x of it; medians per snapshot: ${steps.map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ')}`,
          },
          { maxRatio: 0.2, targetText: '<= 0.2x (total <= 1.2x)' },
        ),
      ]
    })
  },
}
