// The one error tree of qmpd. Every error that crosses a layer is a QmpdError with a stable
// `code`; src/http/error-handler.ts alone maps codes to HTTP statuses. Raises nothing itself.

/** Stable error codes. Clients may switch on them; never rename one. */
export type ErrorCode =
  | 'INVALID_INPUT'
  | 'INVALID_PATH'
  | 'UNAUTHORIZED'
  /** The QMP escape hatch is off (the daemon runs without --qmp-passthrough). */
  | 'QMP_PASSTHROUGH_DISABLED'
  /** The QMP escape hatch is on, but this command is not in its allow-list (--qmp-allow). */
  | 'QMP_COMMAND_NOT_ALLOWED'
  /** QEMU refused a command a client sent through the escape hatch (its error class in details). */
  | 'QMP_COMMAND_REFUSED'
  /** No such route (the HTTP layer's 404 for an unknown path). */
  | 'NOT_FOUND'
  /** A known path with a method it does not serve (405, with an Allow header). */
  | 'METHOD_NOT_ALLOWED'
  | 'VM_NOT_FOUND'
  | 'VM_EXISTS'
  | 'JOB_NOT_FOUND'
  | 'SNAPSHOT_NOT_FOUND'
  | 'SNAPSHOT_EXISTS'
  /** No schedule of that id on the VM. */
  | 'SCHEDULE_NOT_FOUND'
  /** The VM has a schedule of that id already. */
  | 'SCHEDULE_EXISTS'
  /** No backup point with that id in any of the VM's backup chains. */
  | 'BACKUP_NOT_FOUND'
  | 'DISK_NOT_FOUND'
  | 'FILE_EXISTS'
  | 'INVALID_STATE'
  | 'BUSY'
  | 'NOT_SUPPORTED'
  /** The VM was adopted: the operation needs a new QEMU process, which qmpd cannot launch for it. */
  | 'ADOPTED_NEEDS_RELAUNCH'
  | 'QMP_COMMAND_FAILED'
  | 'QMP_DISCONNECTED'
  | 'QMP_PROTOCOL_ERROR'
  | 'QMP_CONNECT_FAILED'
  | 'QGA_COMMAND_FAILED'
  | 'QGA_UNAVAILABLE'
  | 'QEMU_NOT_FOUND'
  | 'QEMU_START_FAILED'
  | 'QEMU_IMG_FAILED'
  | 'VM_CRASHED'
  | 'JOB_CANCELLED'
  | 'INTERRUPTED'
  | 'IO_ERROR'
  /** The state directory's filesystem is full: the store (SQLite) cannot be written. */
  | 'DISK_FULL'
  /** A stored row of the VM fails its schema: the VM is `quarantined` until its definition is deleted. */
  | 'STORE_ROW_INVALID'
  /** The host lacks what the definition asks for (a tap device, a bridge, qemu-bridge-helper or its permission). */
  | 'HOST_RESOURCE_MISSING'
  /** A forwarded host port (nics[].user.hostfwd) is taken on this host. */
  | 'PORT_IN_USE'
  | 'TIMEOUT'
  /** An Idempotency-Key already answered another route or request body (409). */
  | 'IDEMPOTENCY_KEY_REUSED'
  /** QEMU reports a migration blocker (query-migrate blocked-reasons): a checkpoint, save or managed save would fail (409, reasons in details). */
  | 'MIGRATION_BLOCKED'
  /** A pull-mode NBD export holds the VM's disks: end it (DELETE /v1/vms/{vm}/exports/{id}) first (409). */
  | 'EXPORT_ACTIVE'
  | 'EXPORT_NOT_FOUND'
  /** The disk has no dirty bitmap of that name (404). */
  | 'BITMAP_NOT_FOUND'
  | 'INTERNAL'

/** Extra, machine-readable facts about an error (QEMU's error class, the command, the zod issues…). */
export type ErrorData = Record<string, unknown>

/** Base class of every error qmpd raises on purpose. */
export class QmpdError extends Error {
  readonly code: ErrorCode
  readonly data: ErrorData

  constructor(code: ErrorCode, message: string, data: ErrorData = {}, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'QmpdError'
    this.code = code
    this.data = data
  }
}

/** QEMU answered a command with {"error": {class, desc}}. */
export class QmpCommandError extends QmpdError {
  readonly qmpClass: string
  readonly desc: string
  readonly command: string

  constructor(command: string, qmpClass: string, desc: string) {
    super('QMP_COMMAND_FAILED', `${command}: ${desc}`, { qmpClass, command, desc })
    this.name = 'QmpCommandError'
    this.qmpClass = qmpClass
    this.desc = desc
    this.command = command
  }
}

/** The QMP connection ended (EOF, socket error, protocol violation, explicit close) while a command was pending. */
export class QmpDisconnectedError extends QmpdError {
  constructor(message: string, data: ErrorData = {}, options?: { cause?: unknown }) {
    super('QMP_DISCONNECTED', message, data, options)
    this.name = 'QmpDisconnectedError'
  }
}

/** An operation did not finish within its time limit. */
export class TimeoutError extends QmpdError {
  constructor(message: string, data: ErrorData = {}) {
    super('TIMEOUT', message, data)
    this.name = 'TimeoutError'
  }
}

/**
 * Wraps anything thrown into a QmpdError, keeping the original as cause.
 * @throws nothing: it returns the QmpdError to throw (JOB_CANCELLED for an AbortError, INTERNAL for anything else).
 */
export function toQmpdError(err: unknown): QmpdError {
  if (err instanceof QmpdError) return err
  if (err instanceof Error && err.name === 'AbortError') {
    return new QmpdError('JOB_CANCELLED', err.message || 'operation aborted', {}, { cause: err })
  }
  const message = err instanceof Error ? err.message : String(err)
  return new QmpdError('INTERNAL', message, {}, { cause: err })
}
