/**
 * QmpClient: one QMP session with one QEMU, over a unix or TCP socket. Written from the QMP
 * spec (docs/interop/qmp-spec.rst) and modelled on QEMU's python/qemu/qmp (protocol.py,
 * qmp_client.py, events.py): explicit run state, ids registered before the write, one
 * 'disconnected' per session that rejects everything pending with its cause.
 */

import { EventEmitter } from 'node:events'
import net from 'node:net'
import { performance } from 'node:perf_hooks'
import { pino, type Logger } from 'pino'
import { z } from 'zod'
import { QmpCommandError, QmpDisconnectedError, QmpdError, TimeoutError } from '../errors.ts'
import { replySchemas, type CommandArgs, type CommandName, type CommandReturn, type VersionInfo } from './commands.ts'
import {
  eventDataSchemas,
  isEventName,
  type EventName,
  type QmpEvent,
  type QmpTimestamp,
  type UnknownQmpEvent,
} from './events.ts'
import { nextTurn } from '../util.ts'
import { LineSplitter } from './framing.ts'
import { DEFAULT_CONNECT_TIMEOUT_MS, DISCONNECT_GRACE_MS, commandTimeoutMs } from './timeouts.ts'

/** Connection state (CONVENTIONS #2). Commands are only accepted in 'running'. */
export type QmpState = 'idle' | 'connecting' | 'running' | 'disconnecting'

/**
 * Where QEMU's QMP server listens: `{ path }` (unix socket), `{ host, port }` (TCP), or a string
 * 'unix:/path', '/path', 'tcp:host:port' or 'host:port' ('[::1]:4444' for IPv6).
 */
export type QmpAddress = string | { path: string } | { host: string; port: number }

/** Why a session ended; found in `cause.data.reason` of the disconnect cause. */
export type DisconnectReason = 'eof' | 'socket-error' | 'protocol-error' | 'client'

/** What QEMU announced in its greeting. */
export interface QmpGreeting {
  version: VersionInfo
  capabilities: string[]
}

/** Options of the QmpClient constructor. */
export interface QmpClientOptions {
  /** Parent logger; the client logs through a child with {component: 'qmp'}. Silent when absent. */
  logger?: Logger
  /** Longest accepted line in bytes (see framing.ts). */
  maxLineBytes?: number
}

/** Observers of every command's reply time (metrics); they must not throw or block. */
const replyObservers = new Set<(command: string, ms: number) => void>()

/** Calls `fn(command, ms)` for every reply (success or QMP error) of any client; returns the unsubscribe. */
export function observeQmpReplies(fn: (command: string, ms: number) => void): () => void {
  replyObservers.add(fn)
  return () => replyObservers.delete(fn)
}

/** Options of connect(). */
export interface ConnectOptions {
  /** Bounds socket connect + greeting + qmp_capabilities together. Default DEFAULT_CONNECT_TIMEOUT_MS. */
  timeoutMs?: number
  signal?: AbortSignal
  /**
   * Negotiate out-of-band execution (qmp-spec.rst "Out-of-band execution"). Off by default:
   * with it, QEMU may answer commands out of order, and only commands flagged allow-oob
   * (migrate-recover, migrate-pause) may use `exec-oob`. Connect fails if QEMU does not offer it.
   */
  oob?: boolean
}

/** Per-call options of execute(). */
export interface ExecuteOptions {
  /** Overrides the table in timeouts.ts; for the rare command whose run time is the work itself. */
  timeoutMs?: number
  /**
   * Stops waiting for the reply (rejects with `signal.reason`). QEMU still runs the command:
   * QMP has no way to cancel one; the late reply is dropped.
   */
  signal?: AbortSignal
  /** Send as `exec-oob`; needs `oob: true` at connect and a command that allows it. */
  oob?: boolean
}

/**
 * The trailing parameters of execute(C): no arguments for commands that take none, optional
 * arguments when every QAPI member is optional, required otherwise.
 */
export type ExecuteRest<C extends CommandName> =
  CommandArgs<C> extends undefined
    ? [args?: undefined, opts?: ExecuteOptions]
    : // eslint-disable-next-line @typescript-eslint/no-empty-object-type -- `{} extends T` is true exactly when every member of T is optional
      {} extends CommandArgs<C>
      ? [args?: CommandArgs<C>, opts?: ExecuteOptions]
      : [args: CommandArgs<C>, opts?: ExecuteOptions]

/** Options of events(). Filters run before buffering, so only matching events use the buffer. */
export interface EventsOptions<N extends EventName = EventName> {
  /** Only these event names (default: all typed events). */
  names?: readonly N[]
  /** Extra predicate; a throwing filter ends the iterator with that error. */
  filter?: (e: QmpEvent<N>) => boolean
  /** Ends the iterator at once (buffered events are discarded) and rejects with `signal.reason`. */
  signal?: AbortSignal
  /** The iterator rejects with TimeoutError once this long has passed since events() was called. */
  timeoutMs?: number
  /**
   * Cap on events received but not yet consumed (default 10 000). Going over it ends the
   * iterator with QmpdError('INTERNAL', reason 'event-buffer-overflow') after the buffered
   * events: a consumer that silently missed events could wait forever for one it lost.
   */
  maxBuffer?: number
}

/** Options of waitForEvent(). */
export interface WaitForEventOptions<N extends EventName> {
  filter?: (e: QmpEvent<N>) => boolean
  timeoutMs?: number
  signal?: AbortSignal
}

/** One tuple of listener arguments per typed QMP event name. */
export type QmpEventListenerArgs = { [N in EventName]: [event: QmpEvent<N>] }

/** Events emitted by QmpClient (an EventEmitter): every typed QMP event by its own name, plus these. */
export interface QmpClientEventMap extends QmpEventListenerArgs {
  /** Every typed QMP event. */
  event: [event: QmpEvent]
  /** An event whose name is not in events.ts (only from a newer QEMU). */
  unknownEvent: [event: UnknownQmpEvent]
  /** The handshake completed; the client is 'running'. */
  connected: [greeting: QmpGreeting]
  /** Once per session that reached 'running', after state went back to 'idle'. */
  disconnected: [cause: QmpdError]
}

/** Default maxBuffer of events(). */
export const DEFAULT_EVENT_BUFFER = 10_000

/** How many ids of timed-out/aborted commands are remembered, so their late replies drop quietly. */
const EXPIRED_IDS_KEPT = 4096

/** Longest excerpt of an offending line kept in a protocol error. */
const LINE_EXCERPT = 200

interface Pending {
  id: string
  command: string
  sentAt: number
  timer: NodeJS.Timeout
  signal: AbortSignal | undefined
  onAbort: (() => void) | undefined
  validate: z.ZodType | undefined
  resolve: (value: unknown) => void
  reject: (err: Error) => void
}

interface Subscriber {
  offer(e: QmpEvent): void
  end(err: Error): void
}

interface Handshake {
  resolve: () => void
  reject: (err: unknown) => void
}

const greetingSchema = z.looseObject({
  QMP: z.looseObject({
    version: z.looseObject({
      qemu: z.looseObject({ major: z.number(), minor: z.number(), micro: z.number() }),
      package: z.string(),
    }),
    capabilities: z.array(z.string()),
  }),
})

const timestampSchema = z.object({ seconds: z.number(), microseconds: z.number() })

/** Every QEMU job qmpd starts has a job-id with this prefix (re-attach also relies on it). */
export const OWN_JOB_PREFIX = 'qmpd-'

/**
 * Commands that never move a device to another block node (see QmpClient.graphEpoch). Everything
 * else (transaction, blockdev-*, job-complete, the HMP escape hatch, …) counts as a change.
 */
const GRAPH_NEUTRAL_COMMANDS: ReadonlySet<string> = new Set([
  'qmp_capabilities',
  'stop',
  'cont',
  'system_reset',
  'system_powerdown',
  'migrate-set-capabilities',
  'migrate-set-parameters',
  'migrate',
  'migrate-incoming',
  'migrate_cancel',
  'migrate-continue',
  'snapshot-save',
  'snapshot-load',
  'snapshot-delete',
  'blockdev-snapshot-internal-sync',
  'blockdev-snapshot-delete-internal-sync',
  'job-pause',
  'job-resume',
  'job-dismiss',
  'block-job-set-speed',
])

/**
 * A QMP client for one QEMU. Create one per VM; connect(), then execute()/events(); after a
 * disconnect the same instance may connect() again. Emits every QMP event ('event' and by
 * name), 'connected' and 'disconnected'. Listeners run synchronously in the socket's data
 * handler and must not block; a throwing listener is logged and skipped, never breaks dispatch.
 */
export class QmpClient extends EventEmitter<QmpClientEventMap> {
  private readonly log: Logger
  private readonly maxLineBytes: number | undefined
  private _state: QmpState = 'idle'
  private _greeting: QmpGreeting | undefined
  private _lastDisconnectCause: QmpdError | undefined
  private _oob = false
  private socket: net.Socket | undefined
  private splitter: LineSplitter | undefined
  private handshake: Handshake | undefined
  private greetingSeen = false
  private wantOob = false
  private nextId = 1
  private _graphEpoch = 0
  /** Settlements waiting for their turn (nextTurn); a newer one must not overtake them. */
  private deferred = 0
  /** QEMU has reported STOP and no RESUME since: the guest waits for us. */
  private guestStopped = false
  private readonly pending = new Map<string, Pending>()
  /** Error replies without id since the last reply with one (see onIdlessError). */
  private idless: { class: string; desc: string; count: number } | undefined
  /** A query-version sent to learn which commands those id-less errors answered is in flight. */
  private idlessProbe = false
  private readonly expired = new Set<string>()
  private readonly subscribers = new Set<Subscriber>()
  private closing: Promise<void> | undefined

  /** Creates an idle client; nothing happens until connect(). */
  constructor(opts: QmpClientOptions = {}) {
    super()
    this.log = (opts.logger ?? pino({ enabled: false })).child({ component: 'qmp' })
    this.maxLineBytes = opts.maxLineBytes
  }

  /** Current connection state. */
  get state(): QmpState {
    return this._state
  }

  /** The greeting of the current (or last) session; undefined before the first connect. */
  get greeting(): QmpGreeting | undefined {
    return this._greeting
  }

  /** Why the last session ended (reason in `data.reason`); undefined if none has ended yet. */
  get lastDisconnectCause(): QmpdError | undefined {
    return this._lastDisconnectCause
  }

  /** True when out-of-band execution was negotiated for the current session. */
  get oobEnabled(): boolean {
    return this._oob
  }

  /**
   * Counts commands sent (and sessions opened) that may have changed which block node a device
   * is attached to: anything but queries and the run-state, migration and internal-snapshot
   * commands in GRAPH_NEUTRAL_COMMANDS; also job and device-removal events. Caches of the block
   * graph stay valid only while it holds.
   */
  get graphEpoch(): number {
    return this._graphEpoch
  }

  /** Number of commands awaiting a reply (diagnostics, tests). */
  get pendingCount(): number {
    return this.pending.size
  }

  /** Number of live events()/waitForEvent() subscriptions (diagnostics, tests). */
  get subscriberCount(): number {
    return this.subscribers.size
  }

  /**
   * Connects, reads the greeting and negotiates capabilities; resolves in 'running'. Only legal
   * in 'idle'. On any failure (refused, no greeting, timeout, abort) the client is back in
   * 'idle' and the promise rejects with QmpdError('QMP_CONNECT_FAILED') whose cause says why.
   * QEMU serves one QMP client per socket: a second client gets no greeting until the first
   * leaves, so it fails by timeout.
   * @throws QmpdError QMP_CONNECT_FAILED when the socket, greeting or negotiation fails; INVALID_STATE when not idle.
   */
  async connect(address: QmpAddress, opts: ConnectOptions = {}): Promise<QmpGreeting> {
    if (this._state !== 'idle') {
      throw new QmpdError('INVALID_STATE', `connect() called while ${this._state}`, { state: this._state })
    }
    const target = parseAddress(address)
    const where = describeAddress(target)
    const timeoutMs = opts.timeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS
    const { signal } = opts
    if (signal?.aborted) {
      throw new QmpdError('QMP_CONNECT_FAILED', `cannot connect to QMP at ${where}: aborted`, { address: where }, { cause: signal.reason })
    }

    this.setState('connecting')
    this._oob = false
    this.greetingSeen = false
    this.wantOob = opts.oob === true
    const started = performance.now()
    const socket = net.connect(target)
    this.socket = socket
    this.splitter = new LineSplitter({ maxLineBytes: this.maxLineBytes })
    this.attachSocket(socket)

    let timer: NodeJS.Timeout | undefined
    let onAbort: (() => void) | undefined
    try {
      // Settled by onGreeting → qmp_capabilities reply, or rejected by whatever ends the
      // half-open session first (socket error/EOF, protocol error, timeout, abort, disconnect()).
      await new Promise<void>((resolve, reject) => {
        this.handshake = { resolve, reject }
        timer = setTimeout(
          () => reject(new TimeoutError(`no QMP handshake within ${timeoutMs} ms`, { timeoutMs, address: where })),
          timeoutMs,
        )
        if (signal) {
          onAbort = () => reject(signal.reason)
          signal.addEventListener('abort', onAbort, { once: true })
        }
      })
    } catch (err) {
      this.abandonConnect(socket, err)
      const msg = err instanceof Error ? err.message : String(err)
      this.log.debug({ address: where, err }, 'qmp connect failed')
      throw new QmpdError('QMP_CONNECT_FAILED', `cannot connect to QMP at ${where}: ${msg}`, { address: where }, { cause: err })
    } finally {
      clearTimeout(timer)
      if (onAbort) signal?.removeEventListener('abort', onAbort)
      this.handshake = undefined
    }

    const greeting = this._greeting as QmpGreeting
    this._graphEpoch++
    this.guestStopped = false
    this.setState('running')
    this.log.debug({ address: where, version: greeting.version.qemu, ms: elapsed(started) }, 'qmp connected')
    this.safeEmit('connected', greeting)
    return greeting
  }

  /**
   * Sends a typed command and resolves with its `return` value (validated with zod for the
   * replies listed in commands.ts replySchemas). Only in 'running'; otherwise rejects at once
   * with QmpDisconnectedError. Rejects with QmpCommandError for a QMP error reply, TimeoutError
   * after the command's timeout (timeouts.ts), QmpDisconnectedError if the session ends first.
   * @throws QmpCommandError (QMP_COMMAND_FAILED) for an error reply; QmpdError QMP_PROTOCOL_ERROR for a reply its schema refuses.
   * @throws QmpDisconnectedError (QMP_DISCONNECTED) when not running or the session ends; TimeoutError (TIMEOUT).
   */
  execute<C extends CommandName>(command: C, ...rest: ExecuteRest<C>): Promise<CommandReturn<C>> {
    const [args, opts] = rest as [Record<string, unknown> | undefined, ExecuteOptions | undefined]
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-type-assertion -- tsc needs it (the rule misjudges this generic)
    return this.send(command, args, opts, replySchemas[command] as z.ZodType | undefined) as Promise<CommandReturn<C>>
  }

  /**
   * Escape hatch for a command absent from the typed map: sent as is, the reply is returned
   * unvalidated. Same state, error and timeout rules as execute().
   * @throws QmpCommandError, QmpDisconnectedError, TimeoutError as execute().
   */
  executeUnchecked(command: string, args?: Record<string, unknown>, opts?: ExecuteOptions): Promise<unknown> {
    return this.send(command, args, opts)
  }

  /**
   * Runs an HMP command line through human-monitor-command and returns its text output. HMP
   * reports most failures as text in that output, not as a QMP error: callers must inspect it.
   */
  hmp(commandLine: string, opts?: ExecuteOptions): Promise<string> {
    return this.execute('human-monitor-command', { 'command-line': commandLine }, opts)
  }

  /**
   * Subscribes to events from this moment on (subscribe BEFORE issuing the command that causes
   * them) and returns an async iterator over them. Legal only in 'running'; otherwise the first
   * next() rejects with QmpDisconnectedError. The iterator rejects with QmpDisconnectedError
   * when the session ends (after the events buffered before that), with TimeoutError after
   * `timeoutMs`, with `signal.reason` on abort. It unsubscribes whenever it finishes, including
   * `break` out of `for await` (which calls return()). The buffer is capped: see maxBuffer.
   */
  events<N extends EventName = EventName>(opts: EventsOptions<N> = {}): AsyncIterableIterator<QmpEvent<N>> {
    return new EventIterator<N>(this.subscribers, opts, this._state === 'running' ? undefined : this.notRunning('events()'))
  }

  /**
   * Resolves with the first event `name` matching `filter` from this moment on (call it before
   * issuing the command that causes the event, await it after). Rejects with TimeoutError,
   * `signal.reason`, or QmpDisconnectedError when the session ends. If the returned promise is
   * never awaited its rejection is swallowed rather than crashing the process, and its
   * subscription lives until timeout, abort or disconnect: pass one of timeoutMs / signal.
   */
  waitForEvent<N extends EventName>(name: N, opts: WaitForEventOptions<N> = {}): Promise<QmpEvent<N>> {
    const it = this.events<N>({ names: [name], filter: opts.filter, signal: opts.signal, timeoutMs: opts.timeoutMs, maxBuffer: 1 })
    const p = (async () => {
      try {
        const r = await it.next()
        if (r.done) throw new QmpDisconnectedError(`waitForEvent(${name}): subscription ended`, { event: name })
        return r.value
      } finally {
        await it.return?.()
      }
    })()
    p.catch(() => {})
    return p
  }

  /**
   * Ends the session: pending commands and subscriptions reject with QmpDisconnectedError
   * (cause reason 'client'), the socket is closed (gracefully, then forcibly after
   * DISCONNECT_GRACE_MS), 'disconnected' is emitted and the client is 'idle' when this resolves.
   * During 'connecting' it aborts the connect. A no-op in 'idle'.
   */
  async disconnect(): Promise<void> {
    if (this._state === 'idle') return
    if (this._state === 'disconnecting') return this.closing
    if (this._state === 'connecting') {
      const cause = new QmpdError('QMP_DISCONNECTED', 'disconnect() called during connect', { reason: 'client' })
      this.handshake?.reject(cause)
      if (this.socket) this.abandonConnect(this.socket, cause)
      return
    }
    const socket = this.socket as net.Socket
    const cause = new QmpdError('QMP_DISCONNECTED', 'disconnect() called', { reason: 'client' satisfies DisconnectReason })
    this.beginTeardown(cause)
    this.closing = new Promise<void>((resolve) => {
      if (socket.closed) {
        resolve()
        return
      }
      const timer = setTimeout(() => {
        socket.destroy()
        resolve()
      }, DISCONNECT_GRACE_MS)
      socket.once('close', () => {
        clearTimeout(timer)
        resolve()
      })
      // end() flushes what was written (a fire-and-forget `quit`, say) before the FIN.
      socket.end()
    })
    await this.closing
    this.closing = undefined
    this.finishTeardown(cause)
  }

  // ----------------------------------------------------------------------------------------
  // Sending
  // ----------------------------------------------------------------------------------------

  private send(command: string, args: Record<string, unknown> | undefined, opts: ExecuteOptions = {}, validate?: z.ZodType): Promise<unknown> {
    const handshaking = command === 'qmp_capabilities' && this._state === 'connecting'
    if (this._state !== 'running' && !handshaking) return Promise.reject(this.notRunning(command))
    const { signal } = opts
    if (signal?.aborted) return Promise.reject(signal.reason)
    if (opts.oob && !this._oob) {
      return Promise.reject(new QmpdError('INVALID_STATE', `${command}: out-of-band execution was not negotiated`, { command }))
    }
    const socket = this.socket as net.Socket
    const id = String(this.nextId++)
    if (!command.startsWith('query-') && !GRAPH_NEUTRAL_COMMANDS.has(command)) this._graphEpoch++
    const timeoutMs = opts.timeoutMs ?? commandTimeoutMs(command)

    return new Promise<unknown>((resolve, reject) => {
      const p: Pending = {
        id,
        command,
        sentAt: performance.now(),
        timer: setTimeout(() => {
          this.expire(p)
          this.log.warn({ id, command, timeoutMs }, 'qmp command timed out')
          reject(new TimeoutError(`${command}: no reply from QEMU within ${timeoutMs} ms`, { command, timeoutMs, id }))
        }, timeoutMs),
        signal,
        onAbort: undefined,
        validate,
        resolve,
        reject,
      }
      if (signal) {
        p.onAbort = () => {
          this.expire(p)
          this.log.debug({ id, command }, 'qmp command abandoned (aborted)')
          reject(signal.reason)
        }
        signal.addEventListener('abort', p.onAbort, { once: true })
      }
      // Registered before the write, so no reply can arrive for an id we do not know (CONVENTIONS #3).
      this.pending.set(id, p)
      const msg: Record<string, unknown> = { [opts.oob ? 'exec-oob' : 'execute']: command }
      if (args !== undefined) msg['arguments'] = args
      msg['id'] = id
      this.log.debug({ id, command }, 'qmp send')
      // A failed write surfaces as the socket's 'error' event, which rejects this command.
      socket.write(JSON.stringify(msg) + '\n')
    })
  }

  /** Forgets a pending command whose caller gave up; its reply, if any, is dropped quietly. */
  private expire(p: Pending): void {
    this.settle(p)
    this.expired.add(p.id)
    if (this.expired.size > EXPIRED_IDS_KEPT) {
      const oldest = this.expired.values().next().value
      if (oldest !== undefined) this.expired.delete(oldest)
    }
  }

  private settle(p: Pending): void {
    clearTimeout(p.timer)
    if (p.onAbort) p.signal?.removeEventListener('abort', p.onAbort)
    this.pending.delete(p.id)
  }

  private notRunning(what: string): QmpDisconnectedError {
    return new QmpDisconnectedError(
      `${what}: not connected to QMP (state ${this._state})`,
      { command: what, state: this._state },
      { cause: this._lastDisconnectCause },
    )
  }

  // ----------------------------------------------------------------------------------------
  // Receiving
  // ----------------------------------------------------------------------------------------

  private attachSocket(socket: net.Socket): void {
    socket.on('data', (chunk: Buffer) => this.onData(socket, chunk))
    socket.on('end', () => {
      this.onSocketGone(socket, new QmpdError('QMP_DISCONNECTED', 'QEMU closed the QMP connection (EOF)', { reason: 'eof' satisfies DisconnectReason }))
    })
    socket.on('error', (err: NodeJS.ErrnoException) => this.onSocketGone(socket, socketErrorCause(err)))
    socket.on('close', () => {
      this.onSocketGone(socket, new QmpdError('QMP_DISCONNECTED', 'QMP socket closed', { reason: 'eof' satisfies DisconnectReason }))
    })
  }

  private onData(socket: net.Socket, chunk: Buffer): void {
    if (this.sessionOver(socket)) return
    let lines: string[]
    try {
      lines = (this.splitter as LineSplitter).push(chunk)
    } catch (err) {
      this.protocolError(err instanceof QmpdError ? err.message : String(err), {}, err)
      return
    }
    for (const line of lines) {
      // A line may have ended the session (protocol error, error without id): stop there.
      if (this.sessionOver(socket)) return
      this.onLine(line)
    }
  }

  private sessionOver(socket: net.Socket): boolean {
    return socket !== this.socket || this._state === 'disconnecting' || this._state === 'idle'
  }

  private onLine(line: string): void {
    let msg: unknown
    try {
      msg = JSON.parse(line)
    } catch (err) {
      this.protocolError(`QEMU sent a line that is not JSON: ${excerpt(line)}`, { line: excerpt(line) }, err)
      return
    }
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
      this.protocolError(`QEMU sent a JSON value that is not an object: ${excerpt(line)}`, { line: excerpt(line) })
      return
    }
    const m = msg as Record<string, unknown>
    if (!this.greetingSeen) {
      this.onGreeting(m, line)
      return
    }
    if ('event' in m) this.onEvent(m, line)
    else if ('return' in m || 'error' in m) this.onReply(m, line)
    else if ('QMP' in m) this.protocolError('QEMU sent a second greeting', { line: excerpt(line) })
    else this.protocolError(`QEMU sent an unrecognized message: ${excerpt(line)}`, { line: excerpt(line) })
  }

  private onGreeting(m: Record<string, unknown>, line: string): void {
    const parsed = greetingSchema.safeParse(m)
    if (!parsed.success) {
      this.protocolError(`expected a QMP greeting, got: ${excerpt(line)}`, { line: excerpt(line) })
      return
    }
    const { version, capabilities } = parsed.data.QMP
    this.greetingSeen = true
    this._greeting = {
      version: { qemu: { major: version.qemu.major, minor: version.qemu.minor, micro: version.qemu.micro }, package: version.package },
      capabilities,
    }
    const handshake = this.handshake
    if (!handshake) return
    if (this.wantOob && !capabilities.includes('oob')) {
      handshake.reject(new QmpdError('NOT_SUPPORTED', 'QEMU does not offer the oob capability', { capabilities }))
      return
    }
    // Leave capabilities negotiation mode (qmp-spec.rst "Capabilities Negotiation"); QEMU
    // sends no events and accepts no other command before this. The connect timer bounds it.
    this.send('qmp_capabilities', this.wantOob ? { enable: ['oob'] } : undefined, { timeoutMs: 2 ** 31 - 1 }).then(() => {
      this._oob = this.wantOob
      handshake.resolve()
    }, handshake.reject)
  }

  private onReply(m: Record<string, unknown>, line: string): void {
    const rawId = m['id']
    if (rawId === undefined) {
      if (this._state === 'running' && !this._oob && isErrorBody(m['error'])) {
        this.onIdlessError(m['error'])
        return
      }
      // A `return` without id, or one during the handshake (or with out-of-band execution, when
      // replies may come out of order): nothing to attribute it to; end the session like qemu.qmp
      // does (qmp_client.py _on_message, ServerParseError).
      const desc = isErrorBody(m['error']) ? `${m['error'].class}: ${m['error'].desc}` : excerpt(line)
      this.protocolError(`QEMU sent a reply without id (it could not parse a request): ${desc}`, { line: excerpt(line) })
      return
    }
    const id = typeof rawId === 'string' ? rawId : JSON.stringify(rawId)
    this.settleIdless(id)
    const p = this.pending.get(id)
    if (!p) {
      if (this.expired.delete(id)) this.log.debug({ id }, 'qmp late reply dropped (command timed out or was aborted)')
      else this.log.warn({ id, line: excerpt(line) }, 'qmp reply with unknown id dropped')
      return
    }
    this.settle(p)
    const ms = elapsed(p.sentAt)
    for (const observe of replyObservers) observe(p.command, ms)
    // The capabilities handshake settles at once: events that follow it must find connect()'s
    // caller already listening.
    const urgent = p.command === 'qmp_capabilities'
    const resolve = (v: unknown): void => this.settleInTurn(() => p.resolve(v), urgent)
    const reject = (e: Error): void => this.settleInTurn(() => p.reject(e), urgent)
    if ('error' in m) {
      const e = m['error']
      if (!isErrorBody(e)) {
        reject(new QmpdError('QMP_PROTOCOL_ERROR', `${p.command}: malformed error reply: ${excerpt(line)}`, { command: p.command }))
        return
      }
      this.log.debug({ id, command: p.command, ms, qmpClass: e.class }, 'qmp recv')
      reject(new QmpCommandError(p.command, e.class, e.desc))
      return
    }
    this.log.debug({ id, command: p.command, ms }, 'qmp recv')
    const value = m['return']
    if (p.validate) {
      const r = p.validate.safeParse(value)
      if (!r.success) {
        this.log.warn({ id, command: p.command, issues: r.error.issues }, 'qmp reply failed validation')
        reject(
          new QmpdError('QMP_PROTOCOL_ERROR', `${p.command}: unexpected reply from QEMU: ${z.prettifyError(r.error)}`, {
            command: p.command,
            issues: r.error.issues,
          }),
        )
        return
      }
      resolve(r.data)
      return
    }
    resolve(value)
  }

  /**
   * QEMU answers without an id when it could not parse a request far enough to read one
   * (qmp-spec.rst "Error"): JSON nested deeper than its parser allows (1024), a token over its
   * limits. One such request can bring a burst of them (QEMU's parser resynchronises token by
   * token: a 2,000-deep array gives about a thousand). The session itself is fine, so it is kept.
   * Without out-of-band execution QEMU answers in the order it reads, so the culprit is known at
   * the next reply that has an id: every command sent before that one and still unanswered got
   * its answer without an id (settleIdless). A probe (`query-version`) makes sure such a reply
   * comes even when nothing else is sent.
   */
  private onIdlessError(e: { class: string; desc: string }): void {
    if (this.idless === undefined) {
      this.idless = { ...e, count: 1 }
      this.log.warn({ qmpClass: e.class, desc: e.desc, pending: this.pending.size }, 'qmp error reply without id (QEMU could not parse a request)')
    } else {
      this.idless.count++
      this.log.debug({ qmpClass: e.class, desc: e.desc }, 'qmp error reply without id')
    }
    if (this.idlessProbe || this.pending.size === 0) return
    this.idlessProbe = true
    this.send('query-version', undefined).then(
      () => (this.idlessProbe = false),
      () => (this.idlessProbe = false),
    )
  }

  /** A reply with id `id` came: the commands sent before it still waiting were answered without id. */
  private settleIdless(id: string): void {
    const e = this.idless
    if (e === undefined) return
    this.idless = undefined
    const n = Number(id)
    for (const p of [...this.pending.values()]) {
      if (!(Number(p.id) < n)) continue
      this.settle(p)
      this.log.warn({ id: p.id, command: p.command, qmpClass: e.class, desc: e.desc, replies: e.count }, 'qmp command answered without id')
      const err = new QmpCommandError(p.command, e.class, `${e.desc} (QEMU could not parse the request; it answered without id)`)
      this.settleInTurn(() => p.reject(err), false)
    }
  }

  /**
   * Runs the settlement of a command in a loop iteration of its own (util.ts nextTurn), in
   * arrival order: replies from many QEMUs arriving together do not run their callers' code back
   * to back. Settled at once instead when `urgent`, or while the guest is stopped and nothing of
   * this client's is still waiting: a paused guest's time goes before fairness.
   */
  private settleInTurn(settle: () => void, urgent: boolean): void {
    if (urgent || (this.guestStopped && this.deferred === 0)) {
      settle()
      return
    }
    this.deferred++
    void nextTurn().then(() => {
      this.deferred--
      settle()
    })
  }

  private onEvent(m: Record<string, unknown>, line: string): void {
    const name = m['event']
    const ts = timestampSchema.safeParse(m['timestamp'])
    const data = m['data'] ?? {}
    if (typeof name !== 'string' || !ts.success || typeof data !== 'object' || data === null || Array.isArray(data)) {
      this.protocolError(`QEMU sent a malformed event: ${excerpt(line)}`, { line: excerpt(line) })
      return
    }
    const timestamp: QmpTimestamp = ts.data
    if (!isEventName(name)) {
      this.log.debug({ event: name }, 'qmp event (not in the typed map)')
      this.safeEmit('unknownEvent', { event: name, data: data as Record<string, unknown>, timestamp })
      return
    }
    const schema = eventDataSchemas[name]
    if (schema) {
      const r = schema.safeParse(data)
      if (!r.success) {
        this.log.warn({ event: name, issues: r.error.issues }, 'qmp event dropped: unexpected data')
        return
      }
    }
    const e = { event: name, data, timestamp } as QmpEvent
    this.log.debug({ event: name }, 'qmp event')
    if (name === 'STOP') this.guestStopped = true
    else if (name === 'RESUME') this.guestStopped = false
    // A job started by someone else (the escape hatch) may pivot by itself when it ends, and a
    // device that goes takes its node along: caches of the block graph must not outlive that.
    // qmpd's own jobs (ids OWN_JOB_PREFIX…) change the graph only through commands it sends.
    if (name === 'DEVICE_DELETED') this._graphEpoch++
    else if (name === 'JOB_STATUS_CHANGE' || name === 'BLOCK_JOB_COMPLETED' || name === 'BLOCK_JOB_CANCELLED') {
      const d = data as { id?: unknown; device?: unknown }
      const id = name === 'JOB_STATUS_CHANGE' ? d.id : d.device
      if (typeof id !== 'string' || !id.startsWith(OWN_JOB_PREFIX)) this._graphEpoch++
    }
    if (this.subscribers.size > 0) {
      for (const s of [...this.subscribers]) s.offer(e)
    }
    this.safeEmit('event', e)
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-type-assertion -- tsc needs it (the rule misjudges this generic)
    this.safeEmit(name, e as never)
  }

  // ----------------------------------------------------------------------------------------
  // Ending sessions
  // ----------------------------------------------------------------------------------------

  private protocolError(message: string, data: Record<string, unknown>, cause?: unknown): void {
    const err = new QmpdError('QMP_PROTOCOL_ERROR', message, { ...data, reason: 'protocol-error' satisfies DisconnectReason }, { cause })
    this.log.error({ err }, 'qmp protocol error')
    if (this.socket) this.onSocketGone(this.socket, err)
  }

  private onSocketGone(socket: net.Socket, cause: QmpdError): void {
    if (socket !== this.socket) return
    if (this._state === 'connecting') {
      // Tear the half-open session down now, so that no further line of this chunk is handled;
      // connect() turns the rejection into QMP_CONNECT_FAILED.
      this.handshake?.reject(cause)
      this.abandonConnect(socket, cause)
      return
    }
    if (this._state !== 'running') return
    this.beginTeardown(cause)
    socket.destroy()
    this.finishTeardown(cause)
  }

  /** Connect failed: drop everything of the half-open session and go back to idle, silently. */
  private abandonConnect(socket: net.Socket, cause: unknown): void {
    if (socket !== this.socket) return
    this.socket = undefined
    this.splitter = undefined
    this.idless = undefined
    this.idlessProbe = false
    socket.destroy()
    const err = cause instanceof Error ? cause : new Error(String(cause))
    for (const p of [...this.pending.values()]) {
      this.settle(p)
      p.reject(err)
    }
    this.expired.clear()
    this.setState('idle')
  }

  /** First half of ending a running session: nothing pending survives it. */
  private beginTeardown(cause: QmpdError): void {
    this.setState('disconnecting')
    this._lastDisconnectCause = cause
    this.idless = undefined
    this.idlessProbe = false
    this.splitter?.reset()
    const reason = cause.data['reason']
    const pending = [...this.pending.values()]
    for (const p of pending) {
      this.settle(p)
      const err = new QmpDisconnectedError(`${p.command}: QMP connection lost before the reply: ${cause.message}`, { command: p.command, id: p.id, reason }, { cause })
      // Through the same turns as replies (onReply), so a reply that came first settles first.
      this.settleInTurn(() => p.reject(err), false)
    }
    this.expired.clear()
    for (const s of [...this.subscribers]) {
      s.end(new QmpDisconnectedError(`QMP connection lost: ${cause.message}`, { reason }, { cause }))
    }
    this.subscribers.clear()
    if (pending.length > 0) this.log.debug({ rejected: pending.length }, 'qmp pending commands rejected')
  }

  /** Second half: back to idle, then the one 'disconnected' event (listeners may reconnect). */
  private finishTeardown(cause: QmpdError): void {
    this.socket = undefined
    this.splitter = undefined
    this._oob = false
    this.setState('idle')
    const level = cause.data['reason'] === 'client' || cause.data['reason'] === 'eof' ? 'info' : 'warn'
    this.log[level]({ reason: cause.data['reason'], cause: cause.message }, 'qmp disconnected')
    this.safeEmit('disconnected', cause)
  }

  private setState(s: QmpState): void {
    this._state = s
  }

  /**
   * emit() that isolates listeners: each runs in its own try/catch and a rejected promise from
   * an async listener is logged, so one bad listener can neither stop dispatch nor the
   * remaining listeners. rawListeners() keeps once() wrappers, which unregister themselves.
   */
  private safeEmit<K extends keyof QmpClientEventMap>(name: K, ...args: QmpClientEventMap[K]): void {
    // eslint-disable-next-line @typescript-eslint/no-unnecessary-type-assertion -- tsc needs it (the rule misjudges this generic)
    const listeners = this.rawListeners(name as never) as Array<(...a: unknown[]) => unknown>
    for (const l of listeners) {
      try {
        const r = l.apply(this, args)
        if (r instanceof Promise) r.catch((err: unknown) => this.log.warn({ err, event: name }, 'qmp listener rejected'))
      } catch (err) {
        this.log.warn({ err, event: name }, 'qmp listener threw')
      }
    }
  }
}

/**
 * Async iterator behind QmpClient.events(). Events are pushed in by the client; delivery is
 * FIFO; terminal errors (disconnect, timeout, overflow, filter throw) come after the buffered
 * events, an abort comes at once.
 */
class EventIterator<N extends EventName> implements AsyncIterableIterator<QmpEvent<N>>, Subscriber {
  private buffer: Array<QmpEvent<N>> = []
  private head = 0
  private waiters: Array<{ resolve: (r: IteratorResult<QmpEvent<N>>) => void; reject: (e: unknown) => void }> = []
  private error: unknown = undefined
  private done = false
  private subscribed = false
  private timer: NodeJS.Timeout | undefined
  private onAbort: (() => void) | undefined
  private readonly names: ReadonlySet<string> | undefined
  private readonly maxBuffer: number

  constructor(
    private readonly registry: Set<Subscriber>,
    private readonly opts: EventsOptions<N>,
    initialError: Error | undefined,
  ) {
    this.names = opts.names ? new Set(opts.names) : undefined
    this.maxBuffer = Math.max(1, opts.maxBuffer ?? DEFAULT_EVENT_BUFFER)
    if (initialError) {
      this.error = initialError
      return
    }
    const { signal, timeoutMs } = opts
    if (signal?.aborted) {
      this.error = signal.reason
      return
    }
    registry.add(this)
    this.subscribed = true
    if (timeoutMs !== undefined) {
      this.timer = setTimeout(() => {
        const what = opts.names ? opts.names.join('/') : 'any event'
        this.end(new TimeoutError(`no ${what} from QEMU within ${timeoutMs} ms`, { events: opts.names, timeoutMs }))
      }, timeoutMs)
    }
    if (signal) {
      this.onAbort = () => this.abort(signal.reason)
      signal.addEventListener('abort', this.onAbort, { once: true })
    }
  }

  [Symbol.asyncIterator](): this {
    return this
  }

  offer(e: QmpEvent): void {
    if (this.done || this.error !== undefined) return
    if (this.names && !this.names.has(e.event)) return
    const ev = e as QmpEvent<N>
    if (this.opts.filter) {
      let keep: boolean
      try {
        keep = this.opts.filter(ev)
      } catch (err) {
        this.end(err)
        return
      }
      if (!keep) return
    }
    const w = this.waiters.shift()
    if (w) {
      w.resolve({ value: ev, done: false })
      return
    }
    if (this.buffer.length - this.head >= this.maxBuffer) {
      this.end(
        new QmpdError('INTERNAL', `event iterator buffer overflow: more than ${this.maxBuffer} events not consumed`, {
          reason: 'event-buffer-overflow',
          maxBuffer: this.maxBuffer,
        }),
      )
      return
    }
    this.buffer.push(ev)
  }

  /** Terminal error, delivered after the buffered events. */
  end(err: unknown): void {
    if (this.done || this.error !== undefined) return
    this.unsubscribe()
    // Waiters exist only while the buffer is empty: the first one gets the error at once.
    const [first, ...rest] = this.waiters.splice(0)
    if (first) {
      this.finish()
      first.reject(err)
      for (const w of rest) w.resolve({ value: undefined, done: true })
      return
    }
    this.error = err
  }

  private abort(reason: unknown): void {
    this.buffer = []
    this.head = 0
    this.end(reason)
  }

  next(): Promise<IteratorResult<QmpEvent<N>>> {
    if (this.head < this.buffer.length) {
      const value = this.buffer[this.head] as QmpEvent<N>
      this.buffer[this.head] = undefined as never
      this.head++
      // Compact once the consumed prefix dominates, keeping shift O(1) amortized.
      if (this.head > 1024 && this.head * 2 > this.buffer.length) {
        this.buffer = this.buffer.slice(this.head)
        this.head = 0
      }
      return Promise.resolve({ value, done: false })
    }
    if (this.done) return Promise.resolve({ value: undefined, done: true })
    if (this.error !== undefined) {
      const err: unknown = this.error
      this.finish()
      return Promise.reject(err)
    }
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }))
  }

  return(): Promise<IteratorResult<QmpEvent<N>>> {
    this.finish()
    return Promise.resolve({ value: undefined, done: true })
  }

  throw(err?: unknown): Promise<IteratorResult<QmpEvent<N>>> {
    this.finish()
    return Promise.reject(err)
  }

  private finish(): void {
    this.unsubscribe()
    this.done = true
    this.error = undefined
    this.buffer = []
    this.head = 0
    for (const w of this.waiters.splice(0)) w.resolve({ value: undefined, done: true })
  }

  private unsubscribe(): void {
    if (!this.subscribed) return
    this.subscribed = false
    this.registry.delete(this)
    clearTimeout(this.timer)
    if (this.onAbort) this.opts.signal?.removeEventListener('abort', this.onAbort)
  }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

type NetTarget = { path: string } | { host: string; port: number }

function parseAddress(a: QmpAddress): NetTarget {
  if (typeof a !== 'string') return 'path' in a ? { path: a.path } : { host: a.host, port: a.port }
  if (a.startsWith('unix:')) return { path: a.slice(5) }
  const tcp = a.startsWith('tcp:') ? a.slice(4) : a
  const m = /^\[?([^\]]*?)\]?:(\d+)$/.exec(tcp)
  if (!a.includes('/') && m?.[1] !== undefined && m[2] !== undefined) return { host: m[1], port: Number(m[2]) }
  if (a.startsWith('tcp:')) throw new QmpdError('INVALID_INPUT', `bad QMP address ${a}: expected tcp:host:port`, { address: a })
  return { path: a }
}

function describeAddress(t: NetTarget): string {
  return 'path' in t ? `unix:${t.path}` : `tcp:${t.host}:${t.port}`
}

function socketErrorCause(err: NodeJS.ErrnoException): QmpdError {
  // QEMU exiting (quit, crash, kill) while it still has unread bytes from us in its socket
  // makes the kernel send RST instead of FIN: we see ECONNRESET (or EPIPE on write) where a
  // clean exit gives EOF. Either way the peer went away, so both count as 'eof'.
  const peerGone = err.code === 'ECONNRESET' || err.code === 'EPIPE'
  return new QmpdError(
    'QMP_DISCONNECTED',
    peerGone ? `QEMU closed the QMP connection (${err.code})` : `QMP socket error: ${err.message}`,
    { reason: (peerGone ? 'eof' : 'socket-error') satisfies DisconnectReason, errno: err.code },
    { cause: err },
  )
}

function isErrorBody(e: unknown): e is { class: string; desc: string } {
  if (typeof e !== 'object' || e === null) return false
  const r = e as Record<string, unknown>
  return typeof r['class'] === 'string' && typeof r['desc'] === 'string'
}

function excerpt(line: string): string {
  return line.length > LINE_EXCERPT ? `${line.slice(0, LINE_EXCERPT)}… (${line.length} chars)` : line
}

function elapsed(since: number): number {
  return Math.round((performance.now() - since) * 10) / 10
}
