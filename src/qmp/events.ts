/**
 * Typed map of QMP events: name → data shape, from QEMU 7.2's QAPI schema (qapi/*.json, checked
 * against `query-qmp-schema` of QEMU 7.2.22). Events that carry no members arrive on the wire
 * WITHOUT a `data` key (e.g. `{"timestamp": …, "event": "STOP"}`); the client normalizes that
 * to `data: {}` so every QmpEvent has one.
 */

import { z } from 'zod'
import {
  JOB_STATUSES,
  JOB_TYPES,
  MIGRATION_STATUSES,
  type BlockErrorAction,
  type IoOperationType,
  type JobStatus,
  type JobType,
  type MigrationStatus,
  type ShutdownCause,
  type SocketAddress,
} from './commands.ts'

/** Time QEMU queued the event (host clock); both are -1 when the clock could not be read (qmp-spec.rst). */
export interface QmpTimestamp {
  seconds: number
  microseconds: number
}

/** Data of a finished/cancelled/ready block job event, qapi/block-core.json. `device` is the job id. */
export interface BlockJobEventData {
  type: JobType
  device: string
  len: number
  offset: number
  speed: number
}

/** Why the guest panicked / crash-loaded, qapi/run-state.json GuestPanicInformation (kept loose). */
export interface GuestPanicData {
  action: 'pause' | 'poweroff' | 'run'
  info?: { type: 'hyper-v' | 's390'; [k: string]: unknown }
}

type NoData = Record<string, never>

/**
 * Event name → data, for every event QEMU 7.2 can emit. Those qmpd acts on are typed in full;
 * display/network/COLO ones it only logs keep their QAPI members but fewer comments.
 */
export interface Events {
  /** The guest stopped running (stop, snapshot-save, migration end, I/O error with werror=stop, …). */
  STOP: NoData
  /** The guest runs again (cont, end of snapshot-load, …). */
  RESUME: NoData
  /** QEMU is shutting down or the guest powered off; with -no-shutdown the process stays. */
  SHUTDOWN: { guest: boolean; reason: ShutdownCause }
  /** system_powerdown was issued (ACPI request sent; the guest may ignore it). */
  POWERDOWN: NoData
  RESET: { guest: boolean; reason: ShutdownCause }
  SUSPEND: NoData
  SUSPEND_DISK: NoData
  WAKEUP: NoData
  WATCHDOG: { action: 'reset' | 'shutdown' | 'poweroff' | 'pause' | 'debug' | 'none' | 'inject-nmi' }
  GUEST_PANICKED: GuestPanicData
  GUEST_CRASHLOADED: GuestPanicData
  MEMORY_FAILURE: {
    recipient: 'hypervisor' | 'guest'
    action: 'ignore' | 'inject' | 'fatal' | 'reset'
    flags: { 'action-required': boolean; recursive: boolean }
  }
  DEVICE_TRAY_MOVED: { device: string; id: string; 'tray-open': boolean }
  PR_MANAGER_STATUS_CHANGED: { id: string; connected: boolean }
  BLOCK_IMAGE_CORRUPTED: {
    device: string
    'node-name'?: string
    msg: string
    offset?: number
    size?: number
    fatal: boolean
  }
  /** A guest I/O failed; with action 'stop' the VM is now paused (io-error run state). */
  BLOCK_IO_ERROR: {
    device: string
    'node-name'?: string
    operation: IoOperationType
    action: BlockErrorAction
    nospace?: boolean
    reason: string
  }
  /** Legacy block-job event: the job finished; `error` is set when it failed. */
  BLOCK_JOB_COMPLETED: BlockJobEventData & { error?: string }
  BLOCK_JOB_CANCELLED: BlockJobEventData
  BLOCK_JOB_ERROR: { device: string; operation: IoOperationType; action: BlockErrorAction }
  /** The job is synchronized (mirror, active commit) and waits for job-complete or job-cancel. */
  BLOCK_JOB_READY: BlockJobEventData
  /** With auto-finalize off, the job waits for job-finalize. */
  BLOCK_JOB_PENDING: { type: JobType; id: string }
  BLOCK_WRITE_THRESHOLD: { 'node-name': string; 'amount-exceeded': number; 'write-threshold': number }
  QUORUM_FAILURE: { reference: string; 'sector-num': number; 'sectors-count': number }
  QUORUM_REPORT_BAD: {
    type: 'read' | 'write' | 'flush'
    error?: string
    'node-name': string
    'sector-num': number
    'sectors-count': number
  }
  /** Every job state transition (qapi/job.json); the event to wait on for all jobs, incl. snapshot-*. */
  JOB_STATUS_CHANGE: { id: string; status: JobStatus }
  BLOCK_EXPORT_DELETED: { id: string }
  VSERPORT_CHANGE: { id: string; open: boolean }
  DUMP_COMPLETED: {
    result: { status: 'none' | 'active' | 'completed' | 'failed'; completed: number; total: number }
    error?: string
  }
  NIC_RX_FILTER_CHANGED: { name?: string; path: string }
  FAILOVER_NEGOTIATED: { 'device-id': string }
  NETDEV_STREAM_CONNECTED: { 'netdev-id': string; addr: SocketAddress }
  NETDEV_STREAM_DISCONNECTED: { 'netdev-id': string }
  RDMA_GID_STATUS_CHANGED: { netdev: string; 'gid-status': boolean; 'subnet-prefix': number; 'interface-id': number }
  SPICE_CONNECTED: { server: Record<string, unknown>; client: Record<string, unknown> }
  SPICE_INITIALIZED: { server: Record<string, unknown>; client: Record<string, unknown> }
  SPICE_DISCONNECTED: { server: Record<string, unknown>; client: Record<string, unknown> }
  SPICE_MIGRATE_COMPLETED: NoData
  VNC_CONNECTED: { server: Record<string, unknown>; client: Record<string, unknown> }
  VNC_INITIALIZED: { server: Record<string, unknown>; client: Record<string, unknown> }
  VNC_DISCONNECTED: { server: Record<string, unknown>; client: Record<string, unknown> }
  /** Sent only while the `events` migration capability is on (off by default). */
  MIGRATION: { status: MigrationStatus }
  /** Start of each RAM pass; also needs the `events` capability. */
  MIGRATION_PASS: { pass: number }
  COLO_EXIT: { mode: 'none' | 'primary' | 'secondary'; reason: 'none' | 'request' | 'error' | 'processing' }
  UNPLUG_PRIMARY: { 'device-id': string }
  /** device_del finished (for guest-visible devices only after the guest released it). */
  DEVICE_DELETED: { device?: string; path: string }
  DEVICE_UNPLUG_GUEST_ERROR: { device?: string; path: string }
  BALLOON_CHANGE: { actual: number }
  MEMORY_DEVICE_SIZE_CHANGE: { id?: string; size: number; 'qom-path': string }
  MEM_UNPLUG_ERROR: { device: string; msg: string }
  RTC_CHANGE: { offset: number; 'qom-path': string }
  VFU_CLIENT_HANGUP: { 'vfu-id': string; 'vfu-qom-path': string; 'dev-id': string; 'dev-qom-path': string }
  ACPI_DEVICE_OST: {
    info: { device?: string; slot: string; 'slot-type': 'DIMM' | 'CPU'; source: number; status: number }
  }
}

/** Name of an event QEMU 7.2 can emit. */
export type EventName = keyof Events

/** Every EventName; events with other names (a newer QEMU) are reported as 'unknownEvent' only. */
export const EVENT_NAMES: ReadonlySet<string> = new Set<EventName>([
  'STOP',
  'RESUME',
  'SHUTDOWN',
  'POWERDOWN',
  'RESET',
  'SUSPEND',
  'SUSPEND_DISK',
  'WAKEUP',
  'WATCHDOG',
  'GUEST_PANICKED',
  'GUEST_CRASHLOADED',
  'MEMORY_FAILURE',
  'DEVICE_TRAY_MOVED',
  'PR_MANAGER_STATUS_CHANGED',
  'BLOCK_IMAGE_CORRUPTED',
  'BLOCK_IO_ERROR',
  'BLOCK_JOB_COMPLETED',
  'BLOCK_JOB_CANCELLED',
  'BLOCK_JOB_ERROR',
  'BLOCK_JOB_READY',
  'BLOCK_JOB_PENDING',
  'BLOCK_WRITE_THRESHOLD',
  'QUORUM_FAILURE',
  'QUORUM_REPORT_BAD',
  'JOB_STATUS_CHANGE',
  'BLOCK_EXPORT_DELETED',
  'VSERPORT_CHANGE',
  'DUMP_COMPLETED',
  'NIC_RX_FILTER_CHANGED',
  'FAILOVER_NEGOTIATED',
  'NETDEV_STREAM_CONNECTED',
  'NETDEV_STREAM_DISCONNECTED',
  'RDMA_GID_STATUS_CHANGED',
  'SPICE_CONNECTED',
  'SPICE_INITIALIZED',
  'SPICE_DISCONNECTED',
  'SPICE_MIGRATE_COMPLETED',
  'VNC_CONNECTED',
  'VNC_INITIALIZED',
  'VNC_DISCONNECTED',
  'MIGRATION',
  'MIGRATION_PASS',
  'COLO_EXIT',
  'UNPLUG_PRIMARY',
  'DEVICE_DELETED',
  'DEVICE_UNPLUG_GUEST_ERROR',
  'BALLOON_CHANGE',
  'MEMORY_DEVICE_SIZE_CHANGE',
  'MEM_UNPLUG_ERROR',
  'RTC_CHANGE',
  'VFU_CLIENT_HANGUP',
  'ACPI_DEVICE_OST',
])

/** True when `name` is an event of the typed map. */
export function isEventName(name: string): name is EventName {
  return EVENT_NAMES.has(name)
}

/**
 * One QMP event as delivered by the client: a union discriminated on `event`, so
 * `if (e.event === 'JOB_STATUS_CHANGE') e.data.status` is typed. QmpEvent<'STOP' | 'RESUME'>
 * narrows to those names.
 */
export type QmpEvent<N extends EventName = EventName> = {
  [K in N]: { event: K; data: Events[K]; timestamp: QmpTimestamp }
}[N]

/** An event whose name is not in the 7.2 map (only a newer QEMU sends these). */
export interface UnknownQmpEvent {
  event: string
  data: Record<string, unknown>
  timestamp: QmpTimestamp
}

// ---------------------------------------------------------------------------------------------
// Validation (CONVENTIONS #10) of the events qmpd makes decisions on. Loose objects on purpose:
// QEMU adds members to events across releases (e.g. BLOCK_IO_ERROR gains qom-path in 9.x), and
// rejecting such an event would leave a job waiter hanging. Missing or mistyped members are
// still caught. Everything else is only checked for the envelope (cheap during floods).
// ---------------------------------------------------------------------------------------------

const blockJobData = {
  type: z.enum(JOB_TYPES),
  device: z.string(),
  len: z.number(),
  offset: z.number(),
  speed: z.number(),
}

/** zod schemas for the data of the events whose contents drive decisions. */
export const eventDataSchemas: { readonly [N in EventName]?: z.ZodType } = {
  SHUTDOWN: z.looseObject({ guest: z.boolean(), reason: z.string() }),
  RESET: z.looseObject({ guest: z.boolean(), reason: z.string() }),
  JOB_STATUS_CHANGE: z.looseObject({ id: z.string(), status: z.enum(JOB_STATUSES) }),
  BLOCK_JOB_COMPLETED: z.looseObject({ ...blockJobData, error: z.string().optional() }),
  BLOCK_JOB_CANCELLED: z.looseObject(blockJobData),
  BLOCK_JOB_READY: z.looseObject(blockJobData),
  BLOCK_JOB_PENDING: z.looseObject({ type: z.enum(JOB_TYPES), id: z.string() }),
  BLOCK_JOB_ERROR: z.looseObject({ device: z.string(), operation: z.string(), action: z.string() }),
  BLOCK_IO_ERROR: z.looseObject({ device: z.string(), operation: z.string(), action: z.string(), reason: z.string() }),
  MIGRATION: z.looseObject({ status: z.enum(MIGRATION_STATUSES) }),
  MIGRATION_PASS: z.looseObject({ pass: z.number() }),
  DEVICE_DELETED: z.looseObject({ device: z.string().optional(), path: z.string() }),
}
