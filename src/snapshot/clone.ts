// VM clones from a disk snapshot (POST /v1/vms {name, clone}): linked (a qcow2 overlay on the
// frozen image) or full (a flattened copy), as a journaled job in the source VM's queue; and the
// guard that keeps what linked clones read. Never writes an image of the source VM.
import { copyFile } from 'node:fs/promises'
import { existsSync, mkdirSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import type { JobContext } from '../jobs/manager.ts'
import type { Recovery, RecoveryOutcome } from '../ops/recovery.ts'
import { VM_FILES } from '../vm/argv.ts'
import { isAdopted, Name, type DiskDefinition, type VmDefinition } from '../vm/definition.ts'
import { Labels } from '../vm/labels.ts'
import type { VmView } from '../vm/manager.ts'
import { assertState, isRunningState } from '../vm/states.ts'
import { mustSnapshot, type SnapshotDeps } from './deps.ts'
import { convertArgs } from './export.ts'
import { reserveFiles } from './files.ts'
import { assertForkable, copyForkDisk, isInternalCheckpoint, recordFork } from './clone-fork.ts'
import { submitRevert } from './revert.ts'
import type { Snapshot, SnapshotDisk } from './model.ts'

/** Body of POST /v1/vms that defines a VM as a clone of a snapshot. */
export const CloneDefinition = z.strictObject({
  name: Name,
  clone: z.strictObject({
    vm: Name.describe('the source VM'),
    snapshot: Name.describe('a snapshot of it: a disk snapshot (external or internal) or a checkpoint (the clone is a fork of its RAM state)'),
    linked: z
      .boolean()
      .default(false)
      .describe('true: qcow2 overlays on the snapshot\'s frozen images (kept while the clone exists); false: flattened copies'),
  }),
  labels: Labels.optional(),
  start: z
    .boolean()
    .default(false)
    .describe('true: start the clone once defined (a fork runs on from the checkpoint\'s RAM state); its outcome is in clone.start'),
})
export type CloneDefinition = z.output<typeof CloneDefinition>

/** Journal name of a clone. */
export const CLONE_OP = 'vm-clone'

/** A clone's journal entry: the new VM's name and every file it creates. */
export const CloneJournal = z.strictObject({ source: z.string(), snapshot: z.string(), name: z.string(), linked: z.boolean(), files: z.array(z.string()) })
export type CloneJournal = z.output<typeof CloneJournal>

/** One disk of the clone: where it goes and how it is made. */
interface ClonedDisk {
  spec: DiskDefinition
  from: SnapshotDisk
  file: string
  format: 'qcow2' | 'raw'
  /** internal linked: the tag is first flattened into this base, which the overlay sits on. */
  base?: string
}

/**
 * Validates a clone request, queues it in the source VM's queue (a delete of the snapshot waits
 * for it) and resolves with the new VM's view once defined.
 * With `start`, then starts the clone (the outcome in `clone.start`; a failed start keeps the clone).
 * @throws QmpdError VM_NOT_FOUND or SNAPSHOT_NOT_FOUND for the source, VM_EXISTS, NOT_SUPPORTED (a linked or backed internal-checkpoint fork, an adopted
 *   source, UEFI, excluded disks or no recorded definition), INVALID_STATE (a fork while the source runs), BUSY; the job's error when the copy fails.
 */
export async function cloneVm(d: SnapshotDeps, busyCheck: (vm: string, what: string) => void, input: CloneDefinition): Promise<VmView & { clone: unknown }> {
  const { vm: source, snapshot, linked } = input.clone
  const s = mustSnapshot(d, source, snapshot)
  if (d.vms.has(input.name)) throw new QmpdError('VM_EXISTS', `a VM named ${input.name} already exists`, { vm: input.name })
  assertState(source, d.vms.record(source).runtime.state, 'snapshot-export')
  busyCheck(source, `clone snapshot ${snapshot}`)
  const def = cloneableDefinition(s)
  const fork = isInternalCheckpoint(s)
  if (fork) await assertForkable(d, source, s, linked)
  const dir = d.paths.vmDir(input.name)
  const disks = def.disks.map((spec): ClonedDisk => {
    const from = s.disks.find((x) => x.id === spec.id)
    if (!from || from.mode === 'excluded') throw new QmpdError('NOT_SUPPORTED', `disk ${spec.id} is not in snapshot ${snapshot}: a clone needs every disk at the snapshot's instant`, { disk: spec.id })
    if (fork) return { spec, from, file: join(dir, `${spec.id}.qcow2`), format: 'qcow2' }
    if (!linked) return { spec, from, file: join(dir, `${spec.id}.${spec.format}`), format: spec.format }
    return { spec, from, file: join(dir, `${spec.id}.qcow2`), format: 'qcow2', ...(from.mode === 'internal' ? { base: join(dir, `${spec.id}-base.qcow2`) } : {}) }
  })
  // An external checkpoint's RAM state becomes the clone's managed save: its first start loads it (a fork).
  const ram = s.memory && s.vmstateFile ? [join(dir, VM_FILES.managedSave)] : []
  const j: CloneJournal = { source, snapshot, name: input.name, linked, files: [...disks.flatMap((x) => [x.file, ...(x.base ? [x.base] : [])]), ...ram] }
  // Files left by an earlier VM of that name (deleted without its storage) are never touched.
  for (const f of j.files) if (existsSync(f)) throw new QmpdError('FILE_EXISTS', `${f} exists (left by an earlier VM named ${input.name}?); qmpd never overwrites a file`, { file: f })
  const job = d.jobs.submit({ vm: source, op: CLONE_OP, params: { snapshot, name: input.name, linked }, run: (ctx) => doClone(d, def, disks, input, j, ctx) })
  const done = await d.jobs.wait(job.id, 24 * 3600_000)
  if (done.state !== 'succeeded') {
    const e = done.error ?? { code: 'INTERNAL', message: `clone job ${job.id} ended ${done.state}` }
    throw new QmpdError(e.code as QmpdError['code'], e.message, { ...e.details, job: job.id })
  }
  const start = input.start ? await startClone(d, input.name, isInternalCheckpoint(s) ? s.name : undefined, busyCheck) : undefined
  // The view, plus what the clone job did (its warnings: a fork's NIC caveat) and the start's outcome.
  return { ...(await d.vms.view(input.name)), clone: { ...(done.result as object), ...(start ? { start } : {}) } }
}

/**
 * `start: true`: starts the defined clone in its own queue. A failed start leaves the clone defined
 * (the request still answers 201): its outcome says why.
 */
async function startClone(d: SnapshotDeps, name: string, checkpoint: string | undefined, busyCheck: (vm: string, what: string) => void): Promise<{ job?: string; state: string; error?: unknown }> {
  try {
    // A fork of an internal checkpoint starts by a revert to its own copy of it (RAM included).
    const job = checkpoint ? submitRevert(d, busyCheck, name, checkpoint, { state: 'running' }) : d.vms.start(name, {})
    const done = await d.jobs.wait(job.id, 24 * 3600_000)
    return { job: job.id, state: done.state, ...(done.error ? { error: done.error } : {}) }
  } catch (err) {
    // Refused before queueing (BUSY, INVALID_STATE): no job.
    return { state: 'refused', error: err instanceof QmpdError ? { code: err.code, message: err.message } : { code: 'INTERNAL', message: String(err) } }
  }
}

/** The recorded definition a clone starts from. */
function cloneableDefinition(s: Snapshot): VmDefinition {
  const def = s.definition
  if (!def) throw new QmpdError('NOT_SUPPORTED', `snapshot ${s.name} was taken before qmpd recorded definitions with snapshots: it cannot be cloned`, { snapshot: s.name })
  if (isAdopted(def)) throw new QmpdError('NOT_SUPPORTED', `snapshot ${s.name} is of an adopted VM: qmpd does not know its QEMU command line`, { snapshot: s.name })
  if (s.memory && s.kind === 'external' && !s.vmstateFile) throw new QmpdError('NOT_SUPPORTED', `checkpoint ${s.name} has no RAM state file`, { snapshot: s.name })
  if (def.firmware === 'uefi') throw new QmpdError('NOT_SUPPORTED', `snapshot ${s.name} is of a UEFI VM: cloning its NVRAM is not implemented yet`, { snapshot: s.name })
  return def
}

async function doClone(d: SnapshotDeps, def: VmDefinition, disks: ClonedDisk[], input: CloneDefinition, j: CloneJournal, ctx: JobContext): Promise<unknown> {
  const s = mustSnapshot(d, j.source, j.snapshot)
  const fork = isInternalCheckpoint(s)
  const qemuRuns = isRunningState(d.vms.record(j.source).runtime.state)
  const dir = d.paths.vmDir(j.name)
  const o = d.journal.begin({ vm: j.source, op: CLONE_OP, job: ctx.id, body: j })
  // Removals of the files this clone reserved (reserveFiles registers one per file it made).
  const undo: Array<() => unknown> = []
  try {
    await o.step('files', async () => {
      mkdirSync(dir, { recursive: true })
      await reserveFiles(j.files.map((f) => d.paths.confine(f, 'clone disk')), { add: (_what, fn) => undo.push(fn) })
      // A fork of an internal checkpoint: whole copies keep the tag (its vmstate); the source is stopped.
      if (fork && isRunningState(d.vms.record(j.source).runtime.state)) await assertForkable(d, j.source, s, false)
      for (const [i, x] of disks.entries()) {
        await d.qemuImg.guard(x.from.file, x.from.format, `snapshot ${j.snapshot} disk ${x.spec.id}`)
        if (fork) {
          await copyForkDisk(d, x.from, x.file, j.snapshot)
          continue
        }
        if (j.linked && x.from.mode === 'external') {
          await d.qemuImg.create(x.file, 'qcow2', { backing: { file: x.from.file, format: x.from.format } })
          continue
        }
        const target = x.base ?? x.file
        await d.qemuImg.runWithProgress(convertArgs(x.from, j.snapshot, x.base ? 'qcow2' : x.format, target, qemuRuns), (pct) => ctx.setProgress(i * 100 + pct, disks.length * 100), ctx.signal)
        if (x.base) await d.qemuImg.create(x.file, 'qcow2', { backing: { file: x.base, format: 'qcow2' } })
      }
      // A copy, not a link: the start that loads it removes the clone's managed save afterwards.
      if (s.memory && s.vmstateFile) await copyFile(d.paths.confine(s.vmstateFile, 'RAM state file'), join(dir, VM_FILES.managedSave))
    })
    const clone: VmDefinition = {
      ...def,
      name: j.name,
      disks: disks.map((x) => {
        const { sizeMiB: _s, ...spec } = x.spec
        return { ...spec, file: x.file, format: x.format }
      }),
      // New MACs: define assigns one to every NIC without.
      ...(def.nics ? { nics: def.nics.map(({ mac: _m, ...n }) => n) } : {}),
    }
    delete clone.labels
    if (input.labels) clone.labels = input.labels
    await o.step('define', async () => {
      await d.vms.define(clone)
      d.vms.updateRuntime(j.name, { createdFiles: [...d.vms.record(j.name).runtime.createdFiles, ...j.files] })
      // An external checkpoint's RAM state is the clone's managed save; a fork of an internal one stays shutoff.
      if (s.memory && !fork) d.vms.markSaved(j.name)
    })
    await o.step('record', () => {
      if (fork) recordFork(d, s, j.name)
    })
    await o.step('pin', () => {
      if (j.linked && s.disks.some((x) => x.mode === 'external')) d.repo.put({ ...s, clones: [...new Set([...(s.clones ?? []), j.name])] })
    })
    o.end()
  } catch (err) {
    // define() refused (or a copy failed): nothing of the clone stays (only files it reserved go).
    if (!d.vms.has(j.name)) for (const u of undo) u()
    o.end()
    throw err
  }
  ctx.log.info({ clone: j.name, snapshot: j.snapshot, linked: j.linked }, 'vm cloned from a snapshot')
  const warnings: string[] = s.memory && def.nics?.length
    ? ['the RAM state carries the source\'s NIC state: until the guest resets its NICs it keeps using the source\'s MAC addresses and IP configuration; do not put both VMs on one network segment']
    : []
  if (fork) warnings.push(`the clone holds checkpoint ${j.snapshot} as its own snapshot: revert to it (or ask start: true) to run on from its RAM state; a plain start boots from its disks`)
  return { vm: j.name, snapshot: j.snapshot, linked: j.linked, files: j.files, ramState: s.memory, warnings }
}

function removeFiles(j: CloneJournal): void {
  for (const f of j.files) rmSync(f, { force: true })
}

/** The linked clones that still exist of `s` and of every snapshot below it in the tree. */
export function linkedClones(d: SnapshotDeps, vm: string, s: Snapshot): string[] {
  const all = d.repo.list(vm)
  const out = new Set<string>()
  const walk = (x: Snapshot): void => {
    for (const c of x.clones ?? []) if (d.vms.has(c)) out.add(c)
    for (const child of all.filter((y) => y.parent === x.name)) walk(child)
  }
  walk(s)
  return [...out].sort()
}

/**
 * Refuses to delete a snapshot while a linked clone reads its frozen image or one layered on it
 * (a delete merges images into or out of the chain below the snapshots that stay).
 * @throws QmpdError INVALID_STATE naming the clones.
 */
export function assertNoLinkedClones(d: SnapshotDeps, vm: string, name: string): void {
  const s = d.repo.get(vm, name)
  if (!s) return
  const clones = linkedClones(d, vm, s)
  if (clones.length > 0) {
    throw new QmpdError('INVALID_STATE', `snapshot ${name} of VM ${vm} is kept: linked clones read its images or images layered on them (${clones.join(', ')}); delete them first`, { vm, snapshot: name, clones })
  }
}

/**
 * Refuses DELETE /v1/vms/{vm}?deleteStorage=true of a VM whose snapshots have linked clones
 * (their overlays are backed by its frozen images).
 * @throws QmpdError INVALID_STATE naming the clones.
 */
export function assertNoClonesOfVm(d: SnapshotDeps, vm: string): void {
  const clones = [...new Set(d.repo.list(vm).flatMap((s) => (s.clones ?? []).filter((c) => d.vms.has(c))))]
  if (clones.length > 0) throw new QmpdError('INVALID_STATE', `VM ${vm} has linked clones (${clones.sort().join(', ')}) backed by its snapshot images; delete them first, or delete the VM without deleteStorage`, { vm, clones })
}

/**
 * Registers the recovery of an interrupted clone: a clone whose VM was defined is finished (the
 * source snapshot pinned for a linked one); otherwise the files it made are removed.
 */
export function registerCloneRecovery(recovery: Recovery, d: SnapshotDeps): void {
  recovery.register(CLONE_OP, async (e): Promise<RecoveryOutcome> => {
    const j = CloneJournal.parse(e.body)
    if (!d.vms.has(j.name)) {
      removeFiles(j)
      return { action: 'back', detail: `clone ${j.name} was not defined: its files are removed` }
    }
    const s = d.repo.get(j.source, j.snapshot)
    if (s && isInternalCheckpoint(s)) recordFork(d, s, j.name)
    if (j.linked && s && s.disks.some((x) => x.mode === 'external') && !s.clones?.includes(j.name)) d.repo.put({ ...s, clones: [...(s.clones ?? []), j.name] })
    const save = join(d.paths.vmDir(j.name), VM_FILES.managedSave)
    if (j.files.includes(save) && existsSync(save) && d.vms.record(j.name).runtime.state === 'shutoff') d.vms.markSaved(j.name)
    return { action: 'forward', detail: `clone ${j.name} was defined`, result: { vm: j.name } }
  })
}
