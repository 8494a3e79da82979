import { rmSync } from 'node:fs'
import { liveChain } from '../images/graph.ts'
import { isRunningState } from '../vm/states.ts'
import { commitCreate } from './create.ts'
import type { SnapshotDeps } from './deps.ts'
import type { CreatePlan } from './plan.ts'

/**
 * Finishes or undoes creations a previous daemon left half-done (journal entries): when QEMU
 * already runs on the planned overlays the snapshot happened, so its metadata is written; else
 * the reserved overlay and state files are removed.
 */
export async function recover(d: SnapshotDeps): Promise<void> {
  for (const entry of d.repo.journalPending()) {
    const plan = entry.body as CreatePlan
    const log = d.log.child({ vm: entry.vm, journal: entry.id })
    try {
      const rec = d.vms.record(entry.vm)
      let switched = false
      if (isRunningState(rec.runtime.state) && plan.overlays.length > 0) {
        const qmp = d.vms.qmp(entry.vm)
        const chains = await Promise.all(plan.overlays.map((o) => liveChain(qmp, o.id)))
        switched = chains.every((c, i) => c[0]?.file === plan.overlays[i]!.overlay)
      }
      if (switched) {
        commitCreate(d, entry.vm, plan, plan.snapshot, entry.id)
        log.warn({ snapshot: plan.snapshot.name }, 'recovered a snapshot whose metadata was not written before a crash')
      } else {
        for (const o of plan.overlays) rmSync(o.overlay, { force: true })
        if (plan.snapshot.vmstateFile && !d.repo.get(entry.vm, plan.snapshot.name)) rmSync(plan.snapshot.vmstateFile, { force: true })
        d.repo.journalDone(entry.id)
        log.warn({ snapshot: plan.snapshot.name }, 'rolled back a snapshot creation interrupted by a crash')
      }
    } catch (err) {
      log.error({ err }, 'could not recover journal entry; left for the next start')
    }
  }
}
