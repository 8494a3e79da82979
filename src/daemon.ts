// Wires the store, services, recovery and HTTP app together at start and takes them down at stop;
// holds no operation logic.
import { randomBytes } from 'node:crypto'
import { chmodSync, existsSync, mkdirSync, readFileSync, readdirSync, renameSync, statSync, writeFileSync, openSync, fsyncSync, closeSync } from 'node:fs'
import { join } from 'node:path'
import PQueue from 'p-queue'
import { pino, type Logger } from 'pino'
import type { FastifyInstance } from 'fastify'
import type { Config } from './config.ts'
import { settlesWithin } from './util.ts'
import { EventBus } from './events/bus.ts'
import { buildApp, type AppExtras } from './http/app.ts'
import { PathPolicy } from './images/paths.ts'
import { QemuImg } from './images/qemu-img.ts'
import { JobManager } from './jobs/manager.ts'
import { openDb, type Db } from './store/db.ts'
import { ROW_CHECKS } from './store/checks.ts'
import { Quarantine, scanStore } from './store/integrity.ts'
import { JobRepo } from './store/jobs.ts'
import { VmRepo } from './store/vms.ts'
import { VmManager, type VmTestHooks } from './vm/manager.ts'
import { SnapshotService, type SnapshotTestHooks } from './snapshot/service.ts'
import { SnapshotRepo } from './store/snapshots.ts'
import { BlockJobService } from './chain/service.ts'
import { StateService } from './state/service.ts'
import { registerStateRecovery } from './state/recovery.ts'
import { ExportService } from './export/service.ts'
import { registerExportRecovery } from './export/recovery.ts'
import { registerSnapshotRecovery } from './snapshot/recovery.ts'
import { registerChainRecovery } from './chain/recovery.ts'
import { BackupService } from './backup/service.ts'
import { registerFromBackupRecovery } from './backup/new-vm.ts'
import { carryBitmapsToCopy } from './backup/copy-bitmaps.ts'
import { addOfflineOverlayBitmaps, overlayBitmapActions } from './backup/overlay-bitmaps.ts'
import { registerBackupRecovery } from './backup/recovery.ts'
import { invalidateOnRevert } from './backup/invalidate.ts'
import { registerVmRecovery } from './vm/recovery.ts'
import type { SnapshotDeps } from './snapshot/deps.ts'
import { JournalRepo } from './store/journal.ts'
import { Journal } from './ops/journal.ts'
import { Recovery } from './ops/recovery.ts'
import { VmChecker } from './ops/check.ts'
import { Reconciler } from './ops/reconcile.ts'
import { unpinClones } from './snapshot/clone-pins.ts'
import { lockStateDir } from './lock.ts'
import { assertPatchKeepsSnapshots } from './snapshot/patch-guard.ts'
import { IdempotencyRepo } from './store/idempotency.ts'
import { HostInfo } from './vm/host-info.ts'
import { ScheduleRepo } from './store/schedules.ts'
import { SchedDeletes } from './sched/deletes.ts'
import { Scheduler } from './sched/scheduler.ts'
import { ScheduleService } from './sched/service.ts'
import type { VmState } from './vm/definition.ts'
import { logAccelProbe } from './vm/accel.ts'
import { isRunningState } from './vm/states.ts'
import { VERSION } from './version.ts'

export { VERSION }

/** A running daemon: its services and its (not yet listening) HTTP app. */
export interface Daemon {
  config: Config
  log: Logger
  db: Db
  bus: EventBus
  jobs: JobManager
  vms: VmManager
  snapshots: SnapshotService
  /** Snapshot schedules; `scheduler` fires them (started once recovery and reconcile are done). */
  schedules: ScheduleService
  scheduler: Scheduler
  blockJobs: BlockJobService
  backups: BackupService
  state: StateService
  /** GET /v1/vms/{vm}/check: the store against QEMU and the files. */
  checker: VmChecker
  /** Reconcile at start and POST /v1/vms/{vm}/repair. */
  reconciler: Reconciler
  /** The store's repositories, for tests and tools that read what was committed (never write through them). */
  repos: { snapshots: SnapshotRepo; journal: JournalRepo }
  /** Builds an HTTP app over this daemon's services; token undefined = no auth (unix socket). */
  app(opts?: AppExtras): Promise<FastifyInstance>
  /**
   * Waits for running jobs (at most drainTimeoutMs, default 10 s: a mirror waiting in READY would
   * wait forever), detaches from QEMU (VMs and their QEMU jobs keep running; the next daemon ends
   * orphaned jobs), closes the store.
   */
  close(opts?: { drainTimeoutMs?: number }): Promise<void>
}

/**
 * Creates the state directory, takes it for this process (BUSY when another daemon has it), opens
 * the store, recovers interrupted jobs and re-attaches to QEMUs.
 */
export async function startDaemon(
  config: Config,
  log: Logger = pino({ level: config.logLevel }),
  testHooks: { snapshots?: SnapshotTestHooks; vms?: VmTestHooks } = {},
): Promise<Daemon> {
  mkdirSync(config.stateDir, { recursive: true, mode: 0o750 })
  // Before the store is opened: a second daemon on the same directory would serve the same VMs
  // without their QMP connections, and re-attach would fight the first one for every QEMU.
  const lock = await lockStateDir(config.stateDir)
  try {
    return await openDaemon(config, log, testHooks, () => lock.release())
  } catch (err) {
    await lock.release()
    throw err
  }
}

async function openDaemon(
  config: Config,
  log: Logger,
  testHooks: { snapshots?: SnapshotTestHooks; vms?: VmTestHooks },
  releaseLock: () => Promise<void>,
): Promise<Daemon> {
  const startedAt = new Date()
  const dbFile = join(config.stateDir, 'qmpd.db')
  refuseLostStore(config, dbFile, log)
  mkdirSync(join(config.stateDir, 'vms'), { recursive: true, mode: 0o750 })
  const db = openDb(dbFile)
  // Rows that fail their schema quarantine their VM (quarantined) instead of stopping the daemon.
  const quarantine = new Quarantine()
  for (const p of scanStore(db, ROW_CHECKS, quarantine)) log.error({ vm: p.vm, table: p.table, key: p.key, issue: p.issue }, 'stored row fails its schema; the VM is quarantined')
  const bus = new EventBus()
  const jobs = new JobManager(new JobRepo(db, log.child({ component: 'store' })), bus, log.child({ component: 'jobs' }))
  const interrupted = jobs.recoverInterrupted()
  if (interrupted.length) log.warn({ jobs: interrupted.map((j) => j.id) }, 'jobs interrupted by the previous daemon marked failed')
  const journalRepo = new JournalRepo(db, quarantine)
  const journal = new Journal(journalRepo)
  const recovery = new Recovery(journalRepo, log.child({ component: 'recovery' }), (job, outcome) => jobs.noteRecovery(job, outcome))
  const paths = new PathPolicy(config.stateDir, config.allowedDirs)
  const qemuImg = new QemuImg(config.qemuImgBinary, (file, field) => paths.confine(file, field))
  const vmRepo = new VmRepo(db, quarantine)
  // One repository instance for every reader: it caches each VM's parsed snapshot list.
  const snapshotRepo = new SnapshotRepo(db, quarantine)
  const vms = new VmManager({ config, repo: vmRepo, jobs, bus, paths, qemuImg, journal, log, ...(testHooks.vms ? { hooks: testHooks.vms } : {}) })
  jobs.explainFailures((vm, err) => vms.explainJobError(vm, err))
  const snapshotDeps: SnapshotDeps = {
    vms,
    jobs,
    repo: snapshotRepo,
    journal,
    paths,
    qemuImg,
    diskSwitches: new PQueue({ concurrency: config.parallelDiskSnapshots }),
    log: log.child({ component: 'snapshots' }),
    ...(testHooks.snapshots ? { hooks: testHooks.snapshots } : {}),
    overlayExtras: {
      live: (vm, overlays) => overlayBitmapActions(paths.vmDir(vm), overlays),
      offline: (vm, disk, file) => addOfflineOverlayBitmaps(qemuImg, paths.vmDir(vm), disk, file),
    },
  }
  const snapshots = new SnapshotService(snapshotDeps)
  // Asked only with deleteStorage, before anything is removed: linked clones' backing files stay.
  // A deleted VM's name leaves every source snapshot's clone pins: a new VM of that name pins nothing.
  const forgetVm = (vm: string): void => {
    snapshots.forgetVm(vm)
    unpinClones(snapshotRepo, vmRepo.list().map((r) => r.name), (c) => c !== vm)
  }
  vms.onDelete({ files: (vm) => (snapshots.assertNoClones(vm), snapshots.filesOf(vm)), forget: forgetVm })
  registerVmRecovery(recovery, { vms, vmDir: (vm) => paths.vmDir(vm), forget: (vm) => vms.forget(vm) })
  registerSnapshotRecovery(recovery, snapshotDeps)
  const blockJobs = new BlockJobService({
    vms,
    jobs,
    snapshots,
    paths,
    qemuImg,
    journal,
    log: log.child({ component: 'blockjobs' }),
    beforePivot: (vm, disk, qmp, node, file) => carryBitmapsToCopy(qmp, paths.vmDir(vm), disk, node, file, log.child({ component: 'backups', vm })),
  })
  registerChainRecovery(recovery, { vms, repo: snapshotRepo, qemuImg, vmDir: (vm) => paths.vmDir(vm) })
  const state = new StateService({ vms, jobs, paths, journal, log: log.child({ component: 'state' }), qemuBinary: config.qemuBinary })
  registerStateRecovery(recovery, { vms, journal: journalRepo })
  const blockJobBusy = (vm: string, what: string): void => blockJobs.assertIdle(vm, what)
  const exports = new ExportService({ vms, jobs, journal, paths, qemuImg, bus, busy: blockJobBusy, log: log.child({ component: 'exports' }) })
  registerExportRecovery(recovery, exports)
  // An open export pins the disks' graph: snapshots, saves and block jobs wait until it ends.
  const busy = (vm: string, what: string): void => {
    blockJobBusy(vm, what)
    exports.assertNone(vm, what)
  }
  blockJobs.exportCheck = (vm, what) => exports.assertNone(vm, what)
  snapshots.busyCheck = busy
  state.busyCheck = busy
  vms.busyCheck = blockJobBusy
  const backups = new BackupService({ vms, jobs, paths, qemuImg, journal, log: log.child({ component: 'backups' }) })
  invalidateOnRevert(bus, (vm) => paths.vmDir(vm), log.child({ component: 'backups' }))
  registerBackupRecovery(recovery, { vmDir: (vm) => paths.vmDir(vm), qmp: (vm) => (isRunningState(vms.record(vm).runtime.state) ? vms.qmp(vm) : undefined) })
  backups.busyCheck = busy
  registerFromBackupRecovery(recovery, vms)
  vms.patchCheck = (vm, before, after, fresh) => assertPatchKeepsSnapshots(snapshotRepo, vm, before, after, fresh)
  // An open NBD export is an operation in flight: its fleecing job and scratch file are not orphans.
  const vmBusy = (vm: string): boolean => jobs.busy(vm) || blockJobs.busy(vm) !== undefined || exports.hasOpen(vm)
  const checker = new VmChecker({
    vms,
    snapshots: snapshotRepo,
    qemuImg,
    paths,
    busy: vmBusy,
    // An entry whose job still runs is an operation in flight, not one a crash interrupted.
    pendingJournal: (vm) => journalRepo.pending(vm).filter((e) => !e.job || !jobs.isLive(e.job)),
  })
  const reconciler = new Reconciler({ checker, vms, snapshots: snapshotRepo, jobs, busy: vmBusy, log: log.child({ component: 'reconcile' }) })
  await vms.init()
  // Interrupted operations are finished or undone before anything else runs (every rule's
  // decision table: docs/architecture.md), then the store is reconciled with QEMU and the files
  // (ARCHITECTURE.md: "After a restart the store is reconciled with QEMU and the files before
  // anything else runs"): an operation recovery finished or undid is no disagreement.
  await recovery.run()
  await exports.init(vmRepo.list().map((r) => r.name))
  // Pins naming VMs that no longer exist (a delete before pins were pruned, a quarantined forget) go.
  for (const u of unpinClones(snapshotRepo, vmRepo.list().map((r) => r.name), (c) => vms.has(c))) log.info(u, 'stale clone pins removed')
  await reconciler.reconcileAll(vmRepo.list().map((r) => r.name))
  // After recovery and reconcile: a slot's outcome is read from jobs recovery has settled.
  const deletes = new SchedDeletes({ snapshots, bus, log: log.child({ component: 'scheduler' }) })
  const scheduleRepo = new ScheduleRepo(db, log.child({ component: 'store' }))
  const scheduler = new Scheduler({ repo: scheduleRepo, vms, snapshots, backups, jobs, bus, deletes, log: log.child({ component: 'scheduler' }) })
  const schedules = new ScheduleService({ repo: scheduleRepo, vms, scheduler, deletes, checkBackupDir: (vm, dir) => backups.checkDir(vm, dir) })
  vms.onDelete({ files: () => [], forget: (vm) => schedules.forgetVm(vm) })
  scheduler.start()
  const idempotency = new IdempotencyRepo(db)
  const host = new HostInfo({ config, log, version: VERSION, startedAt, vmStates: () => vmStates(vmRepo, vms) })

  if (config.accel !== 'tcg') logAccelProbe(config, log)
  let closed = false
  return {
    config,
    log,
    db,
    bus,
    jobs,
    vms,
    snapshots,
    schedules,
    scheduler,
    blockJobs,
    backups,
    state,
    checker,
    reconciler,
    repos: { snapshots: snapshotRepo, journal: journalRepo },
    app: (opts = {}) =>
      buildApp({
        services: { vms, jobs, bus, snapshots, schedules, blockJobs, backups, state, exports, checker, reconciler, idempotency, host, vmDir: (vm) => paths.vmDir(vm) },
        logger: log,
        version: VERSION,
        ...opts,
      }),
    async close(opts = {}) {
      if (closed) return
      closed = true
      scheduler.stop()
      await exports.closeAll()
      if (!(await settlesWithin(jobs.drain(), opts.drainTimeoutMs ?? 10_000))) log.warn('jobs still running at shutdown; leaving them to QEMU')
      await vms.close()
      db.close()
      await releaseLock()
    },
  }
}

/**
 * Refuses to start on a missing or empty store next to existing VM directories: SQLite would
 * create an empty store and every VM would be forgotten. `config.freshStore` (--fresh-store,
 * QMPD_FRESH_STORE=1) accepts it: a new store is created and the directories are left as they are.
 * @throws Error naming the store, the directories found and the way out.
 */
function refuseLostStore(config: Config, dbFile: string, log: Logger): void {
  let size: number | undefined
  try {
    size = statSync(dbFile).size
  } catch {
    size = undefined
  }
  if (size !== undefined && size > 0) return
  let dirs: string[] = []
  try {
    dirs = readdirSync(join(config.stateDir, 'vms'), { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => e.name)
      .sort()
  } catch {
    dirs = []
  }
  if (dirs.length === 0) return
  const what = size === undefined ? 'missing' : 'empty (0 bytes)'
  const list = dirs.slice(0, 10).join(', ') + (dirs.length > 10 ? `, … (${dirs.length} in all)` : '')
  if (config.freshStore) {
    log.warn({ store: dbFile, vmDirs: dirs.length }, `the store is ${what}; starting a fresh one as asked (--fresh-store): the VM directories are left as they are and no VM is defined`)
    return
  }
  throw new Error(
    `the store ${dbFile} is ${what} but ${join(config.stateDir, 'vms')} holds ${dirs.length} VM director${dirs.length === 1 ? 'y' : 'ies'} (${list}): ` +
      'refusing to start with an empty store, which would forget those VMs. Put the store back from a backup, or start with --fresh-store ' +
      '(QMPD_FRESH_STORE=1) to begin with an empty store and leave the directories as they are.',
  )
}

/**
 * The API token: QMPD_TOKEN when set, else <stateDir>/token, generated (mode 0600) on first start.
 * Written durably: temp file, fsync, rename.
 */
export function loadOrCreateToken(config: Config): { token: string; path?: string } {
  if (config.token) return { token: config.token }
  const path = join(config.stateDir, 'token')
  if (existsSync(path)) return { token: readFileSync(path, 'utf8').trim(), path }
  const token = randomBytes(32).toString('base64url')
  const tmp = `${path}.tmp-${process.pid}`
  writeFileSync(tmp, token + '\n', { mode: 0o600 })
  const fd = openSync(tmp, 'r')
  fsyncSync(fd)
  closeSync(fd)
  renameSync(tmp, path)
  chmodSync(path, 0o600)
  return { token, path }
}

/** The state of every stored VM, from memory (quarantined ones as 'quarantined'): GET /v1/host's counts. */
function vmStates(repo: VmRepo, vms: VmManager): Array<VmState | 'quarantined'> {
  const out: Array<VmState | 'quarantined'> = repo.quarantine.vms().map(() => 'quarantined' as const)
  for (const r of repo.list()) {
    try {
      out.push(vms.record(r.name).runtime.state)
    } catch {
      /* deleted meanwhile */
    }
  }
  return out
}
