// Snapshot creation as a journaled step program (plan, switch disks, save RAM, commit); the HTTP
// layer validated its input.
import { existsSync } from 'node:fs'
import { z } from 'zod'
import { ensureBaseImages } from '../chain/graph.ts'
import { QmpdError } from '../errors.ts'
import type { JobContext } from '../jobs/manager.ts'
import type { Job } from '../jobs/model.ts'
import { isAdopted, type VmRuntime, type VmState } from '../vm/definition.ts'
import { planDefinition, requireAdoptedQemu } from '../vm/adopted.ts'
import { isRunningState } from '../vm/states.ts'
import type { Live, SnapshotDeps } from './deps.ts'
import { createExternal } from './external.ts'
import { externalBytes, qemuGone, versionOf } from './files.ts'
import { undoCreate } from './create-undo.ts'
import { createInternal } from './internal.ts'
import type { CreateSnapshotInput, Snapshot } from './model.ts'
import { withExpiry } from './expiry.ts'
import { planCreate, type CreatePlan } from './plan.ts'
import { getView } from './views.ts'
import { Snapshot as SnapshotRecord } from '../store/snapshot-record.ts'
import { assertCreatable } from '../images/files.ts'

/** Checks a creation request (already validated by the HTTP layer) at once, 4xx before any job, and queues it. */
export function submitCreate(d: SnapshotDeps, busyCheck: (vm: string, what: string) => void, vm: string, input: CreateSnapshotInput): Job {
  const rec = d.vms.record(vm)
  const body = withExpiry(input)
  busyCheck(vm, 'take a snapshot')
  const def = planDefinition(rec.definition, rec.runtime)
  if (d.repo.get(vm, body.name)) throw new QmpdError('SNAPSHOT_EXISTS', `VM ${vm} already has a snapshot ${body.name}`, { vm, snapshot: body.name })
  for (const id of Object.keys(body.disks ?? {})) {
    if (!def.disks.some((x) => x.id === id)) throw new QmpdError('INVALID_INPUT', `VM ${vm} has no disk ${id}`, { vm, disk: id })
  }
  // Throws on anything wrong and changes nothing. With jobs queued ahead the VM's state will
  // change before this one runs (start, then checkpoint): the job plans again when it starts.
  const early = d.jobs.busy(vm) ? undefined : { plan: planFor(d, vm, body, rec.runtime.state), runtime: rec.runtime, version: d.repo.version(vm) }
  return d.jobs.submit({ vm, op: 'snapshot-create', params: body, run: (ctx) => doCreate(d, vm, body, ctx, early) })
}

/** Plans a creation from the VM's record and files as they are now (see planCreate). */
function planFor(d: SnapshotDeps, vm: string, body: CreateSnapshotInput, state: VmState): CreatePlan {
  const rec = d.vms.record(vm)
  requireAdoptedQemu(vm, rec.definition, { state }, 'a snapshot of its disks')
  return planCreate(
    {
      vm,
      state,
      definition: planDefinition(rec.definition, rec.runtime),
      ...(isAdopted(rec.definition) ? {} : { recorded: rec.definition }),
      runtime: rec.runtime,
      existing: d.repo.list(vm),
      vmDir: d.paths.vmDir(vm),
      // Overlays and RAM state files are created: their directory must exist (nothing makes it).
      resolve: (input, dir, field) => {
        const file = d.paths.resolve(input, dir, field)
        assertCreatable(file, field)
        return file
      },
      exists: existsSync,
    },
    body,
  )
}

async function doCreate(
  d: SnapshotDeps,
  vm: string,
  body: CreateSnapshotInput,
  ctx: JobContext,
  early?: { plan: CreatePlan; runtime: VmRuntime; version: number },
): Promise<unknown> {
  // The VM may have changed while the job waited in the queue: unless neither its runtime
  // record nor its snapshots changed since the request was checked, plan again from what is now.
  const runtime = d.vms.record(vm).runtime
  const state = runtime.state
  const unchanged = early !== undefined && early.runtime === runtime && early.version === d.repo.version(vm)
  if (!unchanged && d.repo.get(vm, body.name)) throw new QmpdError('SNAPSHOT_EXISTS', `VM ${vm} already has a snapshot ${body.name}`, { vm, snapshot: body.name })
  const plan = unchanged ? early.plan : planFor(d, vm, body, state)
  const s = plan.snapshot
  const live: Live | undefined = isRunningState(state) ? { qmp: d.vms.qmp(vm), running: state === 'running' } : undefined
  const t0 = performance.now()
  const journalBody: CreateJournal = { plan, wasRunning: state === 'running' }
  // Nothing below touches QEMU, files or the store before the first step: the entry is written with it.
  const o = d.journal.begin({ vm, op: CREATE_OP, job: ctx.id, body: journalBody, qemuPid: () => d.vms.record(vm).runtime.pid, withFirstStep: true })
  let keepEntry = false
  try {
    const ram: { method?: Snapshot['ramMethod']; format?: Snapshot['ramFormat'] } = {}
    let downtimeMs = 0
    if (s.kind === 'internal') downtimeMs = await createInternal(d, vm, plan, live, ctx, o)
    else downtimeMs = await createExternal(d, vm, plan, live, ctx, body, ram, o)
    if (s.kind === 'internal' && s.memory) ram.method = 'snapshot-save'
    const final: Snapshot = {
      ...s,
      downtimeMs,
      ...(live ? { qemuVersion: versionOf(live.qmp) } : {}),
      ...(ram.method ? { ramMethod: ram.method } : {}),
      ...(ram.format ? { ramFormat: ram.format } : {}),
    }
    // The files it froze are final now: stat them (thread pool) while the metadata commits.
    const size = s.kind === 'external' ? externalBytes(final) : undefined
    size?.catch(() => {})
    // The step's record, the metadata and the end of the entry in one SQLite transaction.
    try {
      await o.commitStep('commit', () => commitCreate(d, vm, plan, final, () => o.end()))
    } catch (err) {
      // The store refused the metadata (a full disk, say): the disks and files exist and the
      // store does not name them. Undo them as recovery would, while the entry still says so.
      keepEntry = !(await undoUncommitted(d, vm, plan, live, ctx, err))
      throw err
    }
    ctx.log.info({ snapshot: s.name, kind: s.kind, memory: s.memory, downtimeMs }, 'snapshot created')
    const view = await getView(d, vm, s.name, size)
    return { snapshot: view, downtimeMs, ms: Math.round(performance.now() - t0) }
  } catch (err) {
    // A failure the daemon lives through was undone step by step (Reverter); a crash is recovery's.
    if (!keepEntry) o.end()
    throw err
  }
}

/**
 * Undoes a creation whose metadata commit failed (undoCreate) and resumes a guest it left paused;
 * false when the undo fails too: then the entry must stay for recovery at the next start (GET
 * …/check reports it) instead of ending over files and overlays nothing names.
 */
async function undoUncommitted(d: SnapshotDeps, vm: string, plan: CreatePlan, live: Live | undefined, ctx: JobContext, cause: unknown): Promise<boolean> {
  const qmp = live && !qemuGone(d, vm) ? live.qmp : undefined
  try {
    const undone = await undoCreate(d, vm, plan, qmp, ctx)
    if (qmp && live?.running && d.vms.record(vm).runtime.state === 'paused') await d.vms.contInJob(vm)
    ctx.log.warn({ err: cause, undone }, 'the snapshot metadata could not be stored: what the creation made is undone')
    return true
  } catch (err) {
    ctx.log.error({ err, cause }, 'the snapshot metadata could not be stored, nor what the creation made undone: left to recovery at the next start')
    return false
  }
}

/** Journal name of a snapshot creation. */
export const CREATE_OP = 'snapshot-create'

/** What a creation's journal entry holds: its plan, and whether the guest ran before it began. */
export interface CreateJournal {
  plan: CreatePlan
  wasRunning: boolean
}

/** CreateJournal as read back from the journal (recovery parses with it instead of casting). */
export const CreateJournal = z.strictObject({
  plan: z.strictObject({
    snapshot: SnapshotRecord,
    overlays: z.array(z.strictObject({ id: z.string(), file: z.string(), format: z.enum(['qcow2', 'raw']), overlay: z.string() })),
  }),
  wasRunning: z.boolean(),
}) satisfies z.ZodType<CreateJournal>

/**
 * Metadata for a created snapshot, all in one SQLite transaction with the end of its journal
 * entry (`end`): the snapshot exists in the store exactly when its operation is over.
 */
export function commitCreate(d: SnapshotDeps, vm: string, plan: CreatePlan, s: Snapshot, end: () => void): void {
  d.repo.tx(() => {
    d.repo.put(s)
    if (plan.overlays.length > 0) {
      const rt = d.vms.record(vm).runtime
      ensureBaseImages(d, vm)
      for (const o of plan.overlays) {
        d.repo.putImage({ vm, disk: o.id, file: o.overlay, format: 'qcow2', backing: o.file, createdByQmpd: true })
      }
      const disks = rt.disks.map((disk) => {
        const o = plan.overlays.find((x) => x.id === disk.id)
        return o ? { ...disk, file: o.overlay, format: 'qcow2' as const, gen: disk.gen + 1 } : disk
      })
      d.vms.updateRuntime(vm, { disks, currentSnapshot: s.name })
    } else {
      d.vms.updateRuntime(vm, { currentSnapshot: s.name })
    }
    end()
  })
}
