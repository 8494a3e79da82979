/**
 * Typed map of every QMP command qmpd issues: wire name → {args, ret}. Shapes are copied from
 * QEMU 7.2's QAPI schema (qapi/*.json; checked against `query-qmp-schema` of QEMU 7.2.22).
 * Optional QAPI members ("*name") are optional properties here; `args: undefined` means the
 * command takes no arguments. Wire names live here and in thin wrappers only (CONVENTIONS #1).
 */

import { z } from 'zod'

// ---------------------------------------------------------------------------------------------
// Shared enums and structs (qapi/run-state.json, qapi/job.json, qapi/block-core.json, …)
// ---------------------------------------------------------------------------------------------

/** Guest run state, qapi/run-state.json RunState. */
export type RunState =
  | 'debug'
  | 'inmigrate'
  | 'internal-error'
  | 'io-error'
  | 'paused'
  | 'postmigrate'
  | 'prelaunch'
  | 'finish-migrate'
  | 'restore-vm'
  | 'running'
  | 'save-vm'
  | 'shutdown'
  | 'suspended'
  | 'watchdog'
  | 'guest-panicked'
  | 'colo'

/** Every RunState value, for validation. */
export const RUN_STATES = [
  'debug',
  'inmigrate',
  'internal-error',
  'io-error',
  'paused',
  'postmigrate',
  'prelaunch',
  'finish-migrate',
  'restore-vm',
  'running',
  'save-vm',
  'shutdown',
  'suspended',
  'watchdog',
  'guest-panicked',
  'colo',
] as const satisfies readonly RunState[]

/** Why the VM shut down or reset, qapi/run-state.json ShutdownCause. */
export type ShutdownCause =
  | 'none'
  | 'host-error'
  | 'host-qmp-quit'
  | 'host-qmp-system-reset'
  | 'host-signal'
  | 'host-ui'
  | 'guest-shutdown'
  | 'guest-reset'
  | 'guest-panic'
  | 'subsystem-reset'
  | 'snapshot-load'

/** Job kinds, qapi/job.json JobType. snapshot-* are the internal system checkpoint jobs. */
export type JobType =
  | 'commit'
  | 'stream'
  | 'mirror'
  | 'backup'
  | 'create'
  | 'amend'
  | 'snapshot-load'
  | 'snapshot-save'
  | 'snapshot-delete'

/** Every JobType value. */
export const JOB_TYPES = [
  'commit',
  'stream',
  'mirror',
  'backup',
  'create',
  'amend',
  'snapshot-load',
  'snapshot-save',
  'snapshot-delete',
] as const satisfies readonly JobType[]

/** Job lifecycle states, qapi/job.json JobStatus (see the state table there). */
export type JobStatus =
  | 'undefined'
  | 'created'
  | 'running'
  | 'paused'
  | 'ready'
  | 'standby'
  | 'waiting'
  | 'pending'
  | 'aborting'
  | 'concluded'
  | 'null'

/** Every JobStatus value. */
export const JOB_STATUSES = [
  'undefined',
  'created',
  'running',
  'paused',
  'ready',
  'standby',
  'waiting',
  'pending',
  'aborting',
  'concluded',
  'null',
] as const satisfies readonly JobStatus[]

/** Migration states, qapi/migration.json MigrationStatus. */
export type MigrationStatus =
  | 'none'
  | 'setup'
  | 'cancelling'
  | 'cancelled'
  | 'active'
  | 'postcopy-active'
  | 'postcopy-paused'
  | 'postcopy-recover'
  | 'completed'
  | 'failed'
  | 'colo'
  | 'pre-switchover'
  | 'device'
  | 'wait-unplug'
  /** Added in QEMU 9.0 (postcopy recovery; qmpd never starts postcopy, but MIGRATION events are validated against this list). */
  | 'postcopy-recover-setup'

/** Every MigrationStatus value. */
export const MIGRATION_STATUSES = [
  'none',
  'setup',
  'cancelling',
  'cancelled',
  'active',
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover',
  'completed',
  'failed',
  'colo',
  'pre-switchover',
  'device',
  'wait-unplug',
  'postcopy-recover-setup',
] as const satisfies readonly MigrationStatus[]

/** Migration capabilities of QEMU 7.2, qapi/migration.json MigrationCapability. */
export type MigrationCapability =
  | 'xbzrle'
  | 'rdma-pin-all'
  | 'auto-converge'
  | 'zero-blocks'
  | 'compress'
  | 'events'
  | 'postcopy-ram'
  | 'x-colo'
  | 'release-ram'
  | 'block'
  | 'return-path'
  | 'pause-before-switchover'
  | 'multifd'
  | 'dirty-bitmaps'
  | 'postcopy-blocktime'
  | 'late-block-activate'
  | 'x-ignore-shared'
  | 'validate-uuid'
  | 'background-snapshot'
  | 'zero-copy-send'
  | 'postcopy-preempt'
  /** QEMU 9.0+: RAM pages at fixed offsets of a file: migration (multifd writes them in parallel). */
  | 'mapped-ram'

/** One capability switch, as taken by migrate-set-capabilities and returned by query-migrate-capabilities. */
export interface MigrationCapabilityStatus {
  capability: MigrationCapability
  state: boolean
}

/** Block-job error policy, qapi/block-core.json BlockdevOnError. */
export type BlockdevOnError = 'report' | 'ignore' | 'enospc' | 'stop' | 'auto'

/** Copy modes of mirror/backup, qapi/block-core.json MirrorSyncMode. */
export type MirrorSyncMode = 'top' | 'full' | 'none' | 'incremental' | 'bitmap'

/** How blockdev-snapshot-sync treats the overlay file, qapi/block-core.json NewImageMode. */
export type NewImageMode = 'existing' | 'absolute-paths'

/** Block I/O status, qapi/block-core.json BlockDeviceIoStatus. */
export type BlockDeviceIoStatus = 'ok' | 'failed' | 'nospace'

/** A read or write, qapi/block-core.json IoOperationType. */
export type IoOperationType = 'read' | 'write'

/** Action taken on an I/O error, qapi/block-core.json BlockErrorAction. */
export type BlockErrorAction = 'ignore' | 'report' | 'stop'

/** Zero-write detection, qapi/block-core.json BlockdevDetectZeroesOptions. */
export type DetectZeroes = 'off' | 'on' | 'unmap'

/** Socket addresses in the newer flat form, qapi/sockets.json SocketAddress. */
export type SocketAddress =
  | { type: 'inet'; host: string; port: string; numeric?: boolean; to?: number; ipv4?: boolean; ipv6?: boolean; 'keep-alive'?: boolean; mptcp?: boolean }
  | { type: 'unix'; path: string; abstract?: boolean; tight?: boolean }
  | { type: 'vsock'; cid: string; port: string }
  | { type: 'fd'; str: string }

/**
 * Socket addresses in the legacy boxed form {type, data: {...}}, qapi/sockets.json
 * SocketAddressLegacy. nbd-server-start still takes this one in 7.2 (and later), unlike
 * block-export-add's vhost-user-blk `addr`, which is flat.
 */
export type SocketAddressLegacy =
  | { type: 'inet'; data: { host: string; port: string; numeric?: boolean; to?: number; ipv4?: boolean; ipv6?: boolean } }
  | { type: 'unix'; data: { path: string; abstract?: boolean; tight?: boolean } }
  | { type: 'vsock'; data: { cid: string; port: string } }
  | { type: 'fd'; data: { str: string } }

/** One internal snapshot of an image, qapi/block-core.json SnapshotInfo. */
export interface SnapshotInfo {
  id: string
  name: string
  'vm-state-size': number
  'date-sec': number
  'date-nsec': number
  'vm-clock-sec': number
  'vm-clock-nsec': number
  icount?: number
}

/** Image facts of a node, qapi/block-core.json ImageInfo (recursive through backing-image). */
export interface ImageInfo {
  filename: string
  format: string
  'dirty-flag'?: boolean
  'actual-size'?: number
  'virtual-size': number
  'cluster-size'?: number
  encrypted?: boolean
  compressed?: boolean
  'backing-filename'?: string
  'full-backing-filename'?: string
  'backing-filename-format'?: string
  snapshots?: SnapshotInfo[]
  'backing-image'?: ImageInfo
  /** Driver-specific data (qcow2: compat, bitmaps, …); kept loose on purpose. */
  'format-specific'?: { type: 'qcow2' | 'vmdk' | 'luks' | 'rbd'; data: Record<string, unknown> }
}

/** A dirty bitmap on a node, qapi/block-core.json BlockDirtyInfo. */
export interface BlockDirtyInfo {
  name?: string
  count: number
  granularity: number
  recording: boolean
  busy: boolean
  persistent: boolean
  inconsistent?: boolean
}

/** One block node, qapi/block-core.json BlockDeviceInfo (query-named-block-nodes, query-block's `inserted`). */
export interface BlockDeviceInfo {
  file: string
  'node-name'?: string
  ro: boolean
  drv: string
  backing_file?: string
  backing_file_depth: number
  encrypted: boolean
  detect_zeroes: DetectZeroes
  bps: number
  bps_rd: number
  bps_wr: number
  iops: number
  iops_rd: number
  iops_wr: number
  image: ImageInfo
  bps_max?: number
  bps_rd_max?: number
  bps_wr_max?: number
  iops_max?: number
  iops_rd_max?: number
  iops_wr_max?: number
  bps_max_length?: number
  bps_rd_max_length?: number
  bps_wr_max_length?: number
  iops_max_length?: number
  iops_rd_max_length?: number
  iops_wr_max_length?: number
  iops_size?: number
  group?: string
  cache: { writeback: boolean; direct: boolean; 'no-flush': boolean }
  write_threshold: number
  'dirty-bitmaps'?: BlockDirtyInfo[]
}

/** One block backend (a drive/device), qapi/block-core.json BlockInfo. */
export interface BlockInfo {
  device: string
  qdev?: string
  type: string
  removable: boolean
  locked: boolean
  inserted?: BlockDeviceInfo
  tray_open?: boolean
  'io-status'?: BlockDeviceIoStatus
}

/** One job, qapi/job.json JobInfo. `error` is set once a job concluded with a failure. */
export interface JobInfo {
  id: string
  type: JobType
  status: JobStatus
  'current-progress': number
  'total-progress': number
  error?: string
}

/** RAM/disk transfer statistics, qapi/migration.json MigrationStats. */
export interface MigrationStats {
  transferred: number
  remaining: number
  total: number
  duplicate: number
  skipped: number
  normal: number
  'normal-bytes': number
  'dirty-pages-rate': number
  mbps: number
  'dirty-sync-count': number
  'postcopy-requests': number
  'page-size': number
  'multifd-bytes': number
  'pages-per-second': number
  'precopy-bytes': number
  'downtime-bytes': number
  'postcopy-bytes': number
  'dirty-sync-missed-zero-copy': number
}

/** Reply of query-migrate, qapi/migration.json MigrationInfo. Fields appear only once relevant. */
export interface MigrationInfo {
  status?: MigrationStatus
  ram?: MigrationStats
  disk?: MigrationStats
  vfio?: { transferred: number }
  'xbzrle-cache'?: Record<string, number>
  'total-time'?: number
  'expected-downtime'?: number
  downtime?: number
  'setup-time'?: number
  'cpu-throttle-percentage'?: number
  'error-desc'?: string
  'blocked-reasons'?: string[]
  'postcopy-blocktime'?: number
  'postcopy-vcpu-blocktime'?: number[]
  compression?: Record<string, number>
  'socket-address'?: SocketAddress[]
}

/** Migration tunables, qapi/migration.json MigrateSetParameters (what migrate-set-parameters takes). */
export interface MigrationParameters {
  'announce-initial'?: number
  'announce-max'?: number
  'announce-rounds'?: number
  'announce-step'?: number
  'compress-level'?: number
  'compress-threads'?: number
  'compress-wait-thread'?: boolean
  'decompress-threads'?: number
  'throttle-trigger-threshold'?: number
  'cpu-throttle-initial'?: number
  'cpu-throttle-increment'?: number
  'cpu-throttle-tailslow'?: boolean
  'tls-creds'?: string
  'tls-hostname'?: string
  'tls-authz'?: string
  /** Bytes per second; QEMU 7.2 defaults to 32 MiB/s, far too low for a save to a local file. */
  'max-bandwidth'?: number
  /** Milliseconds. */
  'downtime-limit'?: number
  'x-checkpoint-delay'?: number
  'block-incremental'?: boolean
  'multifd-channels'?: number
  /** QEMU 9.1+: a mapped-ram file: migration opens the file O_DIRECT. */
  'direct-io'?: boolean
  'xbzrle-cache-size'?: number
  'max-postcopy-bandwidth'?: number
  'max-cpu-throttle'?: number
  'multifd-compression'?: 'none' | 'zlib' | 'zstd'
  'multifd-zlib-level'?: number
  'multifd-zstd-level'?: number
  'block-bitmap-mapping'?: Array<{
    'node-name': string
    alias: string
    bitmaps: Array<{ name: string; alias: string; transform?: { persistent?: boolean } }>
  }>
}

/** Arguments of migrate-set-parameters: like MigrationParameters, but TLS strings may be null to reset them. */
export type MigrateSetParametersArgs = Omit<MigrationParameters, 'tls-creds' | 'tls-hostname' | 'tls-authz'> & {
  'tls-creds'?: string | null
  'tls-hostname'?: string | null
  'tls-authz'?: string | null
}

/** A reference to a block node: its node-name, or an inline definition (qapi BlockdevRef). */
export type BlockdevRef = string | BlockdevOptions

/** Options every blockdev-add driver accepts, qapi/block-core.json BlockdevOptions base. */
export interface BlockdevOptionsBase {
  'node-name'?: string
  discard?: 'ignore' | 'unmap'
  cache?: { direct?: boolean; 'no-flush'?: boolean }
  'read-only'?: boolean
  'auto-read-only'?: boolean
  'force-share'?: boolean
  'detect-zeroes'?: DetectZeroes
}

/** blockdev-add of a host file, qapi BlockdevOptionsFile. */
export interface BlockdevOptionsFile extends BlockdevOptionsBase {
  driver: 'file'
  filename: string
  'pr-manager'?: string
  locking?: 'auto' | 'on' | 'off'
  aio?: 'threads' | 'native' | 'io_uring'
  'aio-max-batch'?: number
  'drop-cache'?: boolean
}

/** blockdev-add of a qcow2 format node, qapi BlockdevOptionsQcow2. */
export interface BlockdevOptionsQcow2 extends BlockdevOptionsBase {
  driver: 'qcow2'
  file: BlockdevRef
  /**
   * `null` opens the image with no backing at all: required for an overlay that is about to be
   * attached by `blockdev-snapshot` (docs/interop/live-block-operations.rst), which refuses an
   * overlay that already has a backing.
   */
  backing?: BlockdevRef | null
  'lazy-refcounts'?: boolean
  'pass-discard-request'?: boolean
  'pass-discard-snapshot'?: boolean
  'pass-discard-other'?: boolean
  'cache-size'?: number
  'l2-cache-size'?: number
  'l2-cache-entry-size'?: number
  'refcount-cache-size'?: number
  'cache-clean-interval'?: number
  'data-file'?: BlockdevRef
  'overlap-check'?: unknown
  encrypt?: unknown
}

/** blockdev-add of a raw format node, qapi BlockdevOptionsRaw. */
export interface BlockdevOptionsRaw extends BlockdevOptionsBase {
  driver: 'raw'
  file: BlockdevRef
  offset?: number
  size?: number
}

/** blockdev-add of a throttle filter, qapi BlockdevOptionsThrottle. */
export interface BlockdevOptionsThrottle extends BlockdevOptionsBase {
  driver: 'throttle'
  'throttle-group': string
  file: BlockdevRef
}

/** blockdev-add of the null-co test driver (handy in tests: no file needed). */
export interface BlockdevOptionsNull extends BlockdevOptionsBase {
  driver: 'null-co' | 'null-aio'
  size?: number
  'latency-ns'?: number
  'read-zeroes'?: boolean
}

/** blockdev-add arguments for the drivers qmpd uses; other drivers go through executeUnchecked. */
export type BlockdevOptions =
  | BlockdevOptionsFile
  | BlockdevOptionsQcow2
  | BlockdevOptionsRaw
  | BlockdevOptionsThrottle
  | BlockdevOptionsNull

/** Arguments of blockdev-snapshot: put `overlay` (already added, with `backing: null`) on top of `node`. */
export interface BlockdevSnapshotArgs {
  node: string
  overlay: string
}

/**
 * Arguments of blockdev-snapshot-sync: QEMU creates `snapshot-file` itself (unless mode
 * 'existing'), opens it as a new active layer. Give exactly one of device / node-name. The
 * backing path is written into the overlay as the backing node's filename was given.
 */
export interface BlockdevSnapshotSyncArgs {
  device?: string
  'node-name'?: string
  'snapshot-file': string
  'snapshot-node-name'?: string
  format?: string
  mode?: NewImageMode
}

/** Arguments of blockdev-snapshot-internal-sync: `device` may be a drive id or a node-name. */
export interface BlockdevSnapshotInternalArgs {
  device: string
  name: string
}

/** Arguments of block-dirty-bitmap-add, qapi BlockDirtyBitmapAdd. */
export interface BlockDirtyBitmapAddArgs {
  node: string
  name: string
  granularity?: number
  persistent?: boolean
  disabled?: boolean
}

/** A (node, bitmap name) pair, qapi BlockDirtyBitmap. */
export interface BlockDirtyBitmapArgs {
  node: string
  name: string
}

/** Arguments of block-dirty-bitmap-merge, qapi BlockDirtyBitmapMerge. */
export interface BlockDirtyBitmapMergeArgs {
  node: string
  target: string
  bitmaps: Array<string | BlockDirtyBitmapArgs>
}

/**
 * One action of a `transaction`, qapi/transaction.json TransactionAction. Actions are applied
 * all-or-nothing; on failure QEMU rolls back its graph but files created by
 * blockdev-snapshot-sync stay on disk.
 */
export type TransactionAction =
  | { type: 'abort'; data: Record<string, never> }
  | { type: 'blockdev-snapshot'; data: BlockdevSnapshotArgs }
  | { type: 'blockdev-snapshot-sync'; data: BlockdevSnapshotSyncArgs }
  | { type: 'blockdev-snapshot-internal-sync'; data: BlockdevSnapshotInternalArgs }
  | { type: 'block-dirty-bitmap-add'; data: BlockDirtyBitmapAddArgs }
  | { type: 'block-dirty-bitmap-remove'; data: BlockDirtyBitmapArgs }
  | { type: 'block-dirty-bitmap-clear'; data: BlockDirtyBitmapArgs }
  | { type: 'block-dirty-bitmap-enable'; data: BlockDirtyBitmapArgs }
  | { type: 'block-dirty-bitmap-disable'; data: BlockDirtyBitmapArgs }
  | { type: 'block-dirty-bitmap-merge'; data: BlockDirtyBitmapMergeArgs }
  | { type: 'blockdev-backup'; data: BlockdevBackupArgs }

/**
 * Arguments of blockdev-backup, qapi/block-core.json BlockdevBackup: copy `device` into the node
 * `target` from the instant the job starts. `bitmap` with sync incremental/bitmap picks the
 * clusters; with sync full and bitmap-mode on-success the bitmap restarts at that instant. With
 * sync 'none' and a target whose backing is `device`, this is image fleecing
 * (docs/interop/bitmaps.rst): the job's copy-before-write filter copies old data into the target
 * before the guest overwrites it.
 */
export interface BlockdevBackupArgs extends BlockJobCommonArgs {
  device: string
  target: string
  sync: 'full' | 'top' | 'none' | 'incremental' | 'bitmap'
  bitmap?: string
  'bitmap-mode'?: 'on-success' | 'never' | 'always'
  compress?: boolean
  'on-source-error'?: BlockdevOnError
  'on-target-error'?: BlockdevOnError
}

/** One entry of query-block-exports, qapi/block-export.json BlockExportInfo. */
export interface BlockExportInfo {
  id: string
  type: string
  'node-name': string
  'shutting-down': boolean
}

/** Options common to the block-job starting commands (qmpd always sets job-id and both autos to false). */
export interface BlockJobCommonArgs {
  'job-id'?: string
  speed?: number
  'filter-node-name'?: string
  'auto-finalize'?: boolean
  'auto-dismiss'?: boolean
}

/** Arguments of block-export-add, qapi/block-export.json BlockExportOptions (nbd and fuse typed). */
export type BlockExportOptions = {
  id: string
  'node-name': string
  writable?: boolean
  writethrough?: boolean
  'fixed-iothread'?: boolean
  iothread?: string
} & (
  | {
      type: 'nbd'
      name?: string
      description?: string
      bitmaps?: Array<string | BlockDirtyBitmapArgs>
      'allocation-depth'?: boolean
    }
  | { type: 'fuse'; mountpoint: string; growable?: boolean; 'allow-other'?: 'off' | 'on' | 'auto' }
)

/** Reply of query-version, qapi/control.json VersionInfo. */
export interface VersionInfo {
  qemu: { major: number; minor: number; micro: number }
  package: string
}

/** One device's or node's entry of query-blockstats, qapi/block-core.json BlockStats (the counters qmpd reads). */
export interface BlockStats {
  device?: string
  'node-name'?: string
  qdev?: string
  stats: {
    rd_bytes: number
    wr_bytes: number
    rd_operations: number
    wr_operations: number
    flush_operations: number
    rd_total_time_ns: number
    wr_total_time_ns: number
    flush_total_time_ns: number
  }
}

/** One entry of query-qmp-schema, qapi/introspect.json SchemaInfo (names are masked in the reply, commands keep theirs). */
export interface SchemaInfo {
  name: string
  'meta-type': string
}

/** Reply of query-status, qapi/run-state.json StatusInfo. `singlestep` is deprecated in 8.1 and gone later. */
export interface StatusInfo {
  status: RunState
  running: boolean
  singlestep?: boolean
}

/** An empty QMP return (`{"return": {}}`). */
export type Empty = Record<string, never>

// ---------------------------------------------------------------------------------------------
// The command map
// ---------------------------------------------------------------------------------------------

/**
 * Wire name → {args, ret} for every command qmpd issues against QEMU 7.2. Add a command here
 * (with its QAPI shape) before calling it; `executeUnchecked` is the escape hatch for the rest.
 */
export interface Commands {
  /** Capability negotiation; the client sends it during connect, QEMU refuses it afterwards (CommandNotFound). */
  qmp_capabilities: { args: { enable?: Array<'oob'> }; ret: Empty }
  'query-status': { args: undefined; ret: StatusInfo }
  'query-version': { args: undefined; ret: VersionInfo }
  'query-block': { args: undefined; ret: BlockInfo[] }
  /** `flat: true` omits the recursive backing-image, which otherwise makes replies O(depth²). */
  'query-named-block-nodes': { args: { flat?: boolean }; ret: BlockDeviceInfo[] }
  'query-jobs': { args: undefined; ret: JobInfo[] }
  'query-migrate': { args: undefined; ret: MigrationInfo }
  'query-migrate-capabilities': { args: undefined; ret: MigrationCapabilityStatus[] }
  'migrate-set-capabilities': { args: { capabilities: MigrationCapabilityStatus[] }; ret: Empty }
  'migrate-set-parameters': { args: MigrateSetParametersArgs; ret: Empty }
  'query-migrate-parameters': { args: undefined; ret: MigrationParameters }
  /** Returns at once; completion shows in MIGRATION events (capability `events`) or query-migrate. No `file:` URI in 7.2. */
  migrate: { args: { uri: string; blk?: boolean; inc?: boolean; detach?: boolean; resume?: boolean }; ret: Empty }
  /** Only legal in a QEMU started with `-incoming defer`. */
  'migrate-incoming': { args: { uri: string }; ret: Empty }
  migrate_cancel: { args: undefined; ret: Empty }
  /** Lets a migration paused by the pause-before-switchover capability go on from `state`. */
  'migrate-continue': { args: { state: MigrationStatus }; ret: Empty }
  stop: { args: undefined; ret: Empty }
  cont: { args: undefined; ret: Empty }
  system_powerdown: { args: undefined; ret: Empty }
  /** QEMU answers, emits SHUTDOWN (often before the answer) and closes the socket. */
  quit: { args: undefined; ret: Empty }
  /** Runs an HMP command; the reply is its text output (CRLF line ends), errors included as text. */
  'human-monitor-command': { args: { 'command-line': string; 'cpu-index'?: number }; ret: string }
  /** I/O counters per block device; query-nodes false: the attached devices only (GET /v1/vms/{vm}/stats). */
  'query-blockstats': { args: { 'query-nodes'?: boolean }; ret: BlockStats[] }
  /** The QAPI schema QEMU speaks (GET /v1/host's probe reads its command names). */
  'query-qmp-schema': { args: undefined; ret: SchemaInfo[] }
  /** QemuOpts-based command-line options and their parameters, qapi/misc.json CommandLineOptionInfo. */
  'query-command-line-options': { args: { option?: string }; ret: Array<{ option: string; parameters: Array<{ name: string; type: string }> }> }
  transaction: {
    args: { actions: TransactionAction[]; properties?: { 'completion-mode'?: 'individual' | 'grouped' } }
    ret: Empty
  }
  'blockdev-snapshot-sync': { args: BlockdevSnapshotSyncArgs; ret: Empty }
  'blockdev-snapshot-internal-sync': { args: BlockdevSnapshotInternalArgs; ret: Empty }
  /** Give id or name (or both). Unlike snapshot-delete, a missing snapshot is an error here. */
  'blockdev-snapshot-delete-internal-sync': { args: { device: string; id?: string; name?: string }; ret: SnapshotInfo }
  'block-dirty-bitmap-add': { args: BlockDirtyBitmapAddArgs; ret: Empty }
  'block-dirty-bitmap-remove': { args: BlockDirtyBitmapArgs; ret: Empty }
  'block-dirty-bitmap-merge': { args: BlockDirtyBitmapMergeArgs; ret: Empty }
  'blockdev-add': { args: BlockdevOptions; ret: Empty }
  'blockdev-del': { args: { 'node-name': string }; ret: Empty }
  /**
   * Commit `top` into `base`. Committing the active layer makes a job that reaches READY and
   * then needs job-complete (pivot); a non-active commit finishes on its own. Name base-node:
   * without it QEMU commits all the way down the chain.
   */
  'block-commit': {
    args: BlockJobCommonArgs & {
      device: string
      'base-node'?: string
      base?: string
      'top-node'?: string
      top?: string
      'backing-file'?: string
      'on-error'?: BlockdevOnError
    }
    ret: Empty
  }
  /** Pull backing data into `device`; finishes on its own (no job-complete). */
  'block-stream': {
    args: BlockJobCommonArgs & {
      device: string
      base?: string
      'base-node'?: string
      'backing-file'?: string
      bottom?: string
      'on-error'?: BlockdevOnError
    }
    ret: Empty
  }
  /** Copy to `target`; READY means synchronized, then job-complete pivots or job-cancel keeps a copy. */
  'blockdev-mirror': {
    args: BlockJobCommonArgs & {
      device: string
      target: string
      replaces?: string
      sync: MirrorSyncMode
      granularity?: number
      'buf-size'?: number
      'on-source-error'?: BlockdevOnError
      'on-target-error'?: BlockdevOnError
      'copy-mode'?: 'background' | 'write-blocking'
    }
    ret: Empty
  }
  'block-job-set-speed': { args: { device: string; speed: number }; ret: Empty }
  'job-complete': { args: { id: string }; ret: Empty }
  'job-finalize': { args: { id: string }; ret: Empty }
  'job-dismiss': { args: { id: string }; ret: Empty }
  'job-cancel': { args: { id: string }; ret: Empty }
  'job-pause': { args: { id: string }; ret: Empty }
  'job-resume': { args: { id: string }; ret: Empty }
  /**
   * Internal system checkpoint. Answers {} at once; the outcome is only in query-jobs[].error
   * once the job is concluded (then job-dismiss). All arguments are mandatory in 7.2.
   */
  'snapshot-save': { args: { 'job-id': string; tag: string; vmstate: string; devices: string[] }; ret: Empty }
  /** Like snapshot-save; on a running VM it stops, loads and resumes. */
  'snapshot-load': { args: { 'job-id': string; tag: string; vmstate: string; devices: string[] }; ret: Empty }
  /** Like snapshot-save; deleting a tag that does not exist succeeds silently. */
  'snapshot-delete': { args: { 'job-id': string; tag: string; devices: string[] }; ret: Empty }
  'nbd-server-start': {
    args: { addr: SocketAddressLegacy; 'tls-creds'?: string; 'tls-authz'?: string; 'max-connections'?: number }
    ret: Empty
  }
  'nbd-server-stop': { args: undefined; ret: Empty }
  'block-export-add': { args: BlockExportOptions; ret: Empty }
  'block-export-del': { args: { id: string; mode?: 'safe' | 'hard' }; ret: Empty }
  'query-block-exports': { args: undefined; ret: BlockExportInfo[] }
  /** Asynchronous for guest-visible devices: wait for DEVICE_DELETED. */
  device_del: { args: { id: string }; ret: Empty }
}

/** Wire name of a typed command. */
export type CommandName = keyof Commands

/** Arguments of command C (`undefined` when it takes none). */
export type CommandArgs<C extends CommandName> = Commands[C]['args']

/** Return value of command C. */
export type CommandReturn<C extends CommandName> = Commands[C]['ret']

// ---------------------------------------------------------------------------------------------
// Reply validation (CONVENTIONS #10), for every reply whose fields drive decisions. Small replies
// are strict objects: an unexpected field means we are talking to a QEMU we have not checked.
// The block replies are loose: they check the fields qmpd acts on (device, qdev, node names,
// drivers, files, the backing chain, internal snapshot tags) and let statistics pass unchecked.
// ---------------------------------------------------------------------------------------------

const jobInfoSchema = z.strictObject({
  id: z.string(),
  type: z.enum(JOB_TYPES),
  status: z.enum(JOB_STATUSES),
  'current-progress': z.number(),
  'total-progress': z.number(),
  error: z.string().optional(),
})

const snapshotInfoSchema = z.looseObject({
  id: z.string(),
  name: z.string(),
  'vm-state-size': z.number(),
  'date-sec': z.number(),
  'date-nsec': z.number(),
  'vm-clock-sec': z.number(),
  'vm-clock-nsec': z.number(),
  icount: z.number().optional(),
})

/** ImageInfo: the chain walk (liveChain) follows backing-image down from the top. */
const imageInfoSchema = z.looseObject({
  filename: z.string(),
  format: z.string(),
  'virtual-size': z.number(),
  'backing-filename': z.string().optional(),
  'full-backing-filename': z.string().optional(),
  snapshots: z.array(snapshotInfoSchema).optional(),
  get 'backing-image'() {
    return imageInfoSchema.optional()
  },
})

const blockDeviceInfoSchema = z.looseObject({
  file: z.string(),
  'node-name': z.string().optional(),
  ro: z.boolean(),
  drv: z.string(),
  backing_file: z.string().optional(),
  backing_file_depth: z.number(),
  image: imageInfoSchema,
})

const blockInfoSchema = z.looseObject({
  device: z.string(),
  qdev: z.string().optional(),
  type: z.string(),
  removable: z.boolean(),
  locked: z.boolean(),
  inserted: blockDeviceInfoSchema.optional(),
  tray_open: z.boolean().optional(),
  'io-status': z.enum(['ok', 'failed', 'nospace']).optional(),
})

/** zod schemas for the replies the client validates before resolving `execute`. */
export const replySchemas: { readonly [C in CommandName]?: z.ZodType<CommandReturn<C>> } = {
  'query-status': z.strictObject({
    status: z.enum(RUN_STATES),
    running: z.boolean(),
    singlestep: z.boolean().optional(),
  }),
  'query-version': z.strictObject({
    qemu: z.strictObject({ major: z.number().int(), minor: z.number().int(), micro: z.number().int() }),
    package: z.string(),
  }),
  'query-jobs': z.array(jobInfoSchema),
  // The loose schemas pass unknown members through, so their inferred type is wider than the
  // QAPI interfaces; the fields that are checked match them.
  'query-block': z.array(blockInfoSchema) as unknown as z.ZodType<BlockInfo[]>,
  'query-named-block-nodes': z.array(blockDeviceInfoSchema) as unknown as z.ZodType<BlockDeviceInfo[]>,
  // A capability QEMU 7.2 does not have (a newer QEMU) is not an error: it is never switched on.
  'query-migrate-capabilities': z.array(z.strictObject({ capability: z.string(), state: z.boolean() })) as unknown as z.ZodType<MigrationCapabilityStatus[]>,
  'blockdev-snapshot-delete-internal-sync': snapshotInfoSchema,
  // Only the fields that decisions hang on; the statistics stay unchecked to keep this cheap.
  'query-migrate': z.looseObject({
    status: z.enum(MIGRATION_STATUSES).optional(),
    'error-desc': z.string().optional(),
  }),
  'human-monitor-command': z.string(),
  'query-blockstats': z.array(
    z.looseObject({
      device: z.string().optional(),
      'node-name': z.string().optional(),
      qdev: z.string().optional(),
      stats: z.looseObject({
        rd_bytes: z.number(),
        wr_bytes: z.number(),
        rd_operations: z.number(),
        wr_operations: z.number(),
        flush_operations: z.number(),
        rd_total_time_ns: z.number(),
        wr_total_time_ns: z.number(),
        flush_total_time_ns: z.number(),
      }),
    }),
  ),
  'query-qmp-schema': z.array(z.looseObject({ name: z.string(), 'meta-type': z.string() })),
}
