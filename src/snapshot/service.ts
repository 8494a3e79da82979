import { randomUUID } from 'node:crypto'
import type PQueue from 'p-queue'
import { closeSync, existsSync, open as fsOpen, rmSync } from 'node:fs'
import { stat } from 'node:fs/promises'
import { join } from 'node:path'
import type { Logger } from 'pino'
import { QmpdError } from '../errors.ts'
import { liveChain, liveInternalSnapshots, noteTopNodes, pruneDetachedNodes, topNodes, type LiveLayer } from '../images/graph.ts'
import type { PathPolicy } from '../images/paths.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import type { JobContext, JobManager } from '../jobs/manager.ts'
import type { Job } from '../jobs/model.ts'
import { commitJob, driveQemuJob, streamJob } from '../jobs/qemu-job.ts'
import { withReverter } from '../jobs/reverter.ts'
import type { QmpClient, TransactionAction } from '../qmp/index.ts'
import { QgaClient, withFrozenFilesystems } from '../qga/client.ts'
import { loadRamState, saveRamState, stateSocket } from '../state/ramfile.ts'
import type { ImageRow, SnapshotRepo } from '../store/snapshots.ts'
import { VM_FILES } from '../vm/argv.ts'
import { isAdopted, type VmDefinition, type VmRuntime, type VmState } from '../vm/definition.ts'
import { trackDowntime } from '../vm/downtime.ts'
import type { VmManager } from '../vm/manager.ts'
import { assertState, isRunningState } from '../vm/states.ts'
import { CreateSnapshotBody, RevertBody, type Snapshot, type SnapshotDisk } from './model.ts'

/** A snapshot as the API shows it: the stored record plus its place in the tree and its size. */
export interface SnapshotView extends Snapshot {
  children: string[]
  current: boolean
  /** Bytes on disk of what only this snapshot holds (frozen images, RAM state). */
  sizeBytes: number
}

/** Hooks for tests to inject faults QEMU would not produce on demand; never reachable over HTTP. */
export interface SnapshotTestHooks {
  /** May append actions to the disk transaction (e.g. one that fails) or observe the guest before it is sent. */
  transaction?: (actions: TransactionAction[]) => void | Promise<void>
  /** false: behave as if userfaultfd write-protect were missing (exercises the pre-copy fallback). */
  backgroundSnapshot?: boolean
}

/** QMP sessions whose QEMU accepted the background-snapshot capability. */
const backgroundSnapshotSupport = new WeakSet<QmpClient>()

/** The plan of a snapshot creation, recorded in the journal before anything is touched. */
interface CreatePlan {
  snapshot: Snapshot
  /** external: per disk, the overlay to create on top of the current active file. */
  overlays: Array<{ id: string; file: string; format: 'qcow2' | 'raw'; overlay: string }>
}

type Live = { qmp: QmpClient; running: boolean }

/**
 * Every kind of snapshot: internal disk snapshots and system checkpoints inside qcow2, external
 * disk snapshots and checkpoints (overlays + RAM state file), memory-only checkpoints; their tree,
 * revert (also of external ones, onto any branch) and delete (merging external images out).
 */
export class SnapshotService {
  /** Refuses work on a VM whose disks a block job is busy with (set by the daemon). */
  busyCheck: (vm: string, what: string) => void = () => {}

  constructor(
    private readonly deps: {
      vms: VmManager
      jobs: JobManager
      repo: SnapshotRepo
      paths: PathPolicy
      qemuImg: QemuImg
      /** Host-wide slots for disk-only snapshots switching disks in QEMU (config.parallelDiskSnapshots). */
      diskSwitches: PQueue
      log: Logger
      hooks?: SnapshotTestHooks
    },
  ) {}

  // ---------- reads ----------

  /** All snapshots of a VM, oldest first, with children, current flag and size. */
  async list(vm: string): Promise<SnapshotView[]> {
    const rec = this.deps.vms.record(vm)
    const all = this.deps.repo.list(vm)
    const internal = await this.internalSizes(vm, all)
    return Promise.all(all.map((s) => this.view(s, all, rec.runtime.currentSnapshot, internal)))
  }

  /** One snapshot (404 when unknown). `externalSize`: its size, when the caller has it on the way. */
  async get(vm: string, name: string, externalSize?: Promise<number>): Promise<SnapshotView> {
    const s = this.must(vm, name)
    const all = this.deps.repo.list(vm)
    const internal = await this.internalSizes(vm, [s])
    return this.view(s, all, this.deps.vms.record(vm).runtime.currentSnapshot, internal, externalSize)
  }

  private async view(s: Snapshot, all: Snapshot[], current: string | undefined, internal: Map<string, number>, externalSize?: Promise<number>): Promise<SnapshotView> {
    let size = 0
    if (s.kind === 'external') {
      size = await (externalSize ?? externalBytes(s))
    } else {
      size = internal.get(s.name) ?? 0
    }
    return { ...s, children: all.filter((c) => c.parent === s.name).map((c) => c.name), current: current === s.name, sizeBytes: size }
  }

  /** RAM state size of internal checkpoints, from QEMU when it runs, else from qemu-img. */
  private async internalSizes(vm: string, snaps: Snapshot[]): Promise<Map<string, number>> {
    const out = new Map<string, number>()
    const wanted = snaps.filter((s) => s.kind === 'internal' && s.memory && s.vmstateDisk)
    if (wanted.length === 0) return out
    let byFile: Map<string, Array<{ name: string; vmStateSize: number }>>
    const rt = this.deps.vms.record(vm).runtime
    if (isRunningState(rt.state)) {
      byFile = await liveInternalSnapshots(this.deps.vms.qmp(vm)).catch(() => new Map())
    } else {
      byFile = new Map()
      for (const d of rt.disks) {
        const info = await this.deps.qemuImg.chain(d.file, { forceShare: true }).catch(() => [])
        for (const l of info) byFile.set(l.filename, (l.snapshots ?? []).map((x) => ({ name: x.name, vmStateSize: x['vm-state-size'] })))
      }
    }
    for (const s of wanted) {
      const file = s.disks.find((d) => d.id === s.vmstateDisk)?.file
      const tag = file ? byFile.get(file)?.find((t) => t.name === s.name) : undefined
      if (tag) out.set(s.name, tag.vmStateSize)
    }
    return out
  }

  private must(vm: string, name: string): Snapshot {
    this.deps.vms.record(vm)
    const s = this.deps.repo.get(vm, name)
    if (!s) throw new QmpdError('SNAPSHOT_NOT_FOUND', `VM ${vm} has no snapshot ${name}`, { vm, snapshot: name })
    return s
  }

  // ---------- create ----------

  /** Validates a creation request at once (4xx before any job) and queues it. */
  create(vm: string, input: CreateSnapshotBody): Job {
    const body = CreateSnapshotBody.parse(input)
    const rec = this.deps.vms.record(vm)
    if (isAdopted(rec.definition)) throw new QmpdError('NOT_SUPPORTED', `VM ${vm} was adopted; qmpd snapshots only VMs it defines`, { vm })
    this.busyCheck(vm, 'take a snapshot')
    const def = rec.definition
    if (this.deps.repo.get(vm, body.name)) throw new QmpdError('SNAPSHOT_EXISTS', `VM ${vm} already has a snapshot ${body.name}`, { vm, snapshot: body.name })
    for (const id of Object.keys(body.disks ?? {})) {
      if (!def.disks.some((d) => d.id === id)) throw new QmpdError('INVALID_INPUT', `VM ${vm} has no disk ${id}`, { vm, disk: id })
    }
    // Throws on anything wrong and changes nothing. With jobs queued ahead the VM's state will
    // change before this one runs (start, then checkpoint): the job plans again when it starts.
    const early = this.deps.jobs.busy(vm) ? undefined : { plan: this.plan(vm, body, rec.runtime.state), runtime: rec.runtime, version: this.deps.repo.version(vm) }
    return this.deps.jobs.submit({ vm, op: 'snapshot-create', params: body, run: (ctx) => this.doCreate(vm, body, ctx, early) })
  }

  /** Works out exactly what a creation will do; every refusal happens here. */
  private plan(vm: string, body: CreateSnapshotBody, state: VmState): CreatePlan {
    const rec = this.deps.vms.record(vm)
    const def = rec.definition as VmDefinition
    const live = isRunningState(state)
    assertState(vm, state, 'snapshot-create')
    const memory = body.memory ?? live
    if (memory) assertState(vm, state, 'snapshot-create-memory')
    if (body.live && !(body.kind === 'external' && memory)) {
      throw new QmpdError('INVALID_INPUT', 'live applies only to external snapshots with memory', {})
    }
    if (body.quiesce) {
      if (!def.guestAgent) throw new QmpdError('INVALID_STATE', `VM ${vm} has no guest agent (guestAgent: true): cannot quiesce`, { vm })
      assertState(vm, state, 'snapshot-create-quiesce')
      if (memory) throw new QmpdError('INVALID_INPUT', 'quiesce applies to disk-only snapshots (a checkpoint keeps RAM consistent by itself)', {})
    }
    if (body.vmstateFile && !(body.kind === 'external' && memory)) {
      throw new QmpdError('INVALID_INPUT', 'vmstateFile applies only to external snapshots with memory', {})
    }
    const existing = this.deps.repo.list(vm)
    const otherKind = existing.find((s) => s.kind !== body.kind)
    if (otherKind) {
      throw new QmpdError(
        'NOT_SUPPORTED',
        `VM ${vm} already has ${otherKind.kind} snapshot ${otherKind.name}; internal and external snapshots cannot be mixed on one VM (delete the others first)`,
        { vm },
      )
    }
    const dir = this.deps.paths.vmDir(vm)
    const disks: SnapshotDisk[] = []
    const overlays: CreatePlan['overlays'] = []
    for (const active of rec.runtime.disks) {
      const spec = body.disks?.[active.id]
      const ro = def.disks.find((d) => d.id === active.id)?.readOnly
      if (spec?.exclude || ro) {
        if (spec?.file) throw new QmpdError('INVALID_INPUT', `disk ${active.id}: file and exclude cannot go together`, { disk: active.id })
        disks.push({ id: active.id, mode: 'excluded', file: active.file, format: active.format })
        continue
      }
      if (!live && !existsSync(active.file)) {
        throw new QmpdError('INVALID_STATE', `disk ${active.id}: ${active.file} does not exist yet (qmpd creates it at the first start)`, { disk: active.id })
      }
      if (body.kind === 'internal') {
        if (active.format !== 'qcow2') {
          throw new QmpdError('INVALID_STATE', `disk ${active.id} is ${active.format}: internal snapshots need qcow2 (exclude it, or take an external snapshot)`, {
            disk: active.id,
          })
        }
        if (spec?.file) throw new QmpdError('INVALID_INPUT', `disk ${active.id}: file applies only to external snapshots`, { disk: active.id })
        disks.push({ id: active.id, mode: 'internal', file: active.file, format: active.format })
      } else {
        const overlay = this.deps.paths.resolve(spec?.file ?? `${active.id}-${body.name}.qcow2`, dir, `disks.${active.id}.file`)
        if (existsSync(overlay)) throw new QmpdError('FILE_EXISTS', `${overlay} exists; qmpd never overwrites a file`, { file: overlay })
        if (overlays.some((o) => o.overlay === overlay)) throw new QmpdError('INVALID_INPUT', `two disks cannot share the overlay ${overlay}`, { file: overlay })
        disks.push({ id: active.id, mode: 'external', file: active.file, format: active.format, overlay })
        overlays.push({ id: active.id, file: active.file, format: active.format, overlay })
      }
    }
    const captured = disks.filter((d) => d.mode !== 'excluded')
    if (captured.length === 0 && !(memory && body.kind === 'external')) {
      throw new QmpdError('INVALID_INPUT', 'every disk is excluded: nothing to snapshot (a memory-only checkpoint is external with memory)', {})
    }
    if (body.kind === 'internal' && memory && captured.length === 0) {
      throw new QmpdError('INVALID_INPUT', 'an internal checkpoint needs at least one qcow2 disk to hold the RAM state', {})
    }
    let vmstateFile: string | undefined
    if (memory && body.kind === 'external') {
      vmstateFile = this.deps.paths.resolve(body.vmstateFile ?? `${body.name}.vmstate`, dir, 'vmstateFile')
      if (existsSync(vmstateFile)) throw new QmpdError('FILE_EXISTS', `${vmstateFile} exists; qmpd never overwrites a file`, { file: vmstateFile })
    }
    const snapshot: Snapshot = {
      vm,
      name: body.name,
      ...(body.description !== undefined ? { description: body.description } : {}),
      kind: body.kind,
      memory,
      ...(rec.runtime.currentSnapshot ? { parent: rec.runtime.currentSnapshot } : {}),
      createdAt: new Date().toISOString(),
      vmState: state === 'running' ? 'running' : state === 'paused' ? 'paused' : 'shutoff',
      disks,
      ...(vmstateFile ? { vmstateFile } : {}),
      ...(body.kind === 'internal' && memory ? { vmstateDisk: captured[0]!.id } : {}),
      ...(body.live !== undefined && memory ? { live: body.live } : {}),
      ...(body.quiesce ? { quiesced: true } : {}),
    }
    return { snapshot, overlays }
  }

  private async doCreate(
    vm: string,
    body: CreateSnapshotBody,
    ctx: JobContext,
    early?: { plan: CreatePlan; runtime: VmRuntime; version: number },
  ): Promise<unknown> {
    // The VM may have changed while the job waited in the queue: unless neither its runtime
    // record nor its snapshots changed since the request was checked, plan again from what is now.
    const runtime = this.deps.vms.record(vm).runtime
    const state = runtime.state
    const unchanged = early !== undefined && early.runtime === runtime && early.version === this.deps.repo.version(vm)
    if (!unchanged && this.deps.repo.get(vm, body.name)) throw new QmpdError('SNAPSHOT_EXISTS', `VM ${vm} already has a snapshot ${body.name}`, { vm, snapshot: body.name })
    const plan = unchanged ? early.plan : this.plan(vm, body, state)
    const s = plan.snapshot
    const live: Live | undefined = isRunningState(state) ? { qmp: this.deps.vms.qmp(vm), running: state === 'running' } : undefined
    const t0 = performance.now()
    const journalId = randomUUID()
    this.deps.repo.journalAdd(journalId, vm, 'snapshot-create', plan)
    try {
      const ram: { method?: Snapshot['ramMethod'] } = {}
      let downtimeMs = 0
      if (s.kind === 'internal') downtimeMs = await this.createInternal(vm, plan, live, ctx)
      else downtimeMs = await this.createExternal(vm, plan, live, ctx, body, ram)
      if (s.kind === 'internal' && s.memory) ram.method = 'snapshot-save'
      const final: Snapshot = {
        ...s,
        downtimeMs,
        ...(live ? { qemuVersion: versionOf(live.qmp) } : {}),
        ...(ram.method ? { ramMethod: ram.method } : {}),
      }
      // The files it froze are final now: stat them (thread pool) while the metadata commits.
      const size = s.kind === 'external' ? externalBytes(final) : undefined
      size?.catch(() => {})
      this.commitCreate(vm, plan, final, journalId)
      ctx.log.info({ snapshot: s.name, kind: s.kind, memory: s.memory, downtimeMs }, 'snapshot created')
      const view = await this.get(vm, s.name, size)
      return { snapshot: view, downtimeMs, ms: Math.round(performance.now() - t0) }
    } catch (err) {
      this.deps.repo.journalDone(journalId)
      throw err
    }
  }

  /** Metadata for a created snapshot, all in one SQLite transaction with the journal entry's removal. */
  private commitCreate(vm: string, plan: CreatePlan, s: Snapshot, journalId: string): void {
    this.deps.repo.tx(() => {
      this.deps.repo.put(s)
      if (plan.overlays.length > 0) {
        const rt = this.deps.vms.record(vm).runtime
        this.ensureBaseImages(vm)
        for (const o of plan.overlays) {
          this.deps.repo.putImage({ vm, disk: o.id, file: o.overlay, format: 'qcow2', backing: o.file, createdByQmpd: true })
        }
        const disks = rt.disks.map((d) => {
          const o = plan.overlays.find((x) => x.id === d.id)
          return o ? { ...d, file: o.overlay, format: 'qcow2' as const, gen: d.gen + 1 } : d
        })
        this.deps.vms.updateRuntime(vm, { disks, currentSnapshot: s.name })
      } else {
        this.deps.vms.updateRuntime(vm, { currentSnapshot: s.name })
      }
      this.deps.repo.journalDone(journalId)
    })
  }

  /** Records the VM's original disk files as the roots of the image graph (created by the user). */
  ensureBaseImages(vm: string): void {
    const known = new Set(this.deps.repo.images(vm).map((i) => i.file))
    const rec = this.deps.vms.record(vm)
    const def = rec.definition as VmDefinition
    for (const d of def.disks) {
      if (!known.has(d.file)) {
        this.deps.repo.putImage({ vm, disk: d.id, file: d.file, format: d.format, backing: null, createdByQmpd: rec.runtime.createdFiles.includes(d.file) })
      }
    }
  }

  private async createInternal(vm: string, plan: CreatePlan, live: Live | undefined, ctx: JobContext): Promise<number> {
    const s = plan.snapshot
    const captured = s.disks.filter((d) => d.mode === 'internal')
    if (!live) {
      await withReverter(ctx.log, async (r) => {
        for (const d of captured) {
          await this.deps.qemuImg.snapshot('create', d.file, s.name)
          r.add(`delete tag in ${d.file}`, () => this.deps.qemuImg.snapshot('delete', d.file, s.name))
        }
      })
      return 0
    }
    const nodes = await topNodes(live.qmp, captured.map((d) => d.id))
    if (!s.memory) {
      const actions: TransactionAction[] = captured.map((d) => ({
        type: 'blockdev-snapshot-internal-sync',
        data: { device: nodes.get(d.id)!, name: s.name },
      }))
      await this.diskSwitch(vm, s, ctx, () => this.transaction(live.qmp, actions))
      return 0
    }
    // snapshot-save stops the guest for the whole RAM write, on QEMU's side; measure it.
    const dt = trackDowntime(live.qmp)
    const jobId = `qmpd-save-${ctx.id.slice(0, 8)}`
    await driveQemuJob(
      live.qmp,
      jobId,
      () =>
        live.qmp.execute('snapshot-save', {
          'job-id': jobId,
          tag: s.name,
          vmstate: nodes.get(s.vmstateDisk!)!,
          devices: captured.map((d) => nodes.get(d.id)!),
        }),
      { log: ctx.log, onProgress: (c, t) => ctx.setProgress(c, t), manualFinalize: false },
    )
    return dt.end()
  }

  private async createExternal(
    vm: string,
    plan: CreatePlan,
    live: Live | undefined,
    ctx: JobContext,
    body: CreateSnapshotBody,
    ram: { method?: Snapshot['ramMethod'] },
  ): Promise<number> {
    const s = plan.snapshot
    if (!live) {
      await withReverter(ctx.log, async (r) => {
        for (const o of plan.overlays) {
          await reserveFile(o.overlay)
          r.add(`remove ${o.overlay}`, () => rmSync(o.overlay, { force: true }))
          await this.deps.qemuImg.create(o.overlay, 'qcow2', { backing: { file: o.file, format: o.format } })
        }
      })
      return 0
    }
    const { qmp } = live
    return withReverter(ctx.log, async (r) => {
      // Reserve the names (O_EXCL): QEMU's blockdev-snapshot-sync would silently overwrite a file.
      await reserveFiles(plan.overlays.map((o) => o.overlay), r)
      const nodes = await topNodes(qmp, plan.overlays.map((o) => o.id))
      const gens = new Map(this.deps.vms.record(vm).runtime.disks.map((d) => [d.id, d.gen]))
      const newNode = (disk: string): string => `${disk}-f${(gens.get(disk) ?? 0) + 1}`
      const actions: TransactionAction[] = plan.overlays.map((o) => ({
        type: 'blockdev-snapshot-sync',
        data: {
          'node-name': nodes.get(o.id)!,
          'snapshot-file': o.overlay,
          'snapshot-node-name': newNode(o.id),
          format: 'qcow2',
          // Absolute backing paths in every overlay: the chain opens the same from any cwd.
          mode: 'absolute-paths',
        },
      }))
      const diskTransaction = async (): Promise<void> => {
        if (actions.length === 0) return
        const epoch = qmp.graphEpoch
        await this.transaction(qmp, actions)
        noteTopNodes(qmp, epoch, new Map(plan.overlays.map((o) => [o.id, newNode(o.id)])))
        r.add('merge the new overlays back', () => this.undoLiveOverlays(qmp, plan, ctx))
      }
      if (!s.memory) {
        await this.diskSwitch(vm, s, ctx, diskTransaction)
        return 0
      }
      const ramFile = { file: s.vmstateFile!, socket: stateSocket(this.deps.paths.vmDir(vm), true), log: ctx.log, onProgress: (c: number, t: number) => ctx.setProgress(c, t) }
      const dt = trackDowntime(qmp)
      r.add('measure', () => dt.end())
      if (body.live && live.running) {
        if (await this.backgroundSnapshotUsable(qmp, ctx)) {
          // Stop, switch disks, then a background-snapshot migration resumes the guest at once and
          // writes RAM as it was at the stop: disks and RAM are from one instant. Migration
          // capabilities and parameters are set before the stop (saveRamState's beforeMigrate).
          ram.method = 'background-snapshot'
          await saveRamState(qmp, {
            ...ramFile,
            background: true,
            beforeMigrate: async () => {
              await this.deps.vms.stopInJob(vm)
              r.add('resume the guest', () => qmp.execute('cont').catch(() => {}))
              await diskTransaction()
            },
          })
          const st = await qmp.execute('query-status')
          if (!st.running) await this.deps.vms.contInJob(vm)
          return dt.end()
        }
        ctx.log.info('background-snapshot unavailable (no userfaultfd write-protect); pre-copy with the disk switch in the final pause')
        ram.method = 'precopy'
        let downtimeMs = 0
        await saveRamState(qmp, {
          ...ramFile,
          beforeSwitchover: diskTransaction,
          afterTransfer: async () => {
            await this.deps.vms.contInJob(vm)
            downtimeMs = dt.end()
          },
        })
        return downtimeMs
      }
      // Paused checkpoint: the guest stays stopped while RAM is written, then the disks switch, so
      // a failure of either leaves the other untouched.
      ram.method = 'paused'
      if (live.running) {
        await this.deps.vms.stopInJob(vm)
        r.add('resume the guest', () => this.deps.vms.contInJob(vm).catch(() => {}))
      }
      let downtimeMs = 0
      await saveRamState(qmp, {
        ...ramFile,
        // RAM is all in the file (not yet flushed): switch the disks and let the guest go; the
        // fsync that follows does not keep it paused.
        afterTransfer: async () => {
          await diskTransaction()
          if (live.running) await this.deps.vms.contInJob(vm)
          else this.deps.vms.markPaused(vm)
          downtimeMs = dt.end()
        },
      })
      return downtimeMs
    })
  }

  /** Probes background-snapshot (userfaultfd write-protect) by setting the capability; leaves it off. */
  private async backgroundSnapshotUsable(qmp: QmpClient, ctx: JobContext): Promise<boolean> {
    if (this.deps.hooks?.backgroundSnapshot === false) return false
    // Once QEMU has accepted it, it will again: the host's userfaultfd write-protect does not go
    // away while a QEMU runs. A refusal is not kept (QEMU also refuses while a migration ends).
    if (backgroundSnapshotSupport.has(qmp)) return true
    try {
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: true }] })
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: false }] })
    } catch (err) {
      ctx.log.debug({ err }, 'background-snapshot probe failed')
      return false
    }
    backgroundSnapshotSupport.add(qmp)
    return true
  }

  /** Rolls the live overlays of a failed creation back: commit each into its backing and pivot. */
  private async undoLiveOverlays(qmp: QmpClient, plan: CreatePlan, ctx: JobContext): Promise<void> {
    for (const o of plan.overlays) {
      const chain = await liveChain(qmp, o.id)
      if (chain[0]?.file !== o.overlay || !chain[1]) continue
      const jobId = `qmpd-undo-${o.id}-${ctx.id.slice(0, 8)}`
      await commitJob(qmp, { jobId, device: chain[0]!.node, top: chain[0]!.node, base: chain[1]!.node }, { log: ctx.log })
      await pruneDetachedNodes(qmp, o.id)
    }
  }

  /** Runs the disk step with guest filesystems frozen when the snapshot asks for quiesce. */
  /**
   * The disk switch of a disk-only snapshot: in one of the host-wide slots (config
   * parallelDiskSnapshots), so that a burst on many VMs creates overlays a few at a time. A
   * quiesced snapshot takes no slot: its guest must not wait frozen for one, and a slow freeze
   * must not hold one.
   */
  private diskSwitch(vm: string, s: Snapshot, ctx: JobContext, transaction: () => Promise<void>): Promise<void> {
    if (s.quiesced) return this.quiesced(vm, s, ctx, transaction)
    return this.deps.diskSwitches.add(transaction)
  }

  private async quiesced<T>(vm: string, s: Snapshot, ctx: JobContext, fn: () => Promise<T>): Promise<T> {
    if (!s.quiesced) return fn()
    const sock = join(this.deps.paths.vmDir(vm), VM_FILES.qgaSocket)
    let qga: QgaClient
    try {
      qga = await QgaClient.connect(sock, { timeoutMs: 10_000, logger: ctx.log })
    } catch (err) {
      throw new QmpdError('QGA_UNAVAILABLE', `cannot quiesce VM ${vm}: the guest agent does not answer (${(err as Error).message})`, { vm }, { cause: err })
    }
    try {
      return await withFrozenFilesystems(qga, fn, ctx.log)
    } finally {
      qga.close()
    }
  }

  private async transaction(qmp: QmpClient, actions: TransactionAction[]): Promise<void> {
    const all = [...actions]
    await this.deps.hooks?.transaction?.(all)
    await qmp.execute('transaction', { actions: all })
  }


  // ---------- revert ----------

  /** Validates and queues a revert. */
  revert(vm: string, name: string, input: RevertBody): Job {
    const body = RevertBody.parse(input ?? {})
    const s = this.must(vm, name)
    const rec = this.deps.vms.record(vm)
    if (isAdopted(rec.definition)) throw new QmpdError('NOT_SUPPORTED', `VM ${vm} was adopted`, { vm })
    this.busyCheck(vm, 'revert')
    const st = rec.runtime.state
    assertState(vm, st, 'snapshot-revert')
    return this.deps.jobs.submit({ vm, op: 'snapshot-revert', params: { snapshot: name, ...body }, run: (ctx) => this.doRevert(vm, s.name, body, ctx) })
  }

  private async doRevert(vm: string, name: string, body: RevertBody, ctx: JobContext): Promise<unknown> {
    const s = this.must(vm, name)
    const target = body.state ?? (s.memory ? 'running' : 'shutoff')
    const loadRam = s.memory && target !== 'shutoff'
    const warnings: string[] = []
    if (s.memory && !loadRam) warnings.push('reverted to shutoff: the snapshot\'s RAM state was not loaded, only its disks')
    if (s.disks.every((d) => d.mode === 'excluded')) warnings.push('memory-only checkpoint: disks were not rolled back and may not match the restored RAM')
    else if (s.disks.some((d) => d.mode === 'excluded')) warnings.push(`disks ${s.disks.filter((d) => d.mode === 'excluded').map((d) => d.id).join(', ')} were not part of the snapshot and were not rolled back`)
    const t0 = performance.now()
    let downtimeMs: number | undefined
    if (s.kind === 'internal' && loadRam) {
      downtimeMs = await this.revertInternalCheckpoint(vm, s, target, ctx)
    } else if (s.kind === 'internal') {
      await this.deps.vms.quitInJob(vm, ctx)
      for (const d of s.disks.filter((x) => x.mode === 'internal')) await this.deps.qemuImg.snapshot('apply', d.file, s.name)
      this.deps.vms.updateRuntime(vm, { currentSnapshot: s.name })
      await this.startAs(vm, target, ctx)
    } else {
      await this.deps.vms.quitInJob(vm, ctx)
      await this.switchToSnapshotImages(vm, s, ctx)
      if (loadRam) {
        const qmp = await this.deps.vms.launchInJob(vm, ctx, { incoming: true })
        const version = versionOf(qmp)
        if (s.qemuVersion && version !== s.qemuVersion) warnings.push(`RAM state written by QEMU ${s.qemuVersion}, loaded into ${version}`)
        await loadRamState(qmp, { file: s.vmstateFile!, socket: stateSocket(this.deps.paths.vmDir(vm), true), log: ctx.log })
        if (target === 'running') await this.deps.vms.contInJob(vm)
        else this.deps.vms.markPaused(vm)
      } else {
        await this.startAs(vm, target, ctx)
      }
    }
    const state = this.deps.vms.record(vm).runtime.state
    ctx.log.info({ snapshot: name, state, warnings }, 'reverted')
    return { snapshot: name, state, ms: Math.round(performance.now() - t0), ...(downtimeMs !== undefined ? { downtimeMs } : {}), warnings }
  }

  /** snapshot-load into a QEMU that runs (started paused first when the VM is off). */
  private async revertInternalCheckpoint(vm: string, s: Snapshot, target: 'running' | 'paused' | 'shutoff', ctx: JobContext): Promise<number> {
    let st = this.deps.vms.record(vm).runtime.state
    if (!isRunningState(st)) {
      await this.deps.vms.launchInJob(vm, ctx)
      st = 'paused'
    }
    const qmp = this.deps.vms.qmp(vm)
    const captured = s.disks.filter((d) => d.mode === 'internal')
    const nodes = await topNodes(qmp, captured.map((d) => d.id))
    const dt = trackDowntime(qmp)
    // Stop first so the guest never runs between the load and a requested 'paused'.
    if (st === 'running') await this.deps.vms.stopInJob(vm)
    const jobId = `qmpd-load-${ctx.id.slice(0, 8)}`
    await driveQemuJob(
      qmp,
      jobId,
      () => qmp.execute('snapshot-load', { 'job-id': jobId, tag: s.name, vmstate: nodes.get(s.vmstateDisk!)!, devices: captured.map((d) => nodes.get(d.id)!) }),
      { log: ctx.log, onProgress: (c, t) => ctx.setProgress(c, t), manualFinalize: false },
    )
    this.deps.vms.updateRuntime(vm, { currentSnapshot: s.name })
    if (target === 'running') await this.deps.vms.contInJob(vm)
    else this.deps.vms.markPaused(vm)
    return dt.end()
  }

  private async startAs(vm: string, target: 'running' | 'paused' | 'shutoff', ctx: JobContext): Promise<void> {
    if (target === 'shutoff') return
    await this.deps.vms.launchInJob(vm, ctx)
    if (target === 'running') await this.deps.vms.contInJob(vm)
  }

  /**
   * With QEMU stopped: a fresh overlay on the snapshot's image for every captured disk becomes the
   * active layer; the layer that held the discarded state is removed unless something needs it.
   */
  private async switchToSnapshotImages(vm: string, s: Snapshot, ctx: JobContext): Promise<void> {
    const rt = this.deps.vms.record(vm).runtime
    const dir = this.deps.paths.vmDir(vm)
    const created: Array<{ id: string; file: string; backing: string; format: 'qcow2' | 'raw' }> = []
    await withReverter(ctx.log, async (r) => {
      for (const d of s.disks.filter((x) => x.mode === 'external')) {
        if (!existsSync(d.file)) throw new QmpdError('INVALID_STATE', `snapshot ${s.name}: image ${d.file} of disk ${d.id} is missing`, { file: d.file })
        const file = uniqueFile(dir, `${d.id}-${s.name}-r`, '.qcow2')
        await reserveFile(file)
        r.add(`remove ${file}`, () => rmSync(file, { force: true }))
        await this.deps.qemuImg.create(file, 'qcow2', { backing: { file: d.file, format: d.format } })
        created.push({ id: d.id, file, backing: d.file, format: d.format })
      }
    })
    const old = rt.disks
    this.deps.repo.tx(() => {
      this.ensureBaseImages(vm)
      for (const c of created) this.deps.repo.putImage({ vm, disk: c.id, file: c.file, format: 'qcow2', backing: c.backing, createdByQmpd: true })
      const disks = rt.disks.map((d) => {
        const c = created.find((x) => x.id === d.id)
        return c ? { ...d, file: c.file, format: 'qcow2' as const, gen: d.gen + 1 } : d
      })
      this.deps.vms.updateRuntime(vm, { disks, currentSnapshot: s.name })
    })
    for (const d of old) this.removeIfUnneeded(vm, d.file, ctx)
  }

  /** Files that some snapshot or the current state still reads: their images and all below them. */
  neededFiles(vm: string): Set<string> {
    const images = new Map(this.deps.repo.images(vm).map((i) => [i.file, i]))
    const roots = [
      ...this.deps.vms.record(vm).runtime.disks.map((d) => d.file),
      ...this.deps.repo.list(vm).flatMap((s) => s.disks.filter((d) => d.mode !== 'excluded').map((d) => d.file)),
    ]
    const needed = new Set<string>()
    for (let f of roots) {
      for (let guard = 0; f && !needed.has(f) && guard < 10_000; guard++) {
        needed.add(f)
        f = images.get(f)?.backing ?? ''
      }
    }
    return needed
  }

  /** Deletes an image qmpd created once nothing needs it; returns whether it did. */
  removeIfUnneeded(vm: string, file: string, ctx: { log: Logger }): boolean {
    const img = this.deps.repo.images(vm).find((i) => i.file === file)
    if (!img?.createdByQmpd || this.neededFiles(vm).has(file)) return false
    if (this.deps.repo.images(vm).some((i) => i.backing === file)) return false
    rmSync(file, { force: true })
    this.deps.repo.deleteImage(vm, file)
    ctx.log.info({ file }, 'removed an image nothing needs any more')
    return true
  }

  /** The image graph repository (block jobs keep it in step with QEMU's graph). */
  get repo(): SnapshotRepo {
    return this.deps.repo
  }

  // ---------- delete ----------

  /** Validates and queues a delete (children: the whole subtree; metadataOnly: forget, touch no file). */
  delete(vm: string, name: string, opts: { children?: boolean; metadataOnly?: boolean }): Job {
    this.must(vm, name)
    this.busyCheck(vm, `delete snapshot ${name}`)
    const rec = this.deps.vms.record(vm)
    const st = rec.runtime.state
    assertState(vm, st, 'snapshot-delete')
    return this.deps.jobs.submit({ vm, op: 'snapshot-delete', params: { snapshot: name, ...opts }, run: (ctx) => this.doDelete(vm, name, opts, ctx) })
  }

  private async doDelete(vm: string, name: string, opts: { children?: boolean; metadataOnly?: boolean }, ctx: JobContext): Promise<unknown> {
    this.must(vm, name)
    const order = opts.children ? this.subtreePostOrder(vm, name) : [name]
    const results: unknown[] = []
    for (const n of order) {
      const s = this.must(vm, n)
      const merges = opts.metadataOnly ? [] : await this.deleteData(vm, s, ctx)
      this.deps.repo.tx(() => {
        for (const c of this.deps.repo.list(vm).filter((x) => x.parent === s.name)) {
          const { parent: _drop, ...rest } = c
          this.deps.repo.put(s.parent ? { ...rest, parent: s.parent } : rest)
        }
        this.deps.repo.delete(vm, s.name)
        if (this.deps.vms.record(vm).runtime.currentSnapshot === s.name) {
          const rt = this.deps.vms.record(vm).runtime
          const { currentSnapshot: _c, ...rest } = rt
          this.deps.vms.updateRuntime(vm, s.parent ? { ...rest, currentSnapshot: s.parent } : { ...rest, currentSnapshot: undefined })
        }
      })
      results.push({ snapshot: n, merges })
      ctx.log.info({ snapshot: n, merges, metadataOnly: !!opts.metadataOnly }, 'snapshot deleted')
    }
    return { deleted: order, details: results }
  }

  private subtreePostOrder(vm: string, name: string): string[] {
    const all = this.deps.repo.list(vm)
    const out: string[] = []
    const walk = (n: string): void => {
      for (const c of all.filter((s) => s.parent === n)) walk(c.name)
      out.push(n)
    }
    walk(name)
    return out
  }

  /** Removes a snapshot's data: internal tags, or its images merged out of every chain that uses them. */
  private async deleteData(vm: string, s: Snapshot, ctx: JobContext): Promise<string[]> {
    const st = this.deps.vms.record(vm).runtime.state
    const qmp = isRunningState(st) ? this.deps.vms.qmp(vm) : undefined
    const done: string[] = []
    if (s.kind === 'internal') {
      const captured = s.disks.filter((d) => d.mode === 'internal')
      if (qmp) {
        const tags = await liveInternalSnapshots(qmp)
        const present = captured.filter((d) => tags.get(d.file)?.some((t) => t.name === s.name))
        if (present.length === 0) return done
        const nodes = await topNodes(qmp, present.map((d) => d.id))
        // Verified above: snapshot-delete of a missing tag would "succeed" silently.
        const jobId = `qmpd-del-${ctx.id.slice(0, 8)}`
        await driveQemuJob(qmp, jobId, () => qmp.execute('snapshot-delete', { 'job-id': jobId, tag: s.name, devices: present.map((d) => nodes.get(d.id)!) }), {
          log: ctx.log,
          manualFinalize: false,
        })
        done.push(...present.map((d) => `deleted tag ${s.name} in ${d.file}`))
      } else {
        for (const d of captured) {
          const info = await this.deps.qemuImg.chain(d.file)
          if (!info[0]?.snapshots?.some((t) => t.name === s.name)) continue
          await this.deps.qemuImg.snapshot('delete', d.file, s.name)
          done.push(`deleted tag ${s.name} in ${d.file}`)
        }
      }
      return done
    }
    this.ensureBaseImages(vm)
    for (const d of s.disks.filter((x) => x.mode === 'external')) done.push(...(await this.mergeOut(vm, s, d, qmp, ctx)))
    if (s.vmstateFile) {
      rmSync(s.vmstateFile, { force: true })
      done.push(`removed ${s.vmstateFile}`)
    }
    return done
  }

  /**
   * Takes image F (the snapshot's frozen image of one disk) out of every chain without changing
   * what any chain reads: no child: remove it; one child C: commit C into F (cheap: C holds only
   * what changed since), then C's users use F; several children (branches): stream F into each.
   */
  private async mergeOut(vm: string, s: Snapshot, d: SnapshotDisk, qmp: QmpClient | undefined, ctx: JobContext): Promise<string[]> {
    const F = d.file
    const images = this.deps.repo.images(vm).filter((i) => i.disk === d.id)
    const img = images.find((i) => i.file === F)
    const kids = images.filter((i) => i.backing === F && existsSync(i.file))
    const live = qmp ? await liveChain(qmp, d.id) : []
    const otherUsers = this.deps.repo.list(vm).filter((x) => x.name !== s.name && x.disks.some((y) => y.file === F && y.mode !== 'excluded'))
    if (otherUsers.length > 0) return [`${F} is still the image of snapshot ${otherUsers[0]!.name}; kept`]
    if (kids.length === 0) {
      if (img?.createdByQmpd && !live.some((l) => l.file === F)) {
        rmSync(F, { force: true })
        this.deps.repo.deleteImage(vm, F)
        return [`removed ${F}`]
      }
      return []
    }
    if (kids.length === 1) {
      const C = kids[0]!
      await this.commitInto(vm, d.id, C, F, live, qmp, ctx)
      return [`committed ${C.file} into ${F}`]
    }
    const backing = img?.backing ?? null
    const backingFormat = images.find((i) => i.file === backing)?.format ?? 'qcow2'
    for (const K of kids) await this.pullInto(vm, d.id, K, F, backing ? { file: backing, format: backingFormat } : null, live, qmp, ctx)
    this.deps.repo.tx(() => {
      for (const K of kids) this.deps.repo.putImage({ ...K, backing })
    })
    if (img?.createdByQmpd) {
      rmSync(F, { force: true })
      this.deps.repo.deleteImage(vm, F)
    } else if (img) {
      this.deps.repo.deleteImage(vm, F)
    }
    return [`streamed ${F} into ${kids.map((k) => k.file).join(', ')}${img?.createdByQmpd ? ` and removed it` : ' (your original image is left in place)'}`]
  }

  /** Commits child C into F; afterwards every user of C uses F, and C is removed. */
  private async commitInto(vm: string, disk: string, C: ImageRow, F: string, live: LiveLayer[], qmp: QmpClient | undefined, ctx: JobContext): Promise<void> {
    const ci = live.findIndex((l) => l.file === C.file)
    const fi = live.findIndex((l) => l.file === F)
    if (qmp && ci >= 0 && fi === ci + 1) {
      const jobId = `qmpd-commit-${disk}-${ctx.id.slice(0, 8)}`
      await commitJob(qmp, { jobId, device: live[0]!.node, top: live[ci]!.node, base: live[fi]!.node }, { log: ctx.log, onProgress: (c, t) => ctx.setProgress(c, t) })
      await pruneDetachedNodes(qmp, disk)
    } else if (ci >= 0) {
      throw new QmpdError('INTERNAL', `${C.file} is in the running chain but ${F} is not right below it`, { disk })
    } else {
      await this.deps.qemuImg.commit(C.file, F)
    }
    // F now holds exactly what C held: only the headers of C's children need to change. QEMU
    // rewrote the one in its running chain itself; every other branch is rebased here.
    const fFormat = this.deps.repo.images(vm).find((i) => i.file === F)?.format ?? 'qcow2'
    const rewrittenByQemu = qmp && ci > 0 ? live[ci - 1]!.file : undefined
    for (const gk of this.deps.repo.images(vm).filter((i) => i.backing === C.file && i.file !== rewrittenByQemu && existsSync(i.file))) {
      await this.deps.qemuImg.rebase(gk.file, { file: F, format: fFormat }, { unsafe: true })
    }
    this.deps.repo.tx(() => {
      for (const gk of this.deps.repo.images(vm).filter((i) => i.backing === C.file)) this.deps.repo.putImage({ ...gk, backing: F })
      for (const snap of this.deps.repo.list(vm)) {
        if (snap.disks.some((x) => x.file === C.file)) this.deps.repo.put({ ...snap, disks: snap.disks.map((x) => (x.file === C.file ? { ...x, file: F } : x)) })
      }
      const rt = this.deps.vms.record(vm).runtime
      if (rt.disks.some((x) => x.file === C.file)) {
        this.deps.vms.updateRuntime(vm, { disks: rt.disks.map((x) => (x.file === C.file ? { ...x, file: F, format: fFormatOf(this.deps.repo.images(vm), F) } : x)) })
      }
      this.deps.repo.deleteImage(vm, C.file)
    })
    rmSync(C.file, { force: true })
  }

  /** Streams F's data into child K so that K no longer needs F (K's backing becomes F's backing). */
  private async pullInto(
    _vm: string,
    disk: string,
    K: ImageRow,
    F: string,
    newBacking: { file: string; format: string } | null,
    live: LiveLayer[],
    qmp: QmpClient | undefined,
    ctx: JobContext,
  ): Promise<void> {
    const ki = live.findIndex((l) => l.file === K.file)
    if (qmp && ki >= 0) {
      const base = newBacking ? live.find((l) => l.file === newBacking.file) : undefined
      const jobId = `qmpd-stream-${disk}-${ctx.id.slice(0, 8)}`
      await streamJob(qmp, { jobId, device: live[ki]!.node, ...(base ? { base: base.node } : {}) }, { log: ctx.log, onProgress: (c, t) => ctx.setProgress(c, t) })
      await pruneDetachedNodes(qmp, disk)
    } else {
      await this.deps.qemuImg.rebase(K.file, newBacking)
    }
  }

  // ---------- crash recovery ----------

  /**
   * Finishes or undoes creations a previous daemon left half-done (journal entries): when QEMU
   * already runs on the planned overlays the snapshot happened, so its metadata is written; else
   * the reserved overlay and state files are removed.
   */
  async recover(): Promise<void> {
    for (const entry of this.deps.repo.journalPending()) {
      const plan = entry.body as CreatePlan
      const log = this.deps.log.child({ vm: entry.vm, journal: entry.id })
      try {
        const rec = this.deps.vms.record(entry.vm)
        let switched = false
        if (isRunningState(rec.runtime.state) && plan.overlays.length > 0) {
          const qmp = this.deps.vms.qmp(entry.vm)
          const chains = await Promise.all(plan.overlays.map((o) => liveChain(qmp, o.id)))
          switched = chains.every((c, i) => c[0]?.file === plan.overlays[i]!.overlay)
        }
        if (switched) {
          this.commitCreate(entry.vm, plan, plan.snapshot, entry.id)
          log.warn({ snapshot: plan.snapshot.name }, 'recovered a snapshot whose metadata was not written before a crash')
        } else {
          for (const o of plan.overlays) rmSync(o.overlay, { force: true })
          if (plan.snapshot.vmstateFile && !this.deps.repo.get(entry.vm, plan.snapshot.name)) rmSync(plan.snapshot.vmstateFile, { force: true })
          this.deps.repo.journalDone(entry.id)
          log.warn({ snapshot: plan.snapshot.name }, 'rolled back a snapshot creation interrupted by a crash')
        }
      } catch (err) {
        log.error({ err }, 'could not recover journal entry; left for the next start')
      }
    }
  }

  /** Forgets every snapshot of a deleted VM; with deleteStorage also removes the files qmpd made for them. */
  forgetVm(vm: string, deleteStorage: boolean): void {
    if (deleteStorage) {
      for (const img of this.deps.repo.images(vm)) if (img.createdByQmpd) rmSync(img.file, { force: true })
      for (const s of this.deps.repo.list(vm)) if (s.vmstateFile) rmSync(s.vmstateFile, { force: true })
    }
    this.deps.repo.deleteAllFor(vm)
  }
}

function fFormatOf(images: ImageRow[], file: string): 'qcow2' | 'raw' {
  return images.find((i) => i.file === file)?.format ?? 'qcow2'
}

/** Creates an empty file, failing if it exists: claims a name before QEMU or qemu-img writes it. */
async function reserveFile(file: string): Promise<void> {
  // One thread-pool round trip (the open creates the file); closing an empty file's fd is cheap.
  const fd = await new Promise<number>((resolve, reject) => fsOpen(file, 'wx', 0o600, (err, fd) => (err ? reject(err) : resolve(fd)))).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'EEXIST') throw new QmpdError('FILE_EXISTS', `${file} exists; qmpd never overwrites a file`, { file })
    throw new QmpdError('INVALID_PATH', `cannot create ${file}: ${err.message}`, { file })
  })
  closeSync(fd)
}

/** Reserves several files at once; each one created gets its removal in `r`, then the first failure is thrown. */
async function reserveFiles(files: string[], r: { add(what: string, fn: () => unknown): void }): Promise<void> {
  const results = await Promise.allSettled(files.map(reserveFile))
  results.forEach((res, i) => {
    if (res.status === 'fulfilled') r.add(`remove ${files[i]}`, () => rmSync(files[i]!, { force: true }))
  })
  const failed = results.find((res) => res.status === 'rejected')
  if (failed) throw failed.reason
}

function uniqueFile(dir: string, stem: string, ext: string): string {
  for (let i = 1; ; i++) {
    const f = join(dir, `${stem}${i}${ext}`)
    if (!existsSync(f)) return f
  }
}

/** Bytes on disk of what only an external snapshot holds: the images it froze and its RAM state. */
async function externalBytes(s: Snapshot): Promise<number> {
  const files = s.disks.filter((d) => d.mode === 'external').map((d) => d.file)
  if (s.vmstateFile) files.push(s.vmstateFile)
  let size = 0
  for (const bytes of await Promise.all(files.map(fileBytes))) size += bytes
  return size
}

/** Bytes allocated to a file (0 when it is missing); stat runs off the event loop. */
async function fileBytes(file: string): Promise<number> {
  try {
    return (await stat(file)).blocks * 512
  } catch {
    return 0
  }
}

function versionOf(qmp: QmpClient): string {
  const v = qmp.greeting?.version.qemu
  return v ? `${v.major}.${v.minor}.${v.micro}` : 'unknown'
}

