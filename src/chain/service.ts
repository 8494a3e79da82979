// BlockJobService: submits and runs block jobs (commit, pull, copy) on a disk; trusts bodies the
// HTTP layer validated, holds no SQL.
import { existsSync } from 'node:fs'
import type { Logger } from 'pino'
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import { liveChain } from '../images/graph.ts'
import type { PathPolicy } from '../images/paths.ts'
import { assertCreatable } from '../images/files.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import type { JobContext, JobManager } from '../jobs/manager.ts'
import type { Job } from '../jobs/model.ts'
import type { Journal, Operation } from '../ops/journal.ts'
import type { QmpClient } from '../qmp/index.ts'
import type { SnapshotRepo } from '../store/snapshots.ts'
import { NAME_PATTERN, PathString } from '../vm/definition.ts'
import { requireAdoptedQemu } from '../vm/adopted.ts'
import type { VmManager } from '../vm/manager.ts'
import { assertState, isRunningState } from '../vm/states.ts'
import { afterCommit, afterPull, commit, copyNode, mirror, stream, type ChainDeps } from './editor.ts'
import type { Layer } from './graph.ts'
import type { ChainJournal } from './recovery.ts'

const Speed = z.number().int().min(0).describe('bytes per second; 0 = unlimited')
const LayerRef = z.string().min(1).max(4096).describe('an image file of the chain, or the name of a snapshot whose image it is')

/** Body of POST …/disks/{disk}/commit. */
export const CommitBody = z.strictObject({
  top: LayerRef.optional().describe('default: the active layer'),
  base: LayerRef.optional().describe('default: the image right below top'),
  speedBytesPerSec: Speed.optional(),
  pivot: z.boolean().default(true).describe('active commit: switch to base once synchronized (false: the job waits in ready for complete)'),
  keepMerged: z.boolean().default(false).describe('keep the files the commit made unneeded'),
})
export type CommitBody = z.output<typeof CommitBody>

/** Body of POST …/disks/{disk}/pull. */
export const PullBody = z.strictObject({
  base: LayerRef.optional().describe('default: pull everything; the active layer becomes standalone'),
  speedBytesPerSec: Speed.optional(),
  keepMerged: z.boolean().default(false),
})
export type PullBody = z.output<typeof PullBody>

/** Body of POST …/disks/{disk}/copy. */
export const CopyBody = z.strictObject({
  dest: PathString.describe('new file, created by qmpd (must not exist)'),
  format: z.enum(['qcow2', 'raw']).default('qcow2'),
  shallow: z.boolean().default(false).describe('copy only the active layer; the copy gets the same backing file'),
  pivot: z.boolean().default(false).describe('switch the VM to the copy once synchronized; false: the job stays ready (mirroring) until complete or cancel'),
  speedBytesPerSec: Speed.optional(),
})
export type CopyBody = z.output<typeof CopyBody>

/**
 * Backing-chain work on one disk: commit (merge layers down), pull (block-stream: copy backing
 * data up into the active layer) and copy (blockdev-mirror to a new file, with or without pivot);
 * live through QEMU block jobs, offline through qemu-img, both done by the chain editor
 * (editor.ts). This service validates requests, claims the disk, submits the job, gives it its
 * controls (speed, pause, complete) and never lets a merge change what a snapshot or another
 * branch reads (guardWrites).
 */
export class BlockJobService {
  /** vm -> disk -> qmpd job id of the block job running on it. */
  private readonly active = new Map<string, Map<string, string>>()

  /** Refuses a block job while an NBD export pins the VM's graph (set by the daemon). */
  exportCheck: (vm: string, what: string) => void = () => {}

  constructor(
    private readonly deps: {
      vms: VmManager
      jobs: JobManager
      /** The snapshot service, for its repository (the snapshot tree and the image graph). */
      snapshots: { readonly repo: SnapshotRepo }
      paths: PathPolicy
      qemuImg: QemuImg
      journal: Journal
      log: Logger
      /** Right before a copy's pivot, with the copy's node and file (backup chains carry their bitmaps into it). */
      beforePivot?: (vm: string, disk: string, qmp: QmpClient, node: string, file: string) => Promise<void>
    },
  ) {}

  /**
   * Runs a block job's work as a journaled operation (op = the job's kind): recovery
   * (chain/recovery.ts) reads from QEMU's graph and the files whether it finished.
   */
  private async journaled<T>(vm: string, ctx: JobContext, body: ChainJournal, fn: (o: Operation) => Promise<T>): Promise<T> {
    try {
      return await this.deps.journal.run({ vm, op: body.job, job: ctx.id, body, qemuPid: () => this.deps.vms.record(vm).runtime.pid }, fn)
    } catch (err) {
      throw noSpace(err, body.job === 'copy' ? body.dest : undefined) ?? err
    }
  }

  /** What the chain editor works with. */
  private get editor(): ChainDeps {
    return { vms: this.deps.vms, repo: this.deps.snapshots.repo, qemuImg: this.deps.qemuImg }
  }

  /** The job id of a block job running on the disk (any disk when omitted), if there is one. */
  busy(vm: string, disk?: string): string | undefined {
    const m = this.active.get(vm)
    if (!m) return undefined
    return disk ? m.get(disk) : m.values().next().value
  }

  /** Refuses an operation on a VM or disk that a block job is working on (409 BUSY). */
  assertIdle(vm: string, what: string, disk?: string): void {
    const job = this.busy(vm, disk)
    if (job) {
      throw new QmpdError('BUSY', `cannot ${what}: block job ${job} is running on ${disk ? `disk ${disk}` : `a disk of VM ${vm}`}; complete or cancel it first`, {
        vm,
        job,
      })
    }
  }

  /**
   * Queues a commit, once `top` and `base` were found in the disk's chain as it is now (the job
   * finds them again when it runs).
   * @throws QmpdError VM_NOT_FOUND, ADOPTED_NEEDS_RELAUNCH (adopted, no QEMU), DISK_NOT_FOUND, INVALID_STATE or BUSY; INVALID_INPUT or INVALID_PATH for a
   * layer not in the chain or in the wrong order; INVALID_STATE when the merge would change what a snapshot reads; all before
   * any job is made.
   */
  async commit(vm: string, disk: string, body: CommitBody): Promise<Job> {
    this.precheck(vm, disk, 'commit')
    this.planCommit(vm, disk, (await this.chain(vm, disk)).layers, body)
    this.precheck(vm, disk, 'commit') // again: another request may have come in while the chain was read
    return this.submit(vm, disk, 'commit', body, (ctx) => this.doCommit(vm, disk, body, ctx))
  }

  /**
   * Queues a pull (block-stream into the active layer), once `base` was found in the disk's chain.
   * @throws QmpdError VM_NOT_FOUND, ADOPTED_NEEDS_RELAUNCH (adopted, no QEMU), DISK_NOT_FOUND, INVALID_STATE or BUSY;
   * INVALID_INPUT or INVALID_PATH for a base not in the chain or nothing to pull; all before any job is made.
   */
  async pull(vm: string, disk: string, body: PullBody): Promise<Job> {
    this.precheck(vm, disk, 'pull')
    this.planPull(vm, disk, (await this.chain(vm, disk)).layers, body)
    this.precheck(vm, disk, 'pull')
    return this.submit(vm, disk, 'pull', body, (ctx) => this.doPull(vm, disk, body, ctx))
  }

  /**
   * Queues a copy (blockdev-mirror, or qemu-img convert when off).
   * @throws QmpdError VM_NOT_FOUND, ADOPTED_NEEDS_RELAUNCH (adopted, no QEMU), DISK_NOT_FOUND, INVALID_INPUT, INVALID_PATH, FILE_EXISTS, INVALID_STATE or BUSY, before any job is made.
   */
  copy(vm: string, disk: string, body: CopyBody): Job {
    this.precheck(vm, disk, 'copy')
    const dest = this.deps.paths.resolve(body.dest, this.deps.paths.vmDir(vm), 'dest')
    // First: a FIFO or device in the way is a bad path (400), a regular file an existing one (409).
    assertCreatable(dest, 'dest')
    if (existsSync(dest)) throw new QmpdError('FILE_EXISTS', `${dest} exists; qmpd never overwrites a file`, { file: dest })
    if (body.shallow && body.format !== 'qcow2') throw new QmpdError('INVALID_INPUT', 'a shallow copy needs qcow2 (it keeps a backing file)', {})
    return this.submit(vm, disk, 'copy', { ...body, dest }, (ctx) => this.doCopy(vm, disk, { ...body, dest }, ctx))
  }

  private precheck(vm: string, disk: string, op: 'commit' | 'pull' | 'copy'): void {
    const rec = this.deps.vms.record(vm)
    requireAdoptedQemu(vm, rec.definition, rec.runtime, `a ${op} block job`)
    if (!rec.runtime.disks.some((d) => d.id === disk)) throw new QmpdError('DISK_NOT_FOUND', `VM ${vm} has no disk ${disk}`, { vm, disk })
    assertState(vm, rec.runtime.state, op)
    this.assertIdle(vm, 'start another block job', disk)
    this.exportCheck(vm, `start a ${op} block job`)
    if (this.deps.jobs.busy(vm)) throw new QmpdError('BUSY', `VM ${vm} has operations queued or running; start the block job when they are done`, { vm })
  }

  private submit(vm: string, disk: string, op: string, params: unknown, run: (ctx: JobContext) => Promise<unknown>): Job {
    let jobId = ''
    const job = this.deps.jobs.submit({
      vm,
      op,
      params: { disk, ...(params as object) },
      cancellableWhileRunning: true,
      queue: `${vm}#disk:${disk}`,
      run: async (ctx) => {
        this.mark(vm, disk, ctx.id)
        try {
          return await run(ctx)
        } finally {
          this.active.get(vm)?.delete(disk)
        }
      },
    })
    jobId = job.id
    // Claimed at once, so a second request for the disk is refused while this one waits in the queue.
    this.mark(vm, disk, jobId)
    return job
  }

  private mark(vm: string, disk: string, id: string): void {
    let m = this.active.get(vm)
    if (!m) this.active.set(vm, (m = new Map<string, string>()))
    m.set(disk, id)
  }

  /** The disk's chain, top first: QEMU's when it runs, qemu-img's when it is off. */
  private async chain(vm: string, disk: string): Promise<{ layers: Layer[]; qmp?: QmpClient }> {
    const rec = this.deps.vms.record(vm)
    if (isRunningState(rec.runtime.state)) {
      const qmp = this.deps.vms.qmp(vm)
      return { layers: await liveChain(qmp, disk), qmp }
    }
    const active = rec.runtime.disks.find((d) => d.id === disk)!
    // qemu-img confines and checks every layer from the headers before it opens any (QemuImg.guard).
    const info = await this.deps.qemuImg.chain(active.file, { format: active.format })
    return { layers: info.map((l) => ({ file: l.filename, format: l.format })) }
  }

  /** Finds a layer by file (absolute, or relative to the VM directory) or by snapshot name. */
  private find(vm: string, disk: string, layers: Layer[], ref: string, field: string): number {
    let file: string | undefined
    if (NAME_PATTERN.test(ref)) {
      const snap = this.deps.snapshots.repo.get(vm, ref)
      const d = snap?.disks.find((x) => x.id === disk && x.mode === 'external')
      if (d) file = d.file
    }
    file ??= this.deps.paths.resolve(ref, this.deps.paths.vmDir(vm), field)
    const i = layers.findIndex((l) => l.file === file)
    if (i < 0) throw new QmpdError('INVALID_INPUT', `${field} ${ref} is not in the chain of disk ${disk} (${layers.map((l) => l.file).join(' <- ')})`, { [field]: ref })
    return i
  }

  /**
   * Refuses a merge that would change what a snapshot or another branch reads: writing into an
   * image changes the view of every image layered on it outside the chain being shortened.
   */
  private guardWrites(vm: string, disk: string, layers: Layer[], written: number, merged: number[]): void {
    const snaps = this.deps.snapshots.repo.list(vm)
    const images = this.deps.snapshots.repo.images(vm).filter((i) => i.disk === disk)
    for (const idx of [...merged, written]) {
      const file = layers[idx]!.file
      const user = snaps.find((s) => s.disks.some((d) => d.id === disk && d.mode === 'external' && d.file === file))
      if (user && idx !== merged[0]) {
        throw new QmpdError(
          'INVALID_STATE',
          `${file} is the image of snapshot ${user.name}: this merge would change what it holds; delete the snapshot instead (it merges safely)`,
          { file, snapshot: user.name },
        )
      }
      const above = idx === 0 ? undefined : layers[idx - 1]!.file
      const other = images.find((i) => i.backing === file && i.file !== above && existsSync(i.file))
      if (other && idx !== merged[0]) {
        throw new QmpdError('INVALID_STATE', `${file} is also the backing of ${other.file} (another branch): this merge would change what that branch reads`, {
          file,
        })
      }
    }
  }

  /**
   * Refuses a merge that would change what an internal snapshot holds: a tag in a layer reads the
   * clusters it does not hold from that layer's backing chain, which the merge changes (`why`).
   */
  private guardTags(vm: string, disk: string, layers: Layer[], changed: number[], why: string): void {
    const files = new Set(changed.map((i) => layers[i]!.file))
    const tags = this.deps.snapshots.repo.list(vm).filter((s) => s.kind === 'internal' && s.disks.some((d) => d.id === disk && d.mode === 'internal' && files.has(d.file)))
    if (tags.length === 0) return
    const names = tags.map((s) => s.name)
    throw new QmpdError('INVALID_STATE', `internal snapshot${names.length > 1 ? 's' : ''} ${names.join(', ')} would change: ${why}; delete ${names.length > 1 ? 'them' : 'it'} first`, { disk, tags: names })
  }

  private speedControls(ctx: JobContext, qmp: QmpClient, jobId: string, opts: { complete?: boolean; beforeComplete?: () => Promise<void> }): void {
    ctx.setControls({
      pause: () => qmp.execute('job-pause', { id: jobId }).then(() => ctx.setPhase('paused')),
      resume: () => qmp.execute('job-resume', { id: jobId }).then(() => undefined),
      setSpeed: async (speed) => {
        await qmp.execute('block-job-set-speed', { device: jobId, speed })
        ctx.setSpeed(speed)
      },
      ...(opts.complete
        ? {
            complete: async () => {
              await opts.beforeComplete?.()
              await qmp.execute('job-complete', { id: jobId })
              ctx.setPhase('running')
            },
          }
        : {}),
    })
  }

  /** Maps QEMU's job statuses onto the qmpd job's phase. */
  private phase(ctx: JobContext, readyIsWaiting: () => boolean): (status: string) => void {
    return (status) => {
      if (status === 'paused' || status === 'standby') ctx.setPhase('paused')
      else if (status === 'running') ctx.setPhase('running')
      else if (status === 'ready') ctx.setPhase(readyIsWaiting() ? 'ready' : 'running')
    }
  }

  /** Where a commit's top and base are in the chain; refuses what cannot be merged (guardWrites). */
  private planCommit(vm: string, disk: string, layers: Layer[], body: CommitBody): { top: number; base: number } {
    const top = body.top ? this.find(vm, disk, layers, body.top, 'top') : 0
    const base = body.base ? this.find(vm, disk, layers, body.base, 'base') : top + 1
    if (base >= layers.length) throw new QmpdError('INVALID_INPUT', `disk ${disk}: ${layers[top]!.file} has no backing image to commit into`, { disk })
    if (base <= top) throw new QmpdError('INVALID_INPUT', `base ${layers[base]!.file} is not below top ${layers[top]!.file}`, { disk })
    const merged = Array.from({ length: base - top }, (_, i) => top + i)
    this.guardWrites(vm, disk, layers, base, merged)
    this.guardTags(vm, disk, layers, merged, 'this commit writes into the image below them')
    return { top, base }
  }

  /** Where a pull's base is in the chain (layers.length: none); refuses a pull with nothing to pull. */
  private planPull(vm: string, disk: string, layers: Layer[], body: PullBody): number {
    const base = body.base ? this.find(vm, disk, layers, body.base, 'base') : layers.length
    if (base <= 1) throw new QmpdError('INVALID_INPUT', `disk ${disk}: nothing between the active layer and ${body.base ?? 'the bottom'} to pull`, { disk })
    this.guardTags(vm, disk, layers, [0], 'this pull replaces the backing they read through')
    return base
  }

  private async doCommit(vm: string, disk: string, body: CommitBody, ctx: JobContext): Promise<unknown> {
    const { layers, qmp } = await this.chain(vm, disk)
    const { top, base } = this.planCommit(vm, disk, layers, body)
    const t0 = performance.now()
    const activeCommit = top === 0
    let pivoted = activeCommit
    const jobId = `qmpd-commit-${ctx.id.slice(0, 8)}`
    const waitForUser = activeCommit && !body.pivot
    if (qmp) {
      this.speedControls(ctx, qmp, jobId, { complete: waitForUser })
      if (body.speedBytesPerSec !== undefined) ctx.setSpeed(body.speedBytesPerSec)
    }
    const plan: ChainJournal = { job: 'commit', disk, layers: layers.map((l) => ({ file: l.file, format: l.format })), top, base, live: !!qmp, keepMerged: body.keepMerged }
    return this.journaled(vm, ctx, plan, async (o) => {
    await o.step('block-job', () => commit(this.editor, {
      disk,
      ...(qmp ? { qmp } : {}),
      layers,
      top,
      base,
      job: {
        jobId,
        log: ctx.log,
        signal: ctx.signal,
        ...(body.speedBytesPerSec ? { speed: body.speedBytesPerSec } : {}),
        onProgress: (c, t) => ctx.setProgress(c, t),
        onReady: () => !waitForUser,
        onStatus: this.phase(ctx, () => waitForUser),
      },
      progress: (p) => ctx.setProgress(p, 100),
      // qemu-img commit does not touch the image above top: point it at base by hand (QEMU rewrites it itself).
      above: { files: !qmp && top > 0 ? [layers[top - 1]!.file] : [] },
    }))
    if (qmp) {
      // A commit cancelled after READY leaves the VM on its top layer, like QEMU does.
      const now = await liveChain(qmp, disk)
      pivoted = activeCommit && now[0]?.file === layers[base]!.file
    }
    const removed = await o.step('record', () => afterCommit(this.editor, vm, disk, layers, top, base, { activeMoved: pivoted, keep: body.keepMerged }, ctx))
    return { top: layers[top]!.file, base: layers[base]!.file, pivoted, removed, ms: Math.round(performance.now() - t0) }
    })
  }

  private async doPull(vm: string, disk: string, body: PullBody, ctx: JobContext): Promise<unknown> {
    const { layers, qmp } = await this.chain(vm, disk)
    const base = this.planPull(vm, disk, layers, body)
    const t0 = performance.now()
    const jobId = `qmpd-stream-${ctx.id.slice(0, 8)}`
    if (qmp) {
      this.speedControls(ctx, qmp, jobId, {})
      if (body.speedBytesPerSec !== undefined) ctx.setSpeed(body.speedBytesPerSec)
    }
    const plan: ChainJournal = { job: 'pull', disk, layers: layers.map((l) => ({ file: l.file, format: l.format })), top: 0, base, live: !!qmp, keepMerged: body.keepMerged }
    return this.journaled(vm, ctx, plan, async (o) => {
    await o.step('block-job', () => stream(this.editor, {
      disk,
      ...(qmp ? { qmp } : {}),
      into: layers[0]!,
      base: base < layers.length ? layers[base]! : null,
      job: {
        jobId,
        log: ctx.log,
        signal: ctx.signal,
        ...(body.speedBytesPerSec ? { speed: body.speedBytesPerSec } : {}),
        onProgress: (c, t) => ctx.setProgress(c, t),
        onStatus: this.phase(ctx, () => false),
      },
      progress: (p) => ctx.setProgress(p, 100),
    }))
    const removed = await o.step('record', () => afterPull(this.editor, vm, disk, layers, base, body.keepMerged, ctx))
    return { into: layers[0]!.file, base: base < layers.length ? layers[base]!.file : null, removed, ms: Math.round(performance.now() - t0) }
    })
  }

  private async doCopy(vm: string, disk: string, body: CopyBody, ctx: JobContext): Promise<unknown> {
    // Again where it is used: a directory on the way may have become a symlink since the submit.
    this.deps.paths.confine(body.dest, 'dest')
    assertCreatable(body.dest, 'dest')
    const { layers, qmp } = await this.chain(vm, disk)
    const t0 = performance.now()
    const jobId = `qmpd-copy-${ctx.id.slice(0, 8)}`
    const plan: ChainJournal = {
      job: 'copy',
      disk,
      layers: layers.map((l) => ({ file: l.file, format: l.format })),
      top: 0,
      base: body.shallow && layers.length > 1 ? 1 : layers.length,
      live: !!qmp,
      keepMerged: false,
      dest: body.dest,
      format: body.format,
    }
    const { pivoted } = await this.journaled(vm, ctx, plan, (o) => o.step('block-job', () => mirror(this.editor, {
      vm,
      disk,
      ...(qmp ? { qmp } : {}),
      layers,
      dest: body.dest,
      format: body.format,
      shallow: body.shallow,
      pivot: body.pivot,
      nodeSuffix: ctx.id.slice(0, 6),
      job: {
        jobId,
        log: ctx.log,
        signal: ctx.signal,
        ...(body.speedBytesPerSec ? { speed: body.speedBytesPerSec } : {}),
        onProgress: (c, t) => ctx.setProgress(c, t),
        onReady: () => body.pivot,
        onStatus: this.phase(ctx, () => !body.pivot),
      },
      progress: (p) => ctx.setProgress(p, 100),
      ...(qmp && this.deps.beforePivot ? { beforePivot: (node: string) => this.deps.beforePivot!(vm, disk, qmp, node, body.dest) } : {}),
      beforeJob: () => {
        const node = copyNode(disk, ctx.id.slice(0, 6))
        this.speedControls(ctx, qmp!, jobId, { complete: !body.pivot, ...(this.deps.beforePivot ? { beforeComplete: () => this.deps.beforePivot!(vm, disk, qmp!, node, body.dest) } : {}) })
        if (body.speedBytesPerSec !== undefined) ctx.setSpeed(body.speedBytesPerSec)
      },
    })))
    return { dest: body.dest, pivoted, ms: Math.round(performance.now() - t0) }
  }
}

/**
 * A block job that failed because the host's filesystem is full (qemu-img's or QEMU's "No space
 * left on device") as IO_ERROR (507), naming the file; undefined for any other failure.
 */
function noSpace(err: unknown, dest: string | undefined): QmpdError | undefined {
  if (!(err instanceof QmpdError) || err.code === 'IO_ERROR') return undefined
  const text = [err.message, err.data['stderr'], err.data['desc']].filter((x) => typeof x === 'string').join('\n')
  if (!/No space left on device|ENOSPC/i.test(text)) return undefined
  const where = dest ? `${dest}: ` : ''
  return new QmpdError('IO_ERROR', `${where}the filesystem is full (No space left on device): ${err.message}`, { ...err.data, ...(dest ? { file: dest } : {}), cause: err.code }, { cause: err })
}
