// Snapshot export: one disk of a snapshot flattened into a new standalone image (qemu-img convert),
// as a journaled job; never writes any image of the VM.
import { closeSync, existsSync, fsyncSync, linkSync, openSync, rmSync, statSync } from 'node:fs'
import { dirname } from 'node:path'
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import type { JobContext } from '../jobs/manager.ts'
import type { Job } from '../jobs/model.ts'
import type { Recovery, RecoveryOutcome } from '../ops/recovery.ts'
import { PathString } from '../vm/definition.ts'
import { assertState, isRunningState } from '../vm/states.ts'
import { mustSnapshot, type SnapshotDeps } from './deps.ts'
import { reserveFile } from './files.ts'
import type { Snapshot, SnapshotDisk } from './model.ts'

/** Body of POST /v1/vms/{vm}/snapshots/{snap}/export. */
export const ExportBody = z.strictObject({
  file: PathString.describe('the new image (must not exist); relative paths are under the VM directory'),
  format: z.enum(['qcow2', 'raw']).default('qcow2'),
  disk: z.string().max(64).optional().describe('which disk of the snapshot (default: its only captured disk)'),
})
export type ExportBody = z.output<typeof ExportBody>

/** Journal name of a snapshot export. */
export const EXPORT_OP = 'snapshot-export'

/** What an export's journal entry holds: the final file and the partial one qemu-img writes. */
export const ExportJournal = z.strictObject({ snapshot: z.string(), disk: z.string(), file: z.string(), partial: z.string() })
export type ExportJournal = z.output<typeof ExportJournal>

/** The name qemu-img writes to until the image is whole; only then is it linked to its final name. */
export function partialExport(file: string): string {
  return `${file}.qmpd-partial`
}

/** The disk of a snapshot an export reads (the only captured one unless `disk` names one). */
export function exportDisk(s: Snapshot, disk: string | undefined): SnapshotDisk {
  const captured = s.disks.filter((x) => x.mode !== 'excluded')
  if (disk !== undefined) {
    const d = captured.find((x) => x.id === disk)
    if (!d) throw new QmpdError('DISK_NOT_FOUND', `snapshot ${s.name} holds no disk ${disk} (it holds: ${captured.map((x) => x.id).join(', ') || 'none'})`, { snapshot: s.name, disk })
    return d
  }
  if (captured.length !== 1) {
    throw new QmpdError('INVALID_INPUT', `snapshot ${s.name} holds ${captured.length} disks (${captured.map((x) => x.id).join(', ') || 'none'}): name one with "disk"`, { snapshot: s.name })
  }
  return captured[0]!
}

/**
 * The qemu-img convert arguments that read a snapshot's disk as the snapshot left it.
 * External: the frozen image with its backing chain; QEMU holds it read-only (a backing node
 * takes no write permission), so qemu-img opens it under the normal image locks, without -U:
 * were anything to write it (a commit), the lock would refuse rather than copy a torn image.
 * Internal: the tag (-l snapshot.name). While a QEMU has the qcow2 open for writing, its lock
 * forbids any other open, so the read is forced (-U); that is safe for the tag's data: every
 * cluster and L2 table the tag references has a refcount above one and QEMU copies on write
 * instead of touching it, the tag's own L1 table is never rewritten, and the snapshot table only
 * changes by a snapshot create or delete, which queue behind this export in the VM's queue.
 * qemu-img reads the header and snapshot table once at open, and a read-only open repairs nothing.
 */
export function convertArgs(d: SnapshotDisk, snapshot: string, format: 'qcow2' | 'raw', target: string, qemuRuns: boolean): string[] {
  const args = ['convert', '-p', '-f', d.format, '-O', format]
  if (d.mode === 'internal') {
    if (qemuRuns) args.push('-U')
    args.push('-l', `snapshot.name=${snapshot}`)
  }
  args.push(d.file, target)
  return args
}

/**
 * Validates an export at once (4xx before any job) and queues it in the VM's queue: a snapshot
 * delete or revert (which may merge or remove the frozen image) and a block job (which may commit
 * into it) cannot run while it reads; the VM's guest runs on meanwhile.
 * @throws QmpdError VM_NOT_FOUND, SNAPSHOT_NOT_FOUND, DISK_NOT_FOUND, INVALID_INPUT, INVALID_PATH, FILE_EXISTS, INVALID_STATE or BUSY, before any job is made.
 */
export function submitExport(d: SnapshotDeps, busyCheck: (vm: string, what: string) => void, vm: string, name: string, body: ExportBody): Job {
  const s = mustSnapshot(d, vm, name)
  const disk = exportDisk(s, body.disk)
  assertState(vm, d.vms.record(vm).runtime.state, 'snapshot-export')
  busyCheck(vm, `export snapshot ${name}`)
  const file = d.paths.resolve(body.file, d.paths.vmDir(vm), 'file')
  refuseExisting(file)
  const j: ExportJournal = { snapshot: name, disk: disk.id, file, partial: partialExport(file) }
  return d.jobs.submit({ vm, op: EXPORT_OP, params: { snapshot: name, disk: disk.id, file, format: body.format }, run: (ctx) => doExport(d, vm, j, body.format, ctx) })
}

function refuseExisting(file: string): void {
  for (const f of [file, partialExport(file)]) {
    if (existsSync(f)) throw new QmpdError('FILE_EXISTS', `${f} exists; qmpd never overwrites a file`, { file: f })
  }
}

async function doExport(d: SnapshotDeps, vm: string, j: ExportJournal, format: 'qcow2' | 'raw', ctx: JobContext): Promise<unknown> {
  const t0 = performance.now()
  // Looked up again: the queue may have run a delete of it meanwhile.
  const s = mustSnapshot(d, vm, j.snapshot)
  const disk = exportDisk(s, j.disk)
  const qemuRuns = isRunningState(d.vms.record(vm).runtime.state)
  d.paths.confine(j.file, 'file')
  refuseExisting(j.file)
  const o = d.journal.begin({ vm, op: EXPORT_OP, job: ctx.id, body: j, qemuPid: () => d.vms.record(vm).runtime.pid })
  try {
    await o.step('reserve', () => reserveFile(j.partial))
    await d.qemuImg.guard(disk.file, disk.format, `snapshot ${j.snapshot} disk ${disk.id}`)
    const args = convertArgs(disk, j.snapshot, format, j.partial, qemuRuns)
    ctx.setProgress(0, 100)
    await o.step('convert', () => d.qemuImg.runWithProgress(args, (pct) => ctx.setProgress(pct, 100), ctx.signal))
    ctx.setProgress(100, 100)
    // Durable before it has its name (CONVENTIONS 12); link() refuses a file that appeared meanwhile.
    await o.step('publish', () => publish(j))
    o.end()
  } catch (err) {
    rmSync(j.partial, { force: true })
    o.end()
    throw err
  }
  const bytes = statSync(j.file).size
  ctx.log.info({ snapshot: j.snapshot, disk: j.disk, file: j.file, format }, 'snapshot exported')
  return { snapshot: j.snapshot, disk: j.disk, file: j.file, format, sizeBytes: bytes, forceShare: disk.mode === 'internal' && qemuRuns, ms: Math.round(performance.now() - t0) }
}

function publish(j: ExportJournal): void {
  const fd = openSync(j.partial, 'r')
  try {
    fsyncSync(fd)
  } finally {
    closeSync(fd)
  }
  try {
    linkSync(j.partial, j.file)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new QmpdError('FILE_EXISTS', `${j.file} appeared while the export ran; qmpd never overwrites a file`, { file: j.file })
    throw err
  }
  rmSync(j.partial)
  const dir = openSync(dirname(j.file), 'r')
  try {
    fsyncSync(dir)
  } finally {
    closeSync(dir)
  }
}

/**
 * Registers the recovery of an interrupted export: an image that got its final name (the partial
 * file's inode linked to it) is done (forward); anything else is undone, the partial file
 * removed, so no half image ever carries the final name.
 */
export function registerExportRecovery(recovery: Recovery): void {
  recovery.register(EXPORT_OP, async (e): Promise<RecoveryOutcome> => {
    const j = ExportJournal.parse(e.body)
    const linked = e.step === 'publish' && existsSync(j.file) && (!existsSync(j.partial) || statSync(j.file).ino === statSync(j.partial).ino)
    rmSync(j.partial, { force: true })
    if (linked) return { action: 'forward', detail: `export of snapshot ${j.snapshot} to ${j.file} was whole`, result: { snapshot: j.snapshot, file: j.file } }
    return { action: 'back', detail: `export of snapshot ${j.snapshot} removed its partial file ${j.partial}` }
  })
}
