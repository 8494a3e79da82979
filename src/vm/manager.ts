// VmManager: VM definitions, QEMU processes, QMP sessions and run states, kept equal to the store;
// no snapshot logic.
import { spawn, type ChildProcess } from 'node:child_process'
import { rename, rm } from 'node:fs/promises'
import { existsSync, mkdirSync, openSync, closeSync, lstatSync, readFileSync, rmSync, rmdirSync, statSync } from 'node:fs'
import { join } from 'node:path'
import type { Logger } from 'pino'
import { z } from 'zod'
import type { Config } from '../config.ts'
import { QmpCommandError, QmpDisconnectedError, QmpdError, TimeoutError, toQmpdError } from '../errors.ts'
import type { EventBus } from '../events/bus.ts'
import type { PathPolicy } from '../images/paths.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import type { JobContext, JobManager } from '../jobs/manager.ts'
import type { Job } from '../jobs/model.ts'
import { OWN_JOB_PREFIX, QmpClient } from '../qmp/index.ts'
import type { VmRecord, VmRepo } from '../store/vms.ts'
import type { RowProblem } from '../store/integrity.ts'
import { isStoreWriteFailure } from '../store/db.ts'
import { deviceId } from '../images/graph.ts'
import { assertCreatable, assertRegularFile } from '../images/files.ts'
import { checkChain, type Confine } from '../images/headers.ts'
import { reserveFile } from '../snapshot/files.ts'
import { buildArgv, VM_FILES, type ActiveDisk } from './argv.ts'
import { chooseMachine } from './accel.ts'
import { assertKnownCpuModel, topologyOf } from './cpu.ts'
import { ensureNvram, findOvmf, FW_CODE_NODE, NVRAM_DISK_ID, NVRAM_FILE, nvramDisk } from './firmware.ts'
import { checkVncPort, VNC_SOCKET } from './media.ts'
import { checkNicsOnHost } from './net-host.ts'
import { assignMacs } from './nic.ts'
import { checkPassthrough, makePassthroughPolicy } from './passthrough.ts'
import { disksAfterPatch, patchedDefinition } from './patch.ts'
import {
  AdoptDefinition,
  isAdopted,
  VmDefinition,
  type StoredDefinition,
  type VmRuntime,
  type VmState,
} from './definition.ts'
import { findQemuByArg, isAlive, procInfo, waitForExit } from './proc.ts'
import { shortSocketPath } from './sockpath.ts'
import { settlesWithin, sleep } from '../util.ts'
import { loadRamState, stateSocket } from '../state/ramfile.ts'
import { assertState, isRunningState, type VmOperation } from './states.ts'

// Other code imported it from here before states.ts held it.
export { isRunningState }
import { cancelStaleMigration, contAfterMigration } from './migration.ts'
import { endStrayQemus } from './stray.ts'
import { discoverAdoptedDisks, mergeAdoptedDisks } from './adopted-disks.ts'
import { refuseRelaunch } from './adopted.ts'
import { endReceivers } from './receivers.ts'
import { ChainCache } from './chain-cache.ts'
import { LiveGraphCache } from './live-disks.ts'
import { matchesLabels, type LabelSelector } from './labels.ts'
import type { Journal } from '../ops/journal.ts'
import { START_OP, VM_DELETE_OP, type StartJournal, type VmDeleteJournal } from './plans.ts'

/** One layer of a disk's backing chain, top first. */
export interface ChainLayer {
  file: string
  format: string
  node?: string
  virtualSize?: number
  actualSize?: number
  backingFile?: string
}

/** A disk as GET /v1/vms/{vm} shows it: the chain is what QEMU (or qemu-img, when off) reports. */
export interface DiskView {
  id: string
  node?: string
  file: string
  format: string
  chain: ChainLayer[]
  chainError?: string
}

/** The public view of a VM. */
export interface VmView {
  name: string
  /** quarantined: a stored row of the VM fails its schema (never stored as a state itself). */
  state: VmState | 'quarantined'
  reason?: string
  pid?: number
  adopted: boolean
  definition: StoredDefinition
  disks: DiskView[]
  exit?: VmRuntime['exit']
  /** Where the first serial port goes (absent for adopted VMs). */
  consoles?: { serial: { log?: string; socket?: string }; vnc?: { socket: string } | { host: string; port: number } }
  /** The accelerator, CPU model and vCPU topology of the last launch (absent before the first). */
  machine?: NonNullable<VmRuntime['machine']> & { topology: ReturnType<typeof topologyOf> }
  /** Set when the store disagrees with QEMU or the files in a way reconcile could not resolve. */
  repair?: VmRuntime['repair'] & { problems?: RowProblem[] }
  createdAt: string
  updatedAt: string
}

/** What other services do when a VM is deleted: the files they made for it, and forgetting their records of it. */
export interface DeleteHook {
  files(vm: string): string[]
  forget(vm: string): void
}

/** Options of the start operation. */
export interface StartOptions {
  /** Leave the guest paused after start (QEMU's -S state) instead of running it. */
  paused?: boolean
}

/** Options of the stop operation. */
export interface StopOptions {
  force?: boolean
  timeoutSec?: number
}

/** Test hooks of the VM manager (crash tests); never set in production. */
export interface VmTestHooks {
  /** Runs right after QEMU was spawned, while the VM is 'starting' and before qmpd connects to it. */
  afterSpawn?: (vm: string, pid: number) => void | Promise<void>
}

/** In-memory side of one VM: its QMP connection, its child process and exit bookkeeping. */
interface Handle {
  name: string
  rec: VmRecord
  qmp?: QmpClient
  child?: ChildProcess
  /** Set when qmpd itself asked QEMU to go (quit, kill): its exit is a shutoff, not a crash. */
  expectingExit: boolean
  /**
   * Set from the launch of an incoming QEMU (-incoming defer) until its RAM load has ended (the
   * guest is resumed or marked paused): a QEMU whose load fails exits by itself (QEMU 10 at once,
   * 7.2 not always), racing the quit the failed job sends, so expectingExit is set meanwhile.
   */
  loadingRam?: boolean
  /** QEMU's SHUTDOWN event of the current run, if any. */
  shutdown?: { guest: boolean; reason: string }
  /** Set while qmpd's own `stop` is in flight: its STOP event needs no query-status to explain it. */
  stopping?: boolean
  /** Counts the run-state events (STOP, RESUME) seen: a query-status answer older than the last one is stale. */
  runEvents?: number
  /** Resolves when the current QEMU process has been seen to exit. */
  exited?: Promise<void>
  markExited?: () => void
  log: Logger
}

const QueryStatus = z.looseObject({ status: z.string(), running: z.boolean() })

/** setState's option for facts: recorded in memory even when the store cannot be written. */
const FACT = { fact: true } as const

/** How long QEMU gets to create its QMP socket after spawn. */
const START_CONNECT_TIMEOUT_MS = 30_000
/** How long QEMU gets to exit after `quit` before SIGKILL (Config.quitTimeoutMs overrides it). */
const QUIT_TIMEOUT_MS = 10_000
/** VM views a page of GET /v1/vms builds at the same time. */
const PAGE_WORKERS = 4
/** How long the process may linger after its QMP socket closed before we call it hung. */
const EXIT_AFTER_EOF_TIMEOUT_MS = 5_000

/**
 * Owns every VM: definitions, QEMU processes, QMP connections and run states. Every change goes
 * through the VM's job queue; reads answer at once.
 */
export class VmManager {
  private readonly handles = new Map<string, Handle>()
  private readonly deleteHooks: DeleteHook[] = []
  private chainCache?: ChainCache
  /** Running VMs' disk views, per QMP session (src/vm/live-disks.ts): no query-block per GET. */
  readonly liveDisks = new LiveGraphCache<DiskView[]>()
  /** Refuses stopping a VM whose disks a block job is busy with (set by the daemon). */
  busyCheck: (vm: string, what: string) => void = () => {}
  /**
   * Refuses a PATCH whose new runtime disks would run on an image that snapshots hold (set by the
   * daemon from the snapshot store: src/snapshot/patch-guard.ts).
   */
  patchCheck: (vm: string, before: VmDefinition, after: VmDefinition, fresh: VmRuntime['disks']) => void = () => {}

  constructor(
    private readonly deps: {
      config: Config
      repo: VmRepo
      jobs: JobManager
      bus: EventBus
      paths: PathPolicy
      qemuImg: QemuImg
      /** Starts are journaled (a start from a managed save must never lose it): vm/recovery.ts. */
      journal: Journal
      log: Logger
      hooks?: VmTestHooks
    },
  ) {}

  private get quitTimeoutMs(): number {
    return this.deps.config.quitTimeoutMs ?? QUIT_TIMEOUT_MS
  }

  /** Loads every VM from the store and re-attaches to the QEMU processes that still run. */
  async init(): Promise<void> {
    for (const rec of this.deps.repo.list()) {
      const h = this.handleFor(rec)
      // A start a crash interrupted may still need it (its recovery puts it back): keep it then.
      const needed = this.deps.journal.repo.pending(rec.name).some((e) => e.op === START_OP)
      if (!needed) await rm(join(this.deps.paths.vmDir(rec.name), VM_FILES.restoredSave), { force: true }).catch((err: unknown) =>
        h.log.warn({ err }, 'could not delete a restored managed save'),
      )
      try {
        await this.reattach(h)
      } catch (err) {
        h.log.warn({ err }, 'could not re-attach')
      }
    }
  }

  /**
   * Removes a managed save once its restore succeeded, without holding up the job: freeing ~50 MB
   * of extents takes tens of ms (more on a busy filesystem) while the guest waits for its cont, a
   * rename does not. The renamed file is deleted in the background, or at the next daemon start
   * if a crash came first: it can never be restored twice or block the next save.
   */
  private async discardRestoredSave(h: Handle, saved: string): Promise<void> {
    const gone = join(this.deps.paths.vmDir(h.name), VM_FILES.restoredSave)
    await rename(saved, gone)
    void rm(gone, { force: true }).catch((err: unknown) => h.log.warn({ err, file: gone }, 'could not delete a restored managed save'))
  }

  /** Disconnects from every QEMU; the VMs keep running and the next daemon re-attaches. */
  async close(): Promise<void> {
    await Promise.all(
      [...this.handles.values()].map(async (h) => {
        const qmp = h.qmp
        h.qmp = undefined
        if (qmp) await qmp.disconnect().catch(() => {})
        h.child?.removeAllListeners('exit')
      }),
    )
  }

  /** Validates and stores a definition (POST /v1/vms). Nothing is created on disk until start. */
  async define(input: unknown): Promise<VmView> {
    if (typeof input === 'object' && input !== null && 'adopt' in input) return this.adopt(parseInput(AdoptDefinition, input))
    const def = parseInput(VmDefinition, input)
    const dir = this.deps.paths.vmDir(def.name)
    const resolved = await this.resolveDefinition(def)
    const nvram = resolved.firmware === 'uefi' ? [nvramDisk(dir)] : []
    const runtime: VmRuntime = {
      state: 'shutoff',
      qmpSocket: join(dir, VM_FILES.qmpSocket),
      disks: [...resolved.disks.map((d) => ({ id: d.id, file: d.file, format: d.format, gen: 0 })), ...nvram],
      createdFiles: nvram.map((d) => d.file),
    }
    if (!this.deps.repo.insert({ name: def.name, definition: resolved, runtime })) {
      throw new QmpdError('VM_EXISTS', `a VM named ${def.name} already exists`, { vm: def.name })
    }
    const rec = this.deps.repo.get(def.name)!
    this.handleFor(rec)
    this.deps.log.info({ vm: def.name }, 'vm defined')
    return this.view(def.name)
  }

  /**
   * A parsed definition with every path resolved and confined, and its files checked as at define
   * (POST /v1/vms and PATCH /v1/vms/{vm} both come through here).
   * @throws QmpdError INVALID_PATH.
   */
  private async resolveDefinition(def: VmDefinition): Promise<VmDefinition> {
    if (def.cpu?.model) await assertKnownCpuModel(this.deps.config.qemuBinary, def.cpu.model)
    const dir = this.deps.paths.vmDir(def.name)
    const resolved: VmDefinition = {
      ...def,
      cpus: topologyOf(def.cpus, def.cpu).cpus,
      disks: def.disks.map((d, i) => ({ ...d, file: this.deps.paths.resolve(d.file, dir, `disks[${i}].file`) })),
      ...(def.kernel ? { kernel: this.deps.paths.resolve(def.kernel, dir, 'kernel') } : {}),
      ...(def.initrd ? { initrd: this.deps.paths.resolve(def.initrd, dir, 'initrd') } : {}),
      ...(def.nics ? { nics: assignMacs(def.nics) } : {}),
      ...(def.cdroms ? { cdroms: def.cdroms.map((c, i) => ({ ...c, file: this.deps.paths.resolve(c.file, dir, `cdroms[${i}].file`) })) } : {}),
    }
    await this.checkFiles(resolved, dir, 'define')
    await checkNicsOnHost(resolved.nics ?? [])
    await checkVncPort(resolved.vnc)
    // A UEFI VM's NVRAM is one more disk (src/vm/firmware.ts), created at the first start.
    if (resolved.firmware === 'uefi') findOvmf()
    return resolved
  }

  /**
   * PATCH /v1/vms/{vm}: applies a JSON merge patch to the stored definition of a VM that is off
   * (src/vm/patch.ts), with the checks of define; one row write, so nothing to journal.
   * @throws QmpdError VM_NOT_FOUND; NOT_SUPPORTED for an adopted VM; INVALID_STATE unless shut off
   *   or crashed; BUSY with jobs queued; INVALID_INPUT or INVALID_PATH for a bad patch (nothing changed).
   */
  async patch(name: string, patch: unknown): Promise<VmView> {
    const h = this.must(name)
    const before = h.rec.definition
    if (isAdopted(before)) throw new QmpdError('NOT_SUPPORTED', `VM ${name} was adopted: qmpd does not hold its definition`, { vm: name })
    const refuse = (): void => {
      this.expectState(h, 'vm-patch')
      if (this.deps.jobs.busy(name)) throw new QmpdError('BUSY', `VM ${name} has queued or running jobs`, { vm: name })
    }
    refuse()
    const after = await this.resolveDefinition(patchedDefinition(before, patch))
    // The file checks awaited: look again right before the write.
    refuse()
    if (h.rec.definition !== before) throw new QmpdError('BUSY', `VM ${name} changed while the patch was checked; send it again`, { vm: name })
    const disks = disksAfterPatch(before, after, h.rec.runtime.disks)
    this.patchCheck(name, before, after, disks.filter((d) => !h.rec.runtime.disks.includes(d)))
    // The NVRAM stays with the VM while it is UEFI (its variables), and is made at the next start when it becomes UEFI.
    const fresh = nvramDisk(this.deps.paths.vmDir(name))
    const nvram = after.firmware === 'uefi' ? [h.rec.runtime.disks.find((d) => d.id === NVRAM_DISK_ID) ?? fresh] : []
    const createdFiles = h.rec.runtime.createdFiles.includes(fresh.file) || nvram.length === 0 ? h.rec.runtime.createdFiles : [...h.rec.runtime.createdFiles, fresh.file]
    this.setDefinition(name, after, { disks: [...disks, ...nvram], createdFiles })
    h.log.info({ fields: Object.keys(patch as object) }, 'vm definition patched')
    return this.view(name)
  }

  /**
   * Stores a new definition with a runtime change, in one row write; inside a SnapshotRepo
   * transaction a rollback puts the previous record back in memory too (see writeRuntime).
   * @throws QmpdError INVALID_INPUT, INTERNAL, DISK_FULL or IO_ERROR from the store (nothing changed).
   */
  setDefinition(name: string, definition: StoredDefinition, patch: Partial<VmRuntime>): void {
    const h = this.must(name)
    const prev = { definition: h.rec.definition, runtime: h.rec.runtime }
    const runtime: VmRuntime = { ...prev.runtime, ...patch }
    this.deps.repo.updateDefinition(name, definition, runtime, () => {
      if (h.rec.definition === definition) h.rec.definition = prev.definition
      if (h.rec.runtime === runtime) h.rec.runtime = prev.runtime
    })
    // In place: callers may hold the record object (record()).
    h.rec.definition = definition
    h.rec.runtime = runtime
  }

  /**
   * Checks every file QEMU will open for a definition, where it is used (define, and every launch):
   * each disk, kernel and initrd is confined again (symlinks resolved now), must be a regular file
   * when it exists, and each disk's backing chain, as its headers name it, is confined down to the
   * bottom (src/images/headers.ts). A disk qmpd is to create (sizeMiB) must have somewhere to go.
   * Nothing is opened but the image headers, by qmpd, without following a late symlink.
   * @throws QmpdError INVALID_PATH.
   */
  private async checkFiles(def: VmDefinition, dir: string, when: 'define' | 'start', active: ActiveDisk[] = []): Promise<void> {
    const confine: Confine = (f, field) => this.deps.paths.confine(f, field)
    const disks = when === 'start' ? active : def.disks.map((d) => ({ id: d.id, file: d.file, format: d.format }))
    for (const [i, disk] of disks.entries()) {
      const field = when === 'start' ? `disk ${disk.id} (${disk.file})` : `disks[${i}].file`
      confine(disk.file, field)
      const spec = def.disks.find((d) => d.id === disk.id)
      if (!assertRegularFile(disk.file, field, { allowMissing: true })) {
        if (spec?.sizeMiB && disk.file === spec.file) assertCreatable(disk.file, field, { mayCreateUnder: dir })
        continue
      }
      await checkChain(disk.file, disk.format, confine, field)
    }
    for (const [field, f] of [['kernel', def.kernel], ['initrd', def.initrd]] as const) {
      if (!f) continue
      confine(f, field)
      assertRegularFile(f, field, { allowMissing: true })
    }
    // A CD-ROM is never created: it must be there, a regular file (QEMU opens it read-only as raw).
    for (const [i, cd] of (def.cdroms ?? []).entries()) {
      confine(cd.file, `cdroms[${i}].file`)
      assertRegularFile(cd.file, `cdroms[${i}].file`)
    }
  }

  /** Registers a QEMU that something else started, by its QMP socket; fails if it cannot connect. */
  private async adopt(def: AdoptDefinition): Promise<VmView> {
    if (this.deps.repo.get(def.name)) throw new QmpdError('VM_EXISTS', `a VM named ${def.name} already exists`, { vm: def.name })
    const socket = this.deps.paths.resolve(def.adopt.qmpSocket, this.deps.paths.vmDir(def.name), 'adopt.qmpSocket')
    const stored: AdoptDefinition = { name: def.name, adopt: { qmpSocket: socket }, ...(def.labels ? { labels: def.labels } : {}) }
    const log = this.deps.log.child({ vm: def.name })
    const qmp = await this.connectAdopted(socket, log)
    try {
      const status = QueryStatus.parse(await qmp.execute('query-status'))
      const pid = findQemuByArg(socket) ?? findQemuByArg(socket.split('/').pop()!)
      const info = pid ? procInfo(pid) : undefined
      const found = await discoverAdoptedDisks(qmp)
      if (found.skipped.length > 0) log.info({ skipped: found.skipped }, 'adopted QEMU: devices left out of snapshots')
      const runtime: VmRuntime = {
        ...stateFromStatus(status),
        qmpSocket: socket,
        disks: found.disks,
        createdFiles: [],
        ...(pid && info ? { pid, pidStartTime: info.startTime } : {}),
      }
      if (!this.deps.repo.insert({ name: def.name, definition: stored, runtime })) {
        throw new QmpdError('VM_EXISTS', `a VM named ${def.name} already exists`, { vm: def.name })
      }
    } catch (err) {
      await qmp.disconnect().catch(() => {})
      throw err
    }
    const h = this.handleFor(this.deps.repo.get(def.name)!)
    // Overlays and RAM state files qmpd makes for an adopted VM go under its VM directory.
    mkdirSync(this.deps.paths.vmDir(def.name), { recursive: true, mode: 0o750 })
    this.armExit(h)
    this.attach(h, qmp)
    h.log.info({ socket, pid: h.rec.runtime.pid, disks: h.rec.runtime.disks.map((d) => d.id) }, 'vm adopted')
    return this.view(def.name)
  }

  /** All VMs, quarantined ones included, by name: GET /v1/vms's pages put together. */
  async list(): Promise<VmView[]> {
    return (await this.page({ limit: Number.MAX_SAFE_INTEGER })).vms
  }

  /**
   * The view of a VM whose stored rows fail their schema: state quarantined, the reason naming
   * the table, row and issue (`repair.problems` lists every bad row), the definition as stored
   * (raw JSON, unchecked) and no disks.
   */
  private quarantinedView(name: string): VmView {
    const q = this.deps.repo.quarantine
    const found = q.get(name)!
    const raw = this.deps.repo.rawDefinition(name)
    const reason = q.reason(name)!
    return {
      name,
      state: 'quarantined',
      reason,
      adopted: typeof raw === 'object' && raw !== null && 'adopt' in raw,
      definition: (raw ?? {}) as StoredDefinition,
      disks: [],
      repair: { reason, at: found.at, problems: found.problems },
      createdAt: found.at,
      updatedAt: found.at,
    }
  }

  /**
   * GET /v1/vms: at most `limit` VMs by name, after the name `after` (the previous page's `next`).
   * Reads the VMs in memory, never the store; stopped disks' chains come from the chain cache, a
   * few VMs at a time, so a long list never holds the event loop or forks a qemu-img per disk.
   */
  async page(opts: { limit: number; after?: string; labels?: LabelSelector[] }): Promise<{ vms: VmView[]; next?: string }> {
    // Quarantined VMs (a stored row fails its schema) have no handle; they are listed as quarantined.
    // A label filter leaves them out: their stored labels cannot be trusted.
    const quarantined = new Set(opts.labels?.length ? [] : this.deps.repo.quarantine.vms())
    const handles = [...this.handles.values()].filter((h) => !opts.labels?.length || matchesLabels(h.rec.definition, opts.labels))
    const names = [...new Set([...handles.map((h) => h.name), ...quarantined])].sort()
    const from = opts.after === undefined ? 0 : names.findIndex((n) => n > opts.after!)
    const slice = from < 0 ? [] : names.slice(from, from + opts.limit)
    const views: Array<VmView | undefined> = Array.from({ length: slice.length })
    let i = 0
    const worker = async (): Promise<void> => {
      while (i < slice.length) {
        const k = i++
        const name = slice[k]!
        if (this.deps.repo.quarantine.has(name)) views[k] = this.quarantinedView(name)
        else if (this.handles.has(name)) views[k] = await this.view(name) // deleted meanwhile: left out
      }
    }
    await Promise.all(Array.from({ length: Math.min(PAGE_WORKERS, slice.length) }, worker))
    const more = from >= 0 && from + opts.limit < names.length
    return { vms: views.filter((v): v is VmView => v !== undefined), ...(more ? { next: slice.at(-1)! } : {}) }
  }

  /** The offline chain cache (built on first use). */
  private get chains(): ChainCache {
    return (this.chainCache ??= new ChainCache(this.deps.qemuImg))
  }

  /** qemu-img chain inspections the VM views ran so far (tests: a warm list runs none). */
  get chainInspections(): number {
    return this.chainCache?.inspections ?? 0
  }

  /** One VM, with its disks' chains as QEMU (or qemu-img, when it is off) reports them. */
  async view(name: string): Promise<VmView> {
    if (this.deps.repo.quarantine.has(name)) return this.quarantinedView(name)
    const h = this.must(name)
    const rt = h.rec.runtime
    return {
      name,
      state: rt.state,
      ...(rt.reason ? { reason: rt.reason } : {}),
      ...(rt.pid && isRunningState(rt.state) ? { pid: rt.pid } : {}),
      adopted: isAdopted(h.rec.definition),
      definition: h.rec.definition,
      disks: await this.diskViews(h),
      ...(rt.exit ? { exit: rt.exit } : {}),
      ...consolesOf(h.rec.definition, this.deps.paths.vmDir(name)),
      ...(rt.machine && !isAdopted(h.rec.definition) ? { machine: { ...rt.machine, topology: topologyOf(h.rec.definition.cpus, h.rec.definition.cpu) } } : {}),
      ...(rt.repair ? { repair: rt.repair } : {}),
      createdAt: h.rec.createdAt,
      updatedAt: h.rec.updatedAt,
    }
  }

  /** Whether a VM of that name is defined (quarantined ones included). */
  has(name: string): boolean {
    return this.handles.has(name) || this.deps.repo.quarantine.has(name) || this.deps.repo.get(name) !== undefined
  }

  /**
   * The record of a VM (throws VM_NOT_FOUND).
   * @throws QmpdError VM_NOT_FOUND.
   */
  record(name: string): VmRecord {
    return this.must(name).rec
  }

  /**
   * The live QMP client of a running VM, for other services (snapshots, block jobs).
   * @throws QmpdError VM_NOT_FOUND; INVALID_STATE when no QEMU runs.
   */
  qmp(name: string): QmpClient {
    const h = this.must(name)
    if (!h.qmp) throw new QmpdError('INVALID_STATE', `VM ${name} is ${h.rec.runtime.state}: no QEMU to talk to`, { vm: name, state: h.rec.runtime.state })
    return h.qmp
  }

  /** Registers code to run when a VM is deleted, before its directory is cleaned (snapshot metadata, files). */
  onDelete(hook: DeleteHook): void {
    this.deleteHooks.push(hook)
  }

  /**
   * DELETE /v1/vms/{vm}: only when QEMU is not running; deleteStorage also removes files qmpd created.
   * @throws QmpdError VM_NOT_FOUND; INVALID_STATE while QEMU runs; BUSY while jobs are queued or running.
   */
  async delete(name: string, opts: { deleteStorage?: boolean } = {}): Promise<void> {
    if (this.deps.repo.quarantine.has(name)) return this.forgetQuarantined(name, opts)
    const h = this.must(name)
    const { state } = h.rec.runtime
    if (!isAdopted(h.rec.definition)) assertState(name, state, 'vm-delete')
    if (this.deps.jobs.busy(name)) throw new QmpdError('BUSY', `VM ${name} has queued or running jobs`, { vm: name })
    this.busyCheck(name, 'delete the VM')
    const deleteStorage = !!opts.deleteStorage && !isAdopted(h.rec.definition)
    const dir = this.deps.paths.vmDir(name)
    // Every file goes into the journal first: once the records are gone nothing else names them.
    const files = deleteStorage
      ? [...new Set([...this.deleteHooks.flatMap((hook) => hook.files(name)), ...h.rec.runtime.createdFiles, ...Object.values(VM_FILES).map((f) => join(dir, f))])]
      : []
    const plan: VmDeleteJournal = { files, dir, deleteStorage }
    const o = this.deps.journal.begin({ vm: name, op: VM_DELETE_OP, body: plan })
    if (h.qmp) void h.qmp.disconnect().catch(() => {})
    h.qmp = undefined
    await o.step('forget', () => this.forget(name))
    await o.step('remove-files', () => {
      for (const f of files) rmSync(f, { force: true })
      if (deleteStorage) {
        try {
          rmdirSync(dir) // only when nothing of the user's is left in it
        } catch {
          /* not empty or absent: keep it */
        }
      }
    })
    o.end()
    h.log.info({ deleteStorage }, 'vm deleted')
  }

  /**
   * DELETE of a quarantined VM (a stored row of it fails its schema): forgets every record of it,
   * bad rows included, so that the name can be defined again; no file is removed (the records that
   * name them cannot be trusted) and a QEMU of it, if one runs, is left alone.
   * @throws QmpdError STORE_ROW_INVALID when deleteStorage is asked for.
   */
  private forgetQuarantined(name: string, opts: { deleteStorage?: boolean }): void {
    const q = this.deps.repo.quarantine
    if (opts.deleteStorage) {
      throw new QmpdError('STORE_ROW_INVALID', `VM ${name} is quarantined (${q.reason(name)}): its records cannot say which files are qmpd's; delete it without deleteStorage and remove files by hand`, { vm: name, problems: q.get(name)?.problems })
    }
    const problems = q.get(name)?.problems
    this.deps.repo.purge(name)
    this.handles.delete(name)
    this.deps.jobs.dropQueue(name)
    this.deps.log.warn({ vm: name, problems }, 'quarantined VM forgotten: its stored rows were removed, its files left as they are')
  }

  /** Forgets a VM's records (its row and, through the delete hooks, its snapshots and images) in one transaction. */
  forget(name: string): void {
    this.deps.journal.repo.tx(() => {
      for (const hook of this.deleteHooks) hook.forget(name)
      this.deps.repo.delete(name)
    })
    this.handles.delete(name)
    this.deps.jobs.dropQueue(name)
  }

  /**
   * Queues a start: spawn QEMU (-S), connect QMP, then cont unless `paused`.
   * @throws QmpdError VM_NOT_FOUND; ADOPTED_NEEDS_RELAUNCH for an adopted VM; INVALID_STATE or BUSY, before any job is made.
   */
  start(name: string, opts: StartOptions = {}): Job {
    const h = this.must(name)
    if (isAdopted(h.rec.definition)) refuseRelaunch(name, 'a start', 'qmpd starts only the QEMUs it launches')
    this.busyCheck(name, 'start the VM')
    this.expectStateToQueue(h, 'start')
    return this.deps.jobs.submit({ vm: name, op: 'start', params: opts, run: (ctx) => this.doStart(h, ctx, opts) })
  }

  /** Queues a stop: ACPI powerdown with a timeout, then quit, then SIGKILL; `force` skips the powerdown. */
  stop(name: string, opts: StopOptions = {}): Job {
    const h = this.must(name)
    this.busyCheck(name, 'stop the VM')
    this.expectStateToQueue(h, 'stop')
    return this.deps.jobs.submit({ vm: name, op: 'stop', params: opts, run: (ctx) => this.doStop(h, ctx, opts) })
  }

  /** Queues a pause (QMP stop). */
  pause(name: string): Job {
    const h = this.must(name)
    this.expectStateToQueue(h, 'pause')
    return this.deps.jobs.submit({
      vm: name,
      op: 'pause',
      params: {},
      run: async () => {
        this.expectState(h, 'pause')
        await this.stopInJob(name)
        return { state: 'paused' }
      },
    })
  }

  /** Queues a resume (QMP cont). */
  resume(name: string): Job {
    const h = this.must(name)
    this.expectStateToQueue(h, 'resume')
    return this.deps.jobs.submit({
      vm: name,
      op: 'resume',
      params: {},
      run: async () => {
        this.expectState(h, 'resume')
        const qmp = this.qmp(name)
        await qmp.execute('cont')
        this.setStateIfLive(h, qmp, 'running')
        return { state: 'running' }
      },
    })
  }

  /**
   * The escape hatch (like virsh qemu-monitor-command): sends a QMP command the passthrough policy
   * allows (src/vm/passthrough.ts: off unless --qmp-passthrough; then the allow-list), outside the
   * job queue. Every use and every refusal is logged at warn with the command: it can change the
   * VM behind qmpd's back.
   * @throws QmpdError QMP_PASSTHROUGH_DISABLED, QMP_COMMAND_NOT_ALLOWED (nothing reaches QEMU); VM_NOT_FOUND; INVALID_STATE when no QEMU runs.
   * @throws QmpdError QMP_COMMAND_REFUSED when QEMU answers the command with an error; QmpDisconnectedError, TimeoutError as QmpClient.executeUnchecked.
   */
  async qmpPassthrough(name: string, execute: string, args?: Record<string, unknown>): Promise<unknown> {
    const { qmpPassthrough, qmpAllow } = this.deps.config
    try {
      checkPassthrough(makePassthroughPolicy(qmpPassthrough, qmpAllow), execute)
    } catch (err) {
      this.deps.log.warn({ vm: name, command: execute, code: (err as QmpdError).code }, 'qmp passthrough refused')
      throw err
    }
    const h = this.must(name)
    h.log.warn({ command: execute }, 'qmp passthrough')
    try {
      return await this.qmp(name).executeUnchecked(execute, args)
    } catch (err) {
      // The client's own command, refused by QEMU (no such command, bad arguments, wrong state):
      // the client's error, not a failure of qmpd's upstream.
      if (!(err instanceof QmpCommandError)) throw err
      throw new QmpdError('QMP_COMMAND_REFUSED', `QEMU refused ${execute}: ${err.desc}`, { vm: name, command: execute, qmpClass: err.qmpClass, desc: err.desc }, { cause: err })
    }
  }

  /**
   * A job's error restated from the VM's fate: a QMP connection lost under the job because QEMU
   * crashed (killed, or exited on its own) is VM_CRASHED, with the crash's reason. Waits a little
   * for the exit to be recorded only when QEMU is already gone (the socket's EOF arrives before the
   * exit is handled); answers at once otherwise, so a job ended by the daemon's own shutdown (QEMU
   * still runs) is recorded before the store closes.
   */
  explainJobError(name: string, err: QmpdError): QmpdError | Promise<QmpdError> {
    if (err.code !== 'QMP_DISCONNECTED') return err
    const h = this.handles.get(name)
    if (!h) return err
    const crashed = (): QmpdError => {
      const { state, reason } = h.rec.runtime
      if (state !== 'crashed') return err
      return new QmpdError('VM_CRASHED', `QEMU of VM ${name} crashed during the job: ${reason ?? 'exited'}`, { vm: name, reason }, { cause: err })
    }
    const pid = h.rec.runtime.pid
    if (!isRunningState(h.rec.runtime.state) || pid === undefined || isAlive(pid, h.rec.runtime.pidStartTime) || !h.exited) return crashed()
    return settlesWithin(h.exited, EXIT_AFTER_EOF_TIMEOUT_MS).then(crashed)
  }

  /** Persists a new runtime for the VM (used by the services above this one). */
  updateRuntime(name: string, patch: Partial<VmRuntime>): VmRuntime {
    const h = this.must(name)
    this.writeRuntime(h, { ...h.rec.runtime, ...patch })
    return h.rec.runtime
  }

  /**
   * Stores a runtime, then mirrors it in memory. Inside a SnapshotRepo/JournalRepo transaction the
   * store write may still roll back: the previous runtime is put back then, so record() never
   * shows what the store does not hold.
   */
  private writeRuntime(h: Handle, next: VmRuntime, opts: { fact?: boolean } = {}): void {
    const prev = h.rec.runtime
    try {
      this.deps.repo.updateRuntime(h.name, next, () => {
        if (h.rec.runtime === next) h.rec.runtime = prev
      })
      this.unsaved.delete(h.name)
    } catch (err) {
      // A fact (QEMU exited, stopped, lost its monitor) happened whether or not the store can say
      // so: memory follows it, the row is written once the store can be (or reconciled at the next
      // start from /proc), and the event or exit handler that called goes on.
      if (!opts.fact || !isStoreWriteFailure(err)) throw err
      if (!this.unsaved.has(h.name)) h.log.error({ err, state: next.state }, 'cannot record the VM state (disk full?); kept in memory, written when the store can be')
      this.unsaved.add(h.name)
      this.retryUnsaved()
    }
    h.rec.runtime = next
  }

  /** VMs whose runtime in memory is newer than their row (a write the disk refused). */
  private readonly unsaved = new Set<string>()
  private unsavedTimer: NodeJS.Timeout | undefined

  /** Writes the runtimes a full disk refused, every 5 s until all are written. */
  private retryUnsaved(): void {
    if (this.unsavedTimer) return
    this.unsavedTimer = setInterval(() => {
      for (const name of [...this.unsaved]) {
        const h = this.handles.get(name)
        if (!h) {
          this.unsaved.delete(name)
          continue
        }
        try {
          this.deps.repo.updateRuntime(name, h.rec.runtime)
          this.unsaved.delete(name)
          h.log.info({ state: h.rec.runtime.state }, 'VM state written again')
        } catch (err) {
          if (!isStoreWriteFailure(err)) {
            this.unsaved.delete(name)
            h.log.error({ err }, 'cannot write the VM state')
          }
          break
        }
      }
      if (this.unsaved.size === 0) {
        clearInterval(this.unsavedTimer)
        this.unsavedTimer = undefined
      }
    }, 5_000)
    this.unsavedTimer.unref()
  }

  // ---- internals ----

  private must(name: string): Handle {
    const h = this.handles.get(name)
    if (h) return h
    const rec = this.deps.repo.get(name)
    if (!rec) throw new QmpdError('VM_NOT_FOUND', `no VM named ${name}`, { vm: name })
    return this.handleFor(rec)
  }

  private handleFor(rec: VmRecord): Handle {
    let h = this.handles.get(rec.name)
    if (!h) {
      h = { name: rec.name, rec, expectingExit: false, log: this.deps.log.child({ vm: rec.name }) }
      this.handles.set(rec.name, h)
    }
    return h
  }

  /**
   * Refuses an operation in the wrong state. At submit time the check applies only when the VM's
   * queue is idle: with jobs queued the state will change before this one runs, so the job checks
   * again when it starts (callers may queue stop, start, pause back to back).
   */
  private expectStateToQueue(h: Handle, op: VmOperation): void {
    if (!this.deps.jobs.busy(h.name)) this.expectState(h, op)
  }

  /** Refuses an operation the state table (states.ts) does not allow in the VM's state now. */
  private expectState(h: Handle, op: VmOperation): void {
    assertState(h.name, h.rec.runtime.state, op)
  }

  /**
   * Records a state. `fact`: what happened to QEMU (an exit, an event, what re-attach found), kept
   * in memory even when the store cannot be written (see writeRuntime); otherwise a failed write
   * throws and memory stays as it was.
   */
  private setState(h: Handle, state: VmState, reason?: string, extra: Partial<VmRuntime> = {}, opts: { fact?: boolean } = {}): void {
    const prev = h.rec.runtime
    const next: VmRuntime = { ...prev, ...extra, state }
    if (reason) next.reason = reason
    else delete next.reason
    this.writeRuntime(h, next, opts)
    if (prev.state !== state || prev.reason !== next.reason) {
      h.log.info({ state, reason }, 'vm state')
      this.deps.bus.emit({ type: 'vm', vm: h.name, state, ...(reason ? { reason } : {}) })
    }
  }

  private async connect(socket: string, log: Logger, timeoutMs = 5_000): Promise<QmpClient> {
    const qmp = new QmpClient({ logger: log.child({ component: 'qmp' }) })
    const short = shortSocketPath(socket)
    try {
      await qmp.connect({ path: short.path }, { timeoutMs })
    } finally {
      short.release()
    }
    return qmp
  }

  /**
   * Connects to the QMP socket a client named for adoption. What the client got wrong (no such
   * file, not a socket, nothing listening) is its error, a 400, not the daemon's.
   * @throws QmpdError INVALID_INPUT when nothing is there to adopt.
   */
  private async connectAdopted(socket: string, log: Logger): Promise<QmpClient> {
    const st = lstatSync(socket, { throwIfNoEntry: false })
    if (!st) throw new QmpdError('INVALID_INPUT', `adopt.qmpSocket ${socket} does not exist`, { field: 'adopt.qmpSocket', path: socket })
    if (!st.isSocket()) throw new QmpdError('INVALID_INPUT', `adopt.qmpSocket ${socket} is not a unix socket`, { field: 'adopt.qmpSocket', path: socket })
    try {
      return await this.connect(socket, log)
    } catch (err) {
      const e = toQmpdError(err)
      if (e.code !== 'QMP_CONNECT_FAILED') throw e
      throw new QmpdError('INVALID_INPUT', `nothing answers QMP on adopt.qmpSocket ${socket}: ${e.message}`, { field: 'adopt.qmpSocket', path: socket }, { cause: err })
    }
  }

  /** Wires a connected QMP client to the VM: run-state events, forwarding, disconnect handling. */
  private attach(h: Handle, qmp: QmpClient): void {
    h.qmp = qmp
    qmp.on('event', (ev: { event: string; data?: unknown; timestamp?: { seconds: number; microseconds: number } }) => {
      this.deps.bus.emit({ type: 'qmp', vm: h.name, event: ev.event, data: ev.data ?? {}, ...(ev.timestamp ? { timestamp: ev.timestamp } : {}) })
      if (h.qmp !== qmp) return
      switch (ev.event) {
        case 'STOP':
          h.runEvents = (h.runEvents ?? 0) + 1
          if (h.rec.runtime.state === 'running') this.setState(h, 'paused', 'paused', {}, FACT)
          // A stop qmpd sent is a plain pause; anything else (I/O error, guest panic, a save) is
          // asked about, outside any guest pause of ours.
          if (!h.stopping) void this.refreshStatus(h, qmp)
          break
        case 'RESUME':
          h.runEvents = (h.runEvents ?? 0) + 1
          if (h.rec.runtime.state === 'paused' || h.rec.runtime.state === 'starting') this.setState(h, 'running', undefined, {}, FACT)
          break
        case 'SHUTDOWN': {
          const d = (ev.data ?? {}) as { guest?: boolean; reason?: string }
          h.shutdown = { guest: !!d.guest, reason: d.reason ?? 'unknown' }
          break
        }
      }
    })
    qmp.once('disconnected', (cause: unknown) => {
      if (h.qmp !== qmp) return
      h.qmp = undefined
      void this.onQmpLost(h, cause)
    })
  }

  /** Refines 'paused' with QEMU's own run state (postmigrate, io-error, prelaunch, …). */
  private async refreshStatus(h: Handle, qmp: QmpClient): Promise<void> {
    const seen = h.runEvents ?? 0
    try {
      const st = QueryStatus.parse(await qmp.execute('query-status'))
      // A STOP or RESUME handled since the query was sent is newer than its answer (a reply and the
      // events after it settle in loop iterations of their own): a `cont` right after a stop would
      // otherwise be undone by the paused answer to the query the STOP sent.
      if (h.qmp !== qmp || (h.runEvents ?? 0) !== seen) return
      const next = stateFromStatus(st)
      if (next.state !== h.rec.runtime.state || next.reason !== h.rec.runtime.reason) this.setState(h, next.state, next.reason, {}, FACT)
    } catch {
      /* the disconnect handler takes over */
    }
  }

  /** The QMP connection ended: find out whether QEMU exited, and how. */
  private async onQmpLost(h: Handle, cause: unknown): Promise<void> {
    const pid = h.rec.runtime.pid
    h.log.debug({ err: cause }, 'qmp connection lost')
    if (h.child) {
      const exited = await settlesWithin(h.exited!, EXIT_AFTER_EOF_TIMEOUT_MS)
      if (exited) return
    } else if (pid) {
      const info0 = procInfo(pid)
      if (await waitForExit(pid, EXIT_AFTER_EOF_TIMEOUT_MS, h.rec.runtime.pidStartTime)) {
        const info = procInfo(pid) ?? info0
        this.onExit(h, info?.exit ?? { code: null, signal: null })
        return
      }
    } else {
      // Adopted without a known PID: the socket closing is all we can know.
      this.onExit(h, { code: null, signal: null })
      return
    }
    this.setState(h, 'unknown', `QMP connection lost (${toQmpdError(cause).message}) but QEMU pid ${pid} still runs`, {}, FACT)
  }

  /**
   * QEMU exited: shutoff when asked for or announced by SHUTDOWN, crashed otherwise. Never throws
   * (it runs in a child's exit event): whatever fails, the exit is marked, so a stop waiting for it
   * goes on.
   */
  private onExit(h: Handle, how: { code: number | null; signal: string | null }): void {
    try {
      this.recordExit(h, how)
    } catch (err) {
      h.log.error({ err, exit: how }, 'could not record the QEMU exit')
      h.qmp = undefined
      h.child = undefined
    } finally {
      h.markExited?.()
    }
  }

  private recordExit(h: Handle, how: { code: number | null; signal: string | null }): void {
    if (!isRunningState(h.rec.runtime.state) && h.rec.runtime.state !== 'starting') {
      h.markExited?.()
      return
    }
    if (h.rec.runtime.state === 'starting') {
      const exit = { ...how, at: new Date().toISOString() }
      if (how.signal && !h.expectingExit) {
        // A signal qmpd did not send (kill -9 by someone, the OOM killer) is a crash, not a
        // configuration QEMU refused: the definition may be fine and the next start may work.
        this.setState(h, 'crashed', `QEMU killed by ${how.signal} during start`, { exit }, FACT)
      } else {
        // QEMU gave up before its monitor came up (bad image, bad argument): launch() reports why.
        this.setState(h, 'shutoff', 'failed to start', { exit }, FACT)
      }
      h.child = undefined
      h.markExited?.()
      return
    }
    const orderly = h.expectingExit || (h.shutdown !== undefined && h.shutdown.reason !== 'guest-panic')
    const exit = { ...how, at: new Date().toISOString() }
    const rt = { ...h.rec.runtime, exit }
    delete rt.pid
    delete rt.pidStartTime
    h.rec.runtime = rt
    if (orderly) {
      this.setState(h, 'shutoff', h.shutdown?.reason ?? (h.expectingExit ? 'destroyed' : 'exited'), {}, FACT)
    } else {
      const why = how.signal ? `QEMU killed by ${how.signal}` : how.code !== null ? `QEMU exited with code ${how.code}` : 'QEMU exited unexpectedly'
      this.setState(h, 'crashed', why, {}, FACT)
    }
    h.qmp = undefined
    h.child = undefined
    h.markExited?.()
    h.log.info({ exit, orderly }, 'qemu exited')
  }

  private async reattach(h: Handle): Promise<void> {
    const rt = h.rec.runtime
    if (isAdopted(h.rec.definition)) {
      try {
        const qmp = await this.connect(h.rec.definition.adopt.qmpSocket, h.log)
        this.armExit(h)
        this.attach(h, qmp)
        // As for a QEMU qmpd launched: a checkpoint or save whose receiver died, QEMU jobs qmpd left.
        await cancelStaleMigration(qmp, h.log, this.deps.paths.vmDir(h.name))
        const st = stateFromStatus(QueryStatus.parse(await qmp.execute('query-status')))
        this.setState(h, st.state, st.reason, {}, FACT)
        await this.endOrphanedJobs(h, qmp)
        const found = await discoverAdoptedDisks(qmp, h.rec.runtime.disks)
        this.updateRuntime(h.name, { disks: mergeAdoptedDisks(h.rec.runtime.disks, found.disks) })
      } catch (err) {
        this.setState(h, 'unknown', `cannot connect to the adopted QMP socket: ${toQmpdError(err).message}`, {}, FACT)
      }
      return
    }
    if (!isRunningState(rt.state) && rt.state !== 'starting') {
      await endReceivers(this.deps.paths.vmDir(h.name))
      return
    }
    // 'starting' never has a PID of its own (launch records it with the state that follows), so
    // whatever PID it carries is an old run's.
    if (rt.state === 'starting' || !rt.pid || !isAlive(rt.pid, rt.pidStartTime)) {
      const dir = this.deps.paths.vmDir(h.name)
      const strays = await endStrayQemus(dir, h.log)
      // No QEMU: a RAM-state receiver left waiting for its stream will never get it.
      await endReceivers(dir)
      if (rt.state === 'starting' || strays.length > 0) {
        // The previous daemon died between spawning QEMU and recording it (start, revert,
        // restore). Nothing ran in that QEMU but a RAM load at most; a managed save it was
        // restoring from is still in place (it goes only after a successful restore) and stays.
        const next = { ...h.rec.runtime }
        delete next.pid
        delete next.pidStartTime
        h.rec.runtime = next
        if (existsSync(join(dir, VM_FILES.managedSave))) this.setState(h, 'saved', 'managed save', {}, FACT)
        else this.setState(h, 'shutoff', 'QEMU start interrupted by a daemon crash', {}, FACT)
        return
      }
      const info = rt.pid ? procInfo(rt.pid) : undefined
      const exit = info?.exit ?? { code: null, signal: null }
      const next = { ...rt, exit: { ...exit, at: new Date().toISOString() } }
      delete next.pid
      delete next.pidStartTime
      h.rec.runtime = next
      const crashed = exit.signal !== null || (exit.code !== null && exit.code !== 0)
      this.setState(h, crashed ? 'crashed' : 'shutoff', 'QEMU exited while qmpd was not running', {}, FACT)
      return
    }
    this.armExit(h)
    const qmp = await this.connect(rt.qmpSocket, h.log)
    this.attach(h, qmp)
    // A save, managed save or checkpoint the previous daemon was streaming: its receiver died
    // with it. Cancel before reading the run state (the cancel may change it); whether the guest
    // runs again is for the recovery of that operation to decide, not for re-attach.
    await cancelStaleMigration(qmp, h.log, this.deps.paths.vmDir(h.name))
    const st = stateFromStatus(QueryStatus.parse(await qmp.execute('query-status')))
    this.setState(h, st.state, st.reason, {}, FACT)
    await this.endOrphanedJobs(h, qmp)
    h.log.info({ pid: rt.pid }, 're-attached to running QEMU')
  }

  /**
   * QEMU jobs a previous daemon started (ids qmpd-*) outlive it, and their qmpd jobs were marked
   * INTERRUPTED: cancel the ones still running (a copy or commit not pivoted leaves the VM on its
   * old chain) and dismiss the concluded ones, so the disks are free for new work.
   */
  private async endOrphanedJobs(h: Handle, qmp: QmpClient): Promise<void> {
    for (const job of await qmp.execute('query-jobs')) {
      if (!job.id.startsWith(OWN_JOB_PREFIX)) continue
      if (job.status === 'concluded') await qmp.execute('job-dismiss', { id: job.id }).catch(() => {})
      else {
        await qmp.execute('job-cancel', { id: job.id }).catch(() => {})
        for (let i = 0; i < 100; i++) {
          const j = (await qmp.execute('query-jobs')).find((x) => x.id === job.id)
          if (!j) break
          if (j.status === 'concluded') {
            await qmp.execute('job-dismiss', { id: job.id }).catch(() => {})
            break
          }
          await sleep(50)
        }
      }
      h.log.warn({ qemuJob: job.id, status: job.status }, 'ended a QEMU job left by the previous daemon')
    }
  }

  /** A fresh exit promise for the current QEMU process. */
  private armExit(h: Handle): void {
    h.exited = new Promise<void>((resolve) => {
      h.markExited = resolve
    })
  }

  private async doStart(h: Handle, ctx: JobContext, opts: StartOptions): Promise<unknown> {
    this.expectState(h, 'start')
    const t0 = performance.now()
    const saved = h.rec.runtime.state === 'saved' ? join(this.deps.paths.vmDir(h.name), VM_FILES.managedSave) : undefined
    let restored: { bytes: number; ms: number } | undefined
    const plan: StartJournal = { managed: saved !== undefined, paused: !!opts.paused }
    const o = this.deps.journal.begin({ vm: h.name, op: START_OP, job: ctx.id, body: plan, qemuPid: () => h.rec.runtime.pid })
    try {
      if (saved) {
        // Restore the managed save; its file goes only once the restore has succeeded.
        const qmp = await o.step('launch', () => this.launchInJob(h.name, ctx, { incoming: true }))
        try {
          restored = await o.step('load-ram', () => loadRamState(qmp, { file: saved, check: (real) => void this.deps.paths.confine(real, 'managed save'), socket: stateSocket(this.deps.paths.vmDir(h.name), true), log: ctx.log }))
        } catch (err) {
          await this.quitInJob(h.name, ctx)
          this.setState(h, 'saved', 'managed save (the last restore failed)')
          throw err
        }
        await o.step('discard-save', () => this.discardRestoredSave(h, saved))
      } else {
        await o.step('launch', () => this.launchInJob(h.name, ctx))
      }
      if (!opts.paused) await o.step('cont', () => this.contInJob(h.name))
      else if (saved) this.markPaused(h.name)
    } finally {
      o.end()
    }
    return {
      pid: h.rec.runtime.pid,
      state: h.rec.runtime.state,
      ms: Math.round(performance.now() - t0),
      ...(restored ? { restoredFromManagedSave: true, restoreMs: restored.ms } : {}),
    }
  }

  /** Marks a VM whose QEMU has exited after a managed save as 'saved'. */
  markSaved(name: string): void {
    this.setState(this.must(name), 'saved', 'managed save')
  }

  /** Marks a saved VM shut off (its managed save was discarded). */
  markShutoff(name: string, reason: string): void {
    this.setState(this.must(name), 'shutoff', reason)
  }

  /**
   * Launches QEMU on the VM's current disk layers, paused (-S, or waiting for incoming migration
   * when `incoming`). For code already running inside the VM's queue (start, revert, restore).
   */
  async launchInJob(name: string, ctx: JobContext, opts: { incoming?: boolean } = {}): Promise<QmpClient> {
    const h = this.must(name)
    if (isAdopted(h.rec.definition)) throw new QmpdError('INVALID_STATE', `VM ${name} was adopted; qmpd cannot start it`, { vm: name })
    this.expectState(h, 'start')
    const def = h.rec.definition
    const dir = this.deps.paths.vmDir(h.name)
    mkdirSync(dir, { recursive: true, mode: 0o750 })
    const disks: ActiveDisk[] = h.rec.runtime.disks
    // Checked again here, not only at define: files can be swapped for symlinks, FIFOs or images
    // naming outside backing files after the define, and snapshots move the active layers.
    await this.checkFiles(def, dir, 'start', disks)
    await checkNicsOnHost(def.nics ?? [])
    await checkVncPort(def.vnc)
    const ovmf = def.firmware === 'uefi' ? findOvmf() : undefined
    if (ovmf && (await ensureNvram(this.deps.qemuImg, disks, join(dir, NVRAM_FILE), ovmf))) ctx.log.info({ template: ovmf.varsTemplate }, 'nvram created')
    const created: string[] = []
    for (const disk of disks) {
      if (existsSync(disk.file)) continue
      const spec = def.disks.find((d) => d.id === disk.id)
      if (!spec?.sizeMiB || disk.file !== spec.file) {
        throw new QmpdError('INVALID_STATE', `disk ${disk.id}: ${disk.file} does not exist (give sizeMiB to have qmpd create it)`, {
          vm: h.name,
          disk: disk.id,
        })
      }
      mkdirSync(join(disk.file, '..'), { recursive: true })
      // Claimed with O_EXCL first, which never follows a symlink: a dangling one planted since the
      // check above makes this fail instead of qemu-img creating the file where it points.
      await reserveFile(disk.file)
      try {
        await this.deps.qemuImg.create(disk.file, disk.format, { sizeBytes: spec.sizeMiB * 1024 * 1024 })
      } catch (err) {
        rmSync(disk.file, { force: true })
        throw err
      }
      created.push(disk.file)
      ctx.log.info({ disk: disk.id, file: disk.file, sizeMiB: spec.sizeMiB }, 'disk created')
    }
    if (created.length) this.updateRuntime(h.name, { createdFiles: [...h.rec.runtime.createdFiles, ...created] })
    for (const f of [def.kernel, def.initrd]) {
      if (f && !existsSync(f)) throw new QmpdError('INVALID_STATE', `${f} does not exist`, { vm: h.name, file: f })
    }
    const machine = await chooseMachine(def, this.deps.config)
    ctx.log.info(machine, 'accelerator chosen')
    const argv = buildArgv(def, { accel: machine.accel, cpuModel: machine.cpuModel, disks, ...(ovmf ? { ovmf } : {}), ...(opts.incoming ? { incoming: true } : {}) })
    await this.launch(h, ctx, argv)
    if (opts.incoming) h.loadingRam = h.expectingExit = true
    this.updateRuntime(h.name, { machine })
    return h.qmp!
  }

  /**
   * Resumes the guest (QMP cont) from inside a job. Right after a migration completes QEMU may still
   * answer "Migration is not finalized yet" (it finishes in a bottom half): retry briefly. The
   * recovery of an operation a daemon crash interrupted calls it too, once re-attach has cancelled
   * the migration the operation left (a guest wedged by a failed background snapshot under QEMU
   * 7.2 does not come back this way: see cancelStaleMigration in ./migration.ts).
   */
  async contInJob(name: string): Promise<void> {
    const h = this.must(name)
    const qmp = this.qmp(name)
    this.ramLoaded(h)
    await contAfterMigration(qmp)
    this.setStateIfLive(h, qmp, 'running')
  }

  /**
   * Records the state a command just brought about, unless the session it was sent on has ended
   * in the meantime (QEMU exited after answering: the exit's state stands). QEMU is in that state
   * whether or not the store can say so: a fact (pause and resume work on a full disk).
   */
  private setStateIfLive(h: Handle, qmp: QmpClient, state: VmState, reason?: string): void {
    if (h.qmp === qmp) this.setState(h, state, reason, {}, FACT)
  }

  /**
   * Pauses the guest from inside a job (QMP stop) and records it. Its STOP event costs no
   * query-status round trip, which QEMU would otherwise answer before the job's next command,
   * inside the guest's pause.
   */
  async stopInJob(name: string): Promise<void> {
    const h = this.must(name)
    const qmp = this.qmp(name)
    h.stopping = true
    try {
      await qmp.execute('stop')
    } finally {
      h.stopping = false
    }
    this.setStateIfLive(h, qmp, 'paused', 'paused')
  }

  /** Marks the VM paused (used after a job stopped the guest itself). */
  markPaused(name: string, reason = 'paused'): void {
    const h = this.must(name)
    this.ramLoaded(h)
    this.setState(h, 'paused', reason)
  }

  /** An incoming QEMU's RAM load has ended well: from now on its exit is a crash again. */
  private ramLoaded(h: Handle): void {
    if (!h.loadingRam) return
    h.loadingRam = h.expectingExit = false
  }

  /** Quits QEMU from inside a job (an orderly shutoff, never a crash); SIGKILL if it will not go. */
  async quitInJob(name: string, ctx: JobContext): Promise<void> {
    const h = this.must(name)
    if (!isRunningState(h.rec.runtime.state)) return
    await this.doStop(h, ctx, { force: true })
  }

  /**
   * Spawns QEMU in its own session (it outlives the daemon), waits for its QMP socket and attaches.
   * On any failure the process is killed and the error carries the tail of qemu.log.
   */
  private async launch(h: Handle, ctx: JobContext, argv: string[]): Promise<void> {
    const dir = this.deps.paths.vmDir(h.name)
    const socket = join(dir, VM_FILES.qmpSocket)
    rmSync(socket, { force: true })
    rmSync(join(dir, VM_FILES.pidfile), { force: true })
    const logPath = join(dir, VM_FILES.qemuLog)
    const logFd = openSync(logPath, 'a', 0o640)
    const logStart = statSync(logPath).size
    h.expectingExit = h.loadingRam = false
    h.shutdown = undefined
    this.setState(h, 'starting', undefined, { exit: undefined })
    ctx.log.debug({ argv }, 'spawning qemu')
    let child: ChildProcess
    try {
      child = spawn(this.deps.config.qemuBinary, argv, { cwd: dir, detached: true, stdio: ['ignore', logFd, logFd] })
    } finally {
      closeSync(logFd)
    }
    const spawnError = new Promise<never>((_, reject) =>
      child.once('error', (err: NodeJS.ErrnoException) =>
        reject(
          err.code === 'ENOENT'
            ? new QmpdError('QEMU_NOT_FOUND', `${this.deps.config.qemuBinary} not found; install qemu-system-x86`, { binary: this.deps.config.qemuBinary })
            : new QmpdError('QEMU_START_FAILED', `cannot run ${this.deps.config.qemuBinary}: ${err.message}`),
        ),
      ),
    )
    this.armExit(h)
    h.child = child
    let exitInfo: { code: number | null; signal: string | null } | undefined
    child.once('exit', (code, signal) => {
      exitInfo = { code, signal }
      if (h.child === child) this.onExit(h, exitInfo)
    })
    child.unref()
    try {
      if (child.pid && this.deps.hooks?.afterSpawn) await this.deps.hooks.afterSpawn(h.name, child.pid)
      const qmp = await Promise.race([spawnError, this.connectWhenReady(socket, h, () => exitInfo !== undefined)])
      const pid = child.pid!
      this.setState(h, 'paused', argv.includes('-incoming') ? 'inmigrate' : 'prelaunch', { pid, pidStartTime: procInfo(pid)?.startTime })
      this.attach(h, qmp)
    } catch (err) {
      if (child.pid && exitInfo === undefined) {
        h.expectingExit = true
        child.kill('SIGKILL')
        await h.exited
      }
      if (h.rec.runtime.state === 'starting') this.setState(h, 'shutoff', 'failed to start', {}, FACT)
      const e = toQmpdError(err)
      if (e.code === 'QEMU_NOT_FOUND') throw e
      // onExit made it a crash: something outside qmpd killed QEMU; the log tail would not say so.
      if (h.rec.runtime.state === 'crashed') throw new QmpdError('QEMU_START_FAILED', h.rec.runtime.reason ?? 'QEMU crashed during start', { log: logPath }, { cause: err })
      const tail = readTail(logPath, logStart)
      throw new QmpdError('QEMU_START_FAILED', `QEMU did not start: ${tail || e.message}`, { log: logPath }, { cause: err })
    }
  }

  private async connectWhenReady(socket: string, h: Handle, gone: () => boolean): Promise<QmpClient> {
    const deadline = Date.now() + START_CONNECT_TIMEOUT_MS
    for (;;) {
      if (gone()) throw new QmpdError('QEMU_START_FAILED', 'QEMU exited during start')
      if (existsSync(socket)) {
        try {
          return await this.connect(socket, h.log)
        } catch (err) {
          if (Date.now() > deadline) throw err
        }
      }
      if (Date.now() > deadline) throw new TimeoutError(`QEMU did not open its QMP socket within ${START_CONNECT_TIMEOUT_MS} ms`)
      await sleep(10)
    }
  }

  private async doStop(h: Handle, ctx: JobContext, opts: StopOptions): Promise<unknown> {
    this.expectState(h, 'stop')
    const t0 = performance.now()
    const exited = h.exited ?? Promise.resolve()
    let method = 'quit'
    if (!opts.force && h.qmp) {
      const timeoutMs = (opts.timeoutSec ?? 60) * 1000
      // A fact-like write: a stop must work on a full disk (the exit is what counts).
      this.setState(h, 'stopping', undefined, {}, FACT)
      try {
        await h.qmp.execute('system_powerdown')
        method = 'powerdown'
        if (!(await settlesWithin(exited, timeoutMs))) {
          ctx.log.info({ timeoutMs }, 'guest ignored the powerdown; quitting QEMU')
          method = 'powerdown+quit'
        }
      } catch (err) {
        // A QEMU that cannot take a powerdown (wedged, or its monitor gone) is quit or killed below.
        ctx.log.warn({ err }, 'system_powerdown failed; quitting QEMU')
      }
    }
    if (isRunningState(h.rec.runtime.state)) {
      h.expectingExit = true
      let done = false
      const qmp = h.qmp
      if (qmp) {
        // Not awaited by itself: a wedged QEMU (stopped, or its vCPUs asleep in a userfaultfd
        // after a failed background snapshot) never answers, and `quit` must not be what the kill
        // waits for. The kill comes when the process has not exited within the quit timeout.
        qmp.execute('quit').catch((err: unknown) => {
          if (!(err instanceof QmpDisconnectedError)) ctx.log.warn({ err }, 'quit failed')
        })
        done = await settlesWithin(exited, this.quitTimeoutMs)
      }
      if (!done) {
        method = qmp ? `${method}+kill` : 'kill'
        if (!(await this.killQemu(h, ctx, qmp ? 'QEMU did not exit after quit; SIGKILL' : 'no QMP connection to QEMU; SIGKILL'))) {
          throw new QmpdError('INVALID_STATE', `VM ${h.name}: no QMP connection and no known PID; qmpd cannot stop its QEMU`, { vm: h.name })
        }
      }
    }
    return { method, state: h.rec.runtime.state, ms: Math.round(performance.now() - t0) }
  }

  /**
   * SIGKILLs the VM's QEMU by its recorded PID (checked against its start time, so a reused PID is
   * never hit) and waits until it has exited and onExit has recorded it. False when no PID is known.
   */
  private async killQemu(h: Handle, ctx: JobContext, why: string): Promise<boolean> {
    const { pid, pidStartTime } = h.rec.runtime
    if (!pid) return false
    const exited = h.exited ?? Promise.resolve()
    if (isAlive(pid, pidStartTime)) {
      ctx.log.warn({ pid }, why)
      try {
        process.kill(pid, 'SIGKILL')
      } catch {
        // exited in the meantime
      }
    }
    if (!h.child) {
      // Not our child (re-attached): no 'exit' event will come; /proc tells when it is gone.
      await waitForExit(pid, this.quitTimeoutMs + 10_000, pidStartTime)
      this.onExit(h, procInfo(pid)?.exit ?? { code: null, signal: 'SIGKILL' })
    }
    await exited
    return true
  }

  private async diskViews(h: Handle): Promise<DiskView[]> {
    if (h.qmp) {
      try {
        const qmp = h.qmp
        return await this.liveDisks.get(qmp, async () => disksFromQueryBlock(await qmp.execute('query-block')))
      } catch (err) {
        h.log.debug({ err }, 'query-block failed; falling back to qemu-img')
      }
    }
    return Promise.all(
      h.rec.runtime.disks.map(async (d): Promise<DiskView> => {
        try {
          const chain = await this.chains.chain(d.file)
          return {
            id: d.id,
            file: d.file,
            format: d.format,
            chain: chain.map((l) => ({
              file: l.filename,
              format: l.format,
              virtualSize: l['virtual-size'],
              ...(l['actual-size'] !== undefined ? { actualSize: l['actual-size'] } : {}),
              ...(l['full-backing-filename'] ? { backingFile: l['full-backing-filename'] } : {}),
            })),
          }
        } catch (err) {
          return { id: d.id, file: d.file, format: d.format, chain: [], chainError: toQmpdError(err).message }
        }
      }),
    )
  }
}

function stateFromStatus(st: { status: string; running: boolean }): { state: VmState; reason?: string } {
  if (st.running) return { state: 'running' }
  if (st.status === 'shutdown') return { state: 'paused', reason: 'shutdown' }
  return { state: 'paused', reason: st.status }
}

interface BlockImage {
  filename: string
  format: string
  'virtual-size'?: number
  'actual-size'?: number
  'backing-filename'?: string
  'backing-image'?: BlockImage
}

/** Maps query-block's devices to qmpd disk ids (the -device id) and flattens each backing chain. */
function disksFromQueryBlock(blocks: unknown): DiskView[] {
  const list = blocks as Array<{ device?: string; qdev?: string; removable?: boolean; inserted?: { 'node-name'?: string; image: BlockImage } }>
  const out: DiskView[] = []
  for (const b of list) {
    // CD-ROMs (removable media) are in the definition's cdroms, never snapshotted: not disks.
    if (!b.inserted || b.removable) continue
    const id = deviceId(b)
    // The firmware code is the host's (read-only, never snapshotted), not one of the VM's disks.
    if (id === FW_CODE_NODE) continue
    const chain: ChainLayer[] = []
    for (let img: BlockImage | undefined = b.inserted.image; img; img = img['backing-image']) {
      chain.push({
        file: img.filename,
        format: img.format,
        ...(img['virtual-size'] !== undefined ? { virtualSize: img['virtual-size'] } : {}),
        ...(img['actual-size'] !== undefined ? { actualSize: img['actual-size'] } : {}),
        ...(img['backing-filename'] ? { backingFile: img['backing-filename'] } : {}),
      })
    }
    const node = b.inserted['node-name']
    if (node && chain[0]) chain[0].node = node
    out.push({ id, ...(node ? { node } : {}), file: chain[0]?.file ?? '', format: chain[0]?.format ?? '', chain })
  }
  return out
}

/** Parses input with a zod schema, turning failures into INVALID_INPUT with the issues. */
function consolesOf(def: StoredDefinition, dir: string): Pick<VmView, 'consoles'> {
  if (isAdopted(def)) return {}
  return {
    consoles: {
      serial: {
        ...(def.serialLog ? { log: join(dir, VM_FILES.serialLog) } : {}),
        ...(def.serialSocket ? { socket: join(dir, VM_FILES.consoleSocket) } : {}),
      },
      ...(def.vnc ? { vnc: 'unix' in def.vnc ? { socket: join(dir, VNC_SOCKET) } : { host: '127.0.0.1', port: def.vnc.port } } : {}),
    },
  }
}

function parseInput<S extends z.ZodType>(schema: S, input: unknown): z.output<S> {
  const r = schema.safeParse(input)
  if (!r.success) throw new QmpdError('INVALID_INPUT', z.prettifyError(r.error), { issues: r.error.issues })
  return r.data
}

function readTail(file: string, from: number): string {
  try {
    const buf = readFileSync(file)
    return buf.subarray(from).toString('utf8').trim().split('\n').slice(-5).join(' | ').slice(-1000)
  } catch {
    return ''
  }
}
