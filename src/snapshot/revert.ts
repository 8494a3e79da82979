// Snapshot revert as a journaled step program; the HTTP layer validated its input.
import { existsSync, rmSync } from 'node:fs'
import { z } from 'zod'
import { ensureBaseImages, removeIfUnneeded } from '../chain/graph.ts'
import { QmpdError } from '../errors.ts'
import { topNodes } from '../images/graph.ts'
import type { JobContext } from '../jobs/manager.ts'
import type { Job } from '../jobs/model.ts'
import type { Operation } from '../ops/journal.ts'
import { driveQemuJob } from '../jobs/qemu-job.ts'
import { withReverter } from '../jobs/reverter.ts'
import { loadRamState, stateSocket } from '../state/ramfile.ts'
import { isAdopted } from '../vm/definition.ts'
import { assertAdoptedRevert, refuseRelaunch } from '../vm/adopted.ts'
import { trackDowntime } from '../vm/downtime.ts'
import { assertState, isRunningState } from '../vm/states.ts'
import { mustSnapshot, type SnapshotDeps } from './deps.ts'
import { reserveFile, uniqueFile, versionOf } from './files.ts'
import { definitionRestore, recordRevert } from './revert-definition.ts'
import type { RevertBody, Snapshot } from './model.ts'
import { assertTaggedImages, needsMixedRevert, revertMixed } from './revert-mixed.ts'

/** Checks a revert (its body already validated by the HTTP layer) and queues it. */
export function submitRevert(deps: SnapshotDeps, busyCheck: (vm: string, what: string) => void, vm: string, name: string, body: RevertBody): Job {
  const s = mustSnapshot(deps, vm, name)
  const rec = deps.vms.record(vm)
  if (isAdopted(rec.definition)) {
    assertAdoptedRevert(vm, s, body.state ?? (s.memory ? 'running' : 'shutoff'), rec.runtime)
    if (needsMixedRevert(deps, vm, s)) refuseRelaunch(vm, `reverting to ${s.name}`, 'its tag is in an image that is no longer the active layer: QEMU must open it, or a copy, from the start')
  }
  busyCheck(vm, 'revert')
  const st = rec.runtime.state
  assertState(vm, st, 'snapshot-revert')
  return deps.jobs.submit({ vm, op: REVERT_OP, params: { snapshot: name, ...body }, run: (ctx) => doRevert(deps, vm, s.name, body, ctx) })
}

/** Journal name of a revert. */
export const REVERT_OP = 'snapshot-revert'

/** What a revert's journal entry holds: its request, and the overlays it is creating. */
export interface RevertJournal {
  snapshot: string
  state?: RevertBody['state']
  overlays?: string[]
}

/** RevertJournal as read back from the journal. */
export const RevertJournal = z.strictObject({
  snapshot: z.string(),
  state: z.enum(['running', 'paused', 'shutoff']).optional(),
  overlays: z.array(z.string()).optional(),
}) satisfies z.ZodType<RevertJournal>

/** Queues a revert again (crash recovery: a revert is always finished, never undone). */
export function rerunRevert(deps: SnapshotDeps, vm: string, j: RevertJournal): Job {
  const body: RevertBody = j.state ? { state: j.state } : {}
  return deps.jobs.submit({ vm, op: REVERT_OP, params: { snapshot: j.snapshot, ...body, recovery: true }, run: (ctx) => doRevert(deps, vm, j.snapshot, body, ctx) })
}

async function doRevert(deps: SnapshotDeps, vm: string, name: string, body: RevertBody, ctx: JobContext): Promise<unknown> {
  const s = mustSnapshot(deps, vm, name)
  const j: RevertJournal = { snapshot: name, ...(body.state ? { state: body.state } : {}) }
  return deps.journal.run({ vm, op: REVERT_OP, job: ctx.id, body: j, qemuPid: () => deps.vms.record(vm).runtime.pid }, (o) => revertSteps(deps, vm, s, body, ctx, o, j))
}

async function revertSteps(deps: SnapshotDeps, vm: string, s: Snapshot, body: RevertBody, ctx: JobContext, o: Operation, j: RevertJournal): Promise<unknown> {
  const name = s.name
  const target = body.state ?? (s.memory ? 'running' : 'shutoff')
  const loadRam = s.memory && target !== 'shutoff'
  const warnings: string[] = []
  if (s.memory && !loadRam) warnings.push('reverted to shutoff: the snapshot\'s RAM state was not loaded, only its disks')
  if (s.disks.every((d) => d.mode === 'excluded')) warnings.push('memory-only checkpoint: disks were not rolled back and may not match the restored RAM')
  else if (s.disks.some((d) => d.mode === 'excluded')) warnings.push(`disks ${s.disks.filter((d) => d.mode === 'excluded').map((d) => d.id).join(', ')} were not part of the snapshot and were not rolled back`)
  const t0 = performance.now()
  let downtimeMs: number | undefined
  if (needsMixedRevert(deps, vm, s)) {
    // A tag outside the active layer (external snapshots taken since): src/snapshot/revert-mixed.ts.
    assertTaggedImages(s, existsSync)
    downtimeMs = await revertMixed(deps, vm, s, target, ctx, o, j)
  } else if (s.kind === 'internal' && loadRam) {
    downtimeMs = await revertInternalCheckpoint(deps, vm, s, target, ctx, o)
  } else if (s.kind === 'internal') {
    await o.step('quit', () => deps.vms.quitInJob(vm, ctx))
    await o.step('apply', async () => {
      for (const d of s.disks.filter((x) => x.mode === 'internal')) await deps.qemuImg.snapshot('apply', d.file, s.name)
    })
    await o.step('commit', () => recordRevert(deps, vm, s, () => ({ currentSnapshot: s.name })))
    await startAs(deps, vm, target, ctx, o)
  } else {
    await o.step('quit', () => deps.vms.quitInJob(vm, ctx))
    await switchToSnapshotImages(deps, vm, s, ctx, o, j)
    if (loadRam) {
      const qmp = await o.step('launch', () => deps.vms.launchInJob(vm, ctx, { incoming: true }))
      const version = versionOf(qmp)
      if (s.qemuVersion && version !== s.qemuVersion) warnings.push(`RAM state written by QEMU ${s.qemuVersion}, loaded into ${version}`)
      await o.step('load-ram', () => loadRamState(qmp, { file: s.vmstateFile!, check: (real) => void deps.paths.confine(real, 'vmstateFile'), socket: stateSocket(deps.paths.vmDir(vm), true), log: ctx.log }))
      if (target === 'running') await o.step('cont', () => deps.vms.contInJob(vm))
      else deps.vms.markPaused(vm)
    } else {
      await startAs(deps, vm, target, ctx, o)
    }
  }
  const state = deps.vms.record(vm).runtime.state
  ctx.log.info({ snapshot: name, state, warnings }, 'reverted')
  return { snapshot: name, state, ms: Math.round(performance.now() - t0), ...(downtimeMs !== undefined ? { downtimeMs } : {}), warnings }
}

/** snapshot-load into a QEMU that runs (started paused first when the VM is off). */
async function revertInternalCheckpoint(deps: SnapshotDeps, vm: string, s: Snapshot, target: 'running' | 'paused' | 'shutoff', ctx: JobContext, o: Operation): Promise<number> {
  let st = deps.vms.record(vm).runtime.state
  // Device state loads only into the machine it was saved from: under another definition (memory,
  // CPUs, disks...) QEMU is relaunched with the snapshot's, then snapshot-load runs in it.
  const rec = deps.vms.record(vm)
  if (definitionRestore(rec.definition, rec.runtime.disks, s)) {
    if (isRunningState(st)) await o.step('quit', () => deps.vms.quitInJob(vm, ctx))
    await o.step('definition', () => recordRevert(deps, vm, s, () => ({})))
    st = deps.vms.record(vm).runtime.state
  }
  if (!isRunningState(st)) {
    await o.step('launch', () => deps.vms.launchInJob(vm, ctx))
    st = 'paused'
  }
  const qmp = deps.vms.qmp(vm)
  const captured = s.disks.filter((d) => d.mode === 'internal')
  const nodes = await topNodes(qmp, captured.map((d) => d.id))
  const dt = trackDowntime(qmp)
  // Stop first so the guest never runs between the load and a requested 'paused'.
  if (st === 'running') await o.step('stop', () => deps.vms.stopInJob(vm))
  const jobId = `qmpd-load-${ctx.id.slice(0, 8)}`
  await o.step('snapshot-load', () =>
    driveQemuJob(
      qmp,
      jobId,
      () => qmp.execute('snapshot-load', { 'job-id': jobId, tag: s.name, vmstate: nodes.get(s.vmstateDisk!)!, devices: captured.map((d) => nodes.get(d.id)!) }),
      { log: ctx.log, onProgress: (c, t) => ctx.setProgress(c, t), manualFinalize: false },
    ),
  )
  await o.step('commit', () => recordRevert(deps, vm, s, () => ({ currentSnapshot: s.name })))
  if (target === 'running') await o.step('cont', () => deps.vms.contInJob(vm))
  else deps.vms.markPaused(vm)
  return dt.end()
}

async function startAs(deps: SnapshotDeps, vm: string, target: 'running' | 'paused' | 'shutoff', ctx: JobContext, o: Operation): Promise<void> {
  if (target === 'shutoff') return
  await o.step('launch', () => deps.vms.launchInJob(vm, ctx))
  if (target === 'running') await o.step('cont', () => deps.vms.contInJob(vm))
}

/**
 * With QEMU stopped: a fresh overlay on the snapshot's image for every captured disk becomes the
 * active layer; the layer that held the discarded state is removed unless something needs it.
 */
async function switchToSnapshotImages(deps: SnapshotDeps, vm: string, s: Snapshot, ctx: JobContext, o: Operation, j: RevertJournal): Promise<void> {
  const rt = deps.vms.record(vm).runtime
  const dir = deps.paths.vmDir(vm)
  const disks = s.disks.filter((x) => x.mode === 'external')
  for (const d of disks) {
    if (!existsSync(d.file)) throw new QmpdError('INVALID_STATE', `snapshot ${s.name}: image ${d.file} of disk ${d.id} is missing`, { file: d.file })
  }
  // The names go into the journal before any file exists: recovery removes the ones no record names.
  const names = new Map<string, string>()
  for (const d of disks) names.set(d.id, uniqueFile(dir, `${d.id}-${s.name}-r`, '.qcow2', [...names.values()]))
  const created: Array<{ id: string; file: string; backing: string; format: 'qcow2' | 'raw' }> = []
  await o.step(
    'overlays',
    () =>
      withReverter(ctx.log, async (r) => {
        for (const d of disks) {
          const file = names.get(d.id)!
          await reserveFile(file)
          r.add(`remove ${file}`, () => rmSync(file, { force: true }))
          await deps.qemuImg.create(file, 'qcow2', { backing: { file: d.file, format: d.format } })
          created.push({ id: d.id, file, backing: d.file, format: d.format })
        }
      }),
    { body: { ...j, overlays: [...names.values()] } },
  )
  // Disks the snapshot's definition does not hold as they are now keep their files: no cleanup.
  const leftBehind = definitionRestore(deps.vms.record(vm).definition, rt.disks, s)?.leftBehind ?? []
  const old = rt.disks.filter((d) => !leftBehind.includes(d.id))
  await o.step('commit', () => deps.repo.tx(() => {
    ensureBaseImages(deps, vm)
    for (const c of created) deps.repo.putImage({ vm, disk: c.id, file: c.file, format: 'qcow2', backing: c.backing, createdByQmpd: true })
    recordRevert(deps, vm, s, (base) => ({
      disks: base.map((d) => {
        const c = created.find((x) => x.id === d.id)
        return c ? { ...d, file: c.file, format: 'qcow2' as const, gen: d.gen + 1 } : d
      }),
      currentSnapshot: s.name,
    }))
    // A disk the restored definition brings back is in the image graph too.
    ensureBaseImages(deps, vm)
  }))
  await o.step('cleanup', () => {
    for (const d of old) removeIfUnneeded(deps, vm, d.file, ctx)
  })
}
