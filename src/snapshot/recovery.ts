// Crash recovery of snapshot create, revert and delete (decision table: docs/architecture.md,
// "Crash recovery"). A creation is finished when QEMU and the files show it whole, else undone;
// a revert and a delete are always finished: once begun they have discarded or merged data, so
// they are run again from the start (each of their steps is safe to repeat).
import { rm } from 'node:fs/promises'
import type { Logger } from 'pino'
import { removeGarbage } from '../chain/graph.ts'
import { liveChain, liveInternalSnapshots } from '../images/graph.ts'
import type { Recovery, RecoveryOutcome } from '../ops/recovery.ts'
import type { JournalEntry } from '../store/journal.ts'
import { finishReceivedState, partialName } from '../state/ramfile.ts'
import { cancelStaleMigration } from '../vm/migration.ts'
import { isRunningState } from '../vm/states.ts'
import { commitCreate, CREATE_OP, CreateJournal } from './create.ts'
import { DELETE_OP, rerunDelete, DeleteJournal } from './delete.ts'
import { registerCloneRecovery } from './clone.ts'
import { registerExportRecovery } from './export.ts'
import type { SnapshotDeps } from './deps.ts'
import { backedBy, undoCreate } from './create-undo.ts'
import { REVERT_OP, rerunRevert, RevertJournal } from './revert.ts'

/** Registers the rules of snapshot-create, snapshot-revert and snapshot-delete. */
export function registerSnapshotRecovery(recovery: Recovery, d: SnapshotDeps): void {
  recovery.register(CREATE_OP, (e, log) => recoverCreate(d, e, CreateJournal.parse(e.body), log))
  recovery.register(REVERT_OP, (e, log) => recoverRevert(d, e, RevertJournal.parse(e.body), log))
  recovery.register(DELETE_OP, (e, log) => recoverDelete(d, e, DeleteJournal.parse(e.body), log))
  registerExportRecovery(recovery)
  registerCloneRecovery(recovery, d)
}

/**
 * A creation happened when every captured disk shows it (internal: the tag in each qcow2, with
 * RAM in the vmstate disk for a checkpoint; external: QEMU runs on every planned overlay, or
 * offline every overlay is a qcow2 on its planned backing) and, with memory, the RAM state file
 * has its final name (renamed only once fsynced). Then its metadata is written (forward).
 * Otherwise everything it made is undone (back): tags deleted; live overlays committed back into
 * their backing and pivoted (the guest's writes since are kept); overlays of a QEMU that died
 * committed back offline; files removed. Either way a guest that ran before runs again.
 */
async function recoverCreate(d: SnapshotDeps, e: JournalEntry, j: CreateJournal, log: Logger): Promise<RecoveryOutcome> {
  const { plan } = j
  const s = plan.snapshot
  const vm = e.vm
  const ctx = { id: e.job ?? e.id, log }
  const alive = isRunningState(d.vms.record(vm).runtime.state)
  const qmp = alive ? d.vms.qmp(vm) : undefined
  if (qmp) await cancelStaleMigration(qmp, log)
  // The receiver outlives the daemon: a stream QEMU sent whole is the RAM state file now.
  const ramWhole = s.vmstateFile ? await finishReceivedState(qmp, s.vmstateFile) : false
  if (s.vmstateFile) await rm(partialName(s.vmstateFile), { force: true })
  const captured = s.disks.filter((x) => x.mode !== 'excluded')
  let whole: boolean
  if (s.kind === 'internal') {
    const tags = await tagsOf(d, captured.map((x) => x.file), qmp)
    whole = captured.every((x) => tags.get(x.file)?.some((t) => t.name === s.name))
    if (s.memory) whole &&= (tags.get(captured.find((x) => x.id === s.vmstateDisk)?.file ?? '')?.find((t) => t.name === s.name)?.vmStateSize ?? 0) > 0
  } else {
    if (qmp) {
      const chains = await Promise.all(plan.overlays.map((o) => liveChain(qmp, o.id)))
      whole = chains.every((c, i) => c[0]?.file === plan.overlays[i]!.overlay)
    } else {
      whole = s.vmState === 'shutoff' && (await Promise.all(plan.overlays.map((o) => backedBy(d, o.overlay, o.file)))).every(Boolean)
    }
    if (s.memory) whole &&= ramWhole
  }
  if (whole) {
    d.repo.tx(() => commitCreate(d, vm, plan, s, () => d.journal.repo.done(e.id)))
    await resumeIfItRan(d, vm, j.wasRunning)
    return { action: 'forward', detail: `snapshot ${s.name} was whole: recorded`, result: { snapshot: s.name } }
  }
  const undone = await undoCreate(d, vm, plan, qmp, ctx)
  await resumeIfItRan(d, vm, j.wasRunning)
  return { action: 'back', detail: `snapshot ${s.name} was not whole: undone (${undone.join(', ') || 'nothing was made yet'})` }
}

/** A revert is run again as a new job (its files from the first try removed when unused). */
async function recoverRevert(d: SnapshotDeps, e: JournalEntry, j: RevertJournal, log: Logger): Promise<RecoveryOutcome> {
  await removeUnrecorded(d, e.vm, j.overlays ?? [])
  removeGarbage(d, e.vm, { log })
  if (!d.repo.get(e.vm, j.snapshot)) return { action: 'back', detail: `snapshot ${j.snapshot} no longer exists` }
  return finishRerun(d, rerunRevert(d, e.vm, j).id, `the revert to ${j.snapshot}`)
}

/** A delete is run again as a new job: what it merged stays merged, what is left is done. */
async function recoverDelete(d: SnapshotDeps, e: JournalEntry, j: DeleteJournal, log: Logger): Promise<RecoveryOutcome> {
  await removeUnrecorded(d, e.vm, j.remove ?? [])
  removeGarbage(d, e.vm, { log })
  if (!d.repo.get(e.vm, j.snapshot)) return { action: 'forward', detail: `snapshot ${j.snapshot} was deleted`, result: { deleted: [j.snapshot] } }
  return finishRerun(d, rerunDelete(d, e.vm, j).id, `the delete of ${j.snapshot}`)
}

/**
 * Waits for an operation run again to end: recovery is over (and reconcile may look at the VM)
 * only once it is. A re-run that fails leaves the entry for the next start (and the VM flagged).
 */
async function finishRerun(d: SnapshotDeps, jobId: string, what: string): Promise<RecoveryOutcome> {
  const job = await d.jobs.wait(jobId, RERUN_TIMEOUT_MS)
  if (job.state !== 'succeeded') throw new Error(`${what}, run again as job ${jobId}, ended ${job.state}: ${job.error?.message ?? 'still running'}`)
  return { action: 'forward', detail: `${what} was run again as job ${jobId}`, result: job.result }
}

/** How long recovery waits for a revert or delete it runs again (a delete may commit gigabytes). */
const RERUN_TIMEOUT_MS = 30 * 60_000

/** Internal snapshot tags per file: from QEMU when it runs, else from qemu-img (-U). */
async function tagsOf(d: SnapshotDeps, files: string[], qmp: Parameters<typeof liveInternalSnapshots>[0] | undefined) {
  if (qmp) return liveInternalSnapshots(qmp)
  const out = new Map<string, Array<{ name: string; vmStateSize: number }>>()
  for (const f of files) {
    const info = await d.qemuImg.chain(f, { forceShare: true }).catch(() => [])
    out.set(f, (info[0]?.snapshots ?? []).map((t) => ({ name: t.name, vmStateSize: t['vm-state-size'] })))
  }
  return out
}

/** Removes files an interrupted operation created that no record names. */
async function removeUnrecorded(d: SnapshotDeps, vm: string, files: string[]): Promise<void> {
  const rt = d.vms.record(vm).runtime
  for (const f of files) {
    if (d.repo.images(vm).some((i) => i.file === f) || rt.disks.some((x) => x.file === f)) continue
    await rm(f, { force: true })
  }
}

/** A guest that ran before an interrupted operation paused it runs again. */
async function resumeIfItRan(d: SnapshotDeps, vm: string, wasRunning: boolean): Promise<void> {
  if (wasRunning && d.vms.record(vm).runtime.state === 'paused') await d.vms.contInJob(vm)
}

