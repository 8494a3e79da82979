/**
 * QgaClient: one session with qemu-guest-agent, reached through the unix socket of the QEMU
 * chardev (server mode) behind the guest's virtserialport org.qemu.guest_agent.0. Written from
 * QEMU's qga/qapi-schema.json (guest-sync-delimited) and docs/interop/qemu-ga.rst.
 *
 * How the agent differs from QMP, and what that means here:
 * - No greeting and no capabilities negotiation. The byte stream may hold anything a previous
 *   client left behind (late replies, half a request in the agent's parser), so the session
 *   starts with a resync: we send a 0xFF byte (invalid JSON: it resets the agent's parser, which
 *   answers with a parse error we discard) and guest-sync-delimited {id: random}. The agent puts
 *   a 0xFF byte before that reply; everything up to the 0xFF is stale and dropped, and the reply
 *   must return our id. qapi-schema.json says to resync "upon initial connection, and after any
 *   client-side timeouts": after a timeout the next command resyncs first.
 * - The agent handles one request at a time, so commands are queued here and sent one by one.
 * - The agent runs inside the guest, which the host does not trust: every reply is validated,
 *   lines are capped, and the client only ever sends the commands in its table. guest-exec and
 *   guest-file-* are deliberately absent.
 * - QEMU keeps the chardev socket open whether or not an agent runs in the guest: connecting
 *   always succeeds, and a missing agent only shows as a sync that never answers (a timeout).
 *   The chardev serves one client at a time; a second one waits unanswered in the same way.
 */

import net from 'node:net'
import { randomInt } from 'node:crypto'
import { performance } from 'node:perf_hooks'
import { pino, type Logger } from 'pino'
import { z } from 'zod'
import { QmpdError, TimeoutError } from '../errors.ts'
import { shortSocketPath } from '../vm/sockpath.ts'

/** Connection state: 'ready' accepts commands; 'closed' is final (connect a new client). */
export type QgaState = 'connecting' | 'ready' | 'closed'

/** Why a session ended; in `data.reason` of the QGA_UNAVAILABLE errors it causes. */
export type QgaCloseReason = 'eof' | 'socket-error' | 'protocol-error' | 'client'

/** Options of QgaClient.connect(). */
export interface QgaConnectOptions {
  /** Bounds socket connect + first sync together. Default DEFAULT_QGA_CONNECT_TIMEOUT_MS. */
  timeoutMs?: number
  /** Parent logger; the client logs through a child with {component: 'qga'}. Silent when absent. */
  logger?: Logger
}

/** Default bound of connect(): under TCG a freshly booted guest can be slow to answer. */
export const DEFAULT_QGA_CONNECT_TIMEOUT_MS = 10_000

/** Longest accepted reply line. Our commands' replies are a few bytes; this stops a runaway guest. */
export const QGA_MAX_LINE_BYTES = 1024 * 1024

/** The 0xFF byte: resets the agent's JSON parser when sent, marks the sync reply when received. */
const DELIMITER = 0xff
const LF = 0x0a

/** Replies of the commands this client sends, validated with zod (the guest is untrusted). */
const replySchemas = {
  'guest-sync-delimited': z.number().int(),
  'guest-ping': z.object({}),
  'guest-fsfreeze-status': z.enum(['thawed', 'frozen']),
  'guest-fsfreeze-freeze': z.number().int().nonnegative(),
  'guest-fsfreeze-thaw': z.number().int().nonnegative(),
}

/** Wire names of the agent commands this client knows (and the only ones it ever sends). */
export type QgaCommand = keyof typeof replySchemas

/** The validated `return` of a command. */
export type QgaReturn<C extends QgaCommand> = z.infer<(typeof replySchemas)[C]>

/**
 * The one table of agent command timeouts (CONVENTIONS #4): how long the agent may take to
 * answer. guest-fsfreeze-freeze syncs every mounted filesystem before it answers, which takes as
 * long as writing out the guest's dirty data; the rest are answered from memory.
 */
export const QGA_COMMAND_TIMEOUTS: { readonly [C in QgaCommand]: number } = {
  'guest-sync-delimited': 5_000,
  'guest-ping': 5_000,
  'guest-fsfreeze-status': 5_000,
  'guest-fsfreeze-freeze': 60_000,
  'guest-fsfreeze-thaw': 5_000,
}

interface Pending {
  id: string
  command: QgaCommand
  sentAt: number
  timer: NodeJS.Timeout
  resolve: (value: unknown) => void
  reject: (err: Error) => void
}

interface SyncWaiter {
  id: number
  resolve: () => void
  reject: (err: Error) => void
}

/**
 * A client for one guest agent. Create with QgaClient.connect(); commands may be called
 * concurrently but run one after another; close() when done. After the session ends (close(),
 * QEMU exit) every call rejects with QmpdError('QGA_UNAVAILABLE'): connect a new client.
 */
export class QgaClient {
  private readonly log: Logger
  private readonly path: string
  private _state: QgaState = 'connecting'
  private socket: net.Socket | undefined
  private buf: Buffer = Buffer.alloc(0)
  /** False until a sync succeeds, and again after any timeout: incoming bytes up to a 0xFF are stale. */
  private inSync = false
  private syncWaiter: SyncWaiter | undefined
  private pending: Pending | undefined
  private queue: Promise<unknown> = Promise.resolve()
  private nextId = 1
  private closeCause: QmpdError | undefined
  private closed: Promise<void> = Promise.resolve()

  private constructor(path: string, logger: Logger | undefined) {
    this.path = path
    this.log = (logger ?? pino({ enabled: false })).child({ component: 'qga' })
  }

  /**
   * Connects to the agent's chardev socket and resyncs the stream; resolves with a client in
   * 'ready'. Paths longer than sun_path allows are reached through /proc/self/fd. Rejects with
   * QmpdError('QGA_UNAVAILABLE') whose cause says why: the socket is missing or refused, or no
   * sync reply came within `timeoutMs` (no agent running in the guest, guest not booted yet,
   * paused VM, or another client holds the chardev).
   */
  static async connect(path: string, opts: QgaConnectOptions = {}): Promise<QgaClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_QGA_CONNECT_TIMEOUT_MS
    const client = new QgaClient(path, opts.logger)
    const started = performance.now()
    let timer: NodeJS.Timeout | undefined
    try {
      await Promise.race([
        client.open(),
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () =>
              reject(
                new TimeoutError(`no reply to guest-sync-delimited within ${timeoutMs} ms: is qemu-guest-agent running in the guest?`, {
                  timeoutMs,
                  path,
                }),
              ),
            timeoutMs,
          )
        }),
      ])
      // The socket may have gone between the sync reply and here.
      if (client.state === 'closed') throw client.closeCause ?? new Error('session ended')
    } catch (err) {
      client.end(new QmpdError('QGA_UNAVAILABLE', 'connect failed', { path, reason: 'client' satisfies QgaCloseReason }, { cause: err }))
      const msg = err instanceof Error ? err.message : String(err)
      client.log.warn({ path, err }, 'qga connect failed')
      throw new QmpdError('QGA_UNAVAILABLE', `cannot connect to the guest agent at ${path}: ${msg}`, { path, timeoutMs }, { cause: err })
    } finally {
      clearTimeout(timer)
    }
    client._state = 'ready'
    client.log.debug({ path, ms: elapsed(started) }, 'qga connected')
    return client
  }

  /** Current state. */
  get state(): QgaState {
    return this._state
  }

  /** The client's logger (child {component: 'qga'}); withFrozenFilesystems logs through it by default. */
  get logger(): Logger {
    return this.log
  }

  /** Checks that the agent answers. Legal in 'ready'; allowed by the agent also while frozen. */
  async ping(): Promise<void> {
    await this.run('guest-ping')
  }

  /** Whether the guest's filesystems are frozen by the agent. Legal in 'ready', also while frozen. */
  fsfreezeStatus(): Promise<'thawed' | 'frozen'> {
    return this.run('guest-fsfreeze-status')
  }

  /**
   * Syncs and freezes every mounted local filesystem of the guest (FIFREEZE); resolves with how
   * many were frozen. Until thawed, guest writes to them block, and the agent refuses every
   * command except the read-only ones, ping, status and thaw (a second freeze fails with
   * QGA_COMMAND_FAILED). If the freeze fails in the guest, the agent thaws what it froze. Prefer
   * withFrozenFilesystems(), which always thaws.
   */
  fsfreezeFreeze(): Promise<number> {
    return this.run('guest-fsfreeze-freeze')
  }

  /** Thaws the filesystems frozen by the agent; resolves with how many (0 when none were frozen). */
  fsfreezeThaw(): Promise<number> {
    return this.run('guest-fsfreeze-thaw')
  }

  /**
   * Ends the session: a queued or running command rejects with QGA_UNAVAILABLE (reason
   * 'client'), the socket is closed. Idempotent. Leaves the guest as it is: a frozen guest stays
   * frozen (the agent does not thaw when the host disconnects).
   */
  async close(): Promise<void> {
    this.end(new QmpdError('QGA_UNAVAILABLE', 'guest agent client closed', { path: this.path, reason: 'client' satisfies QgaCloseReason }))
    await this.closed
  }

  // ----------------------------------------------------------------------------------------
  // Sending
  // ----------------------------------------------------------------------------------------

  /** Queues a command behind the running one: the agent reads its next request only after answering. */
  private run<C extends QgaCommand>(command: C): Promise<QgaReturn<C>> {
    const p = this.queue.then(() => this.execute(command))
    this.queue = p.then(
      () => {},
      () => {},
    )
    return p
  }

  private async execute<C extends QgaCommand>(command: C): Promise<QgaReturn<C>> {
    if (this._state !== 'ready') throw this.unavailable(command)
    if (!this.inSync) {
      try {
        await this.sync(QGA_COMMAND_TIMEOUTS['guest-sync-delimited'])
      } catch (err) {
        if (this._state !== 'ready') throw this.unavailable(command)
        throw new QmpdError(
          'QGA_UNAVAILABLE',
          `${command}: the guest agent does not answer (resync after an earlier timeout failed: ${err instanceof Error ? err.message : String(err)})`,
          { command, path: this.path },
          { cause: err },
        )
      }
    }
    const socket = this.socket as net.Socket
    const id = String(this.nextId++)
    const timeoutMs = QGA_COMMAND_TIMEOUTS[command]
    const value = await new Promise<unknown>((resolve, reject) => {
      const p: Pending = {
        id,
        command,
        sentAt: performance.now(),
        timer: setTimeout(() => {
          if (this.pending !== p) return
          this.pending = undefined
          // A late reply would now be taken for the next command's: resync before that one.
          this.inSync = false
          this.log.warn({ id, command, timeoutMs }, 'qga command timed out')
          reject(new TimeoutError(`${command}: no reply from the guest agent within ${timeoutMs} ms`, { command, timeoutMs, id }))
        }, timeoutMs),
        resolve,
        reject,
      }
      // Registered before the write, so the reply always finds its waiter.
      this.pending = p
      this.log.debug({ id, command }, 'qga send')
      socket.write(JSON.stringify({ execute: command, id }) + '\n')
    })
    const parsed = replySchemas[command].safeParse(value)
    if (!parsed.success) {
      this.log.warn({ command, issues: parsed.error.issues }, 'qga reply failed validation')
      throw new QmpdError('QGA_COMMAND_FAILED', `${command}: unexpected reply from the guest agent: ${z.prettifyError(parsed.error)}`, {
        command,
        reason: 'invalid-reply',
        issues: parsed.error.issues,
      })
    }
    return parsed.data as QgaReturn<C>
  }

  /** Resynchronises the stream (see the file comment); resolves once our id came back. */
  private sync(timeoutMs: number): Promise<void> {
    const socket = this.socket as net.Socket
    // The sync id is the only thing that tells our sync reply from a stale one: make it unguessable.
    const id = randomInt(1, 2 ** 47)
    this.inSync = false
    this.buf = Buffer.alloc(0)
    const started = performance.now()
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        if (this.syncWaiter?.id !== id) return
        this.syncWaiter = undefined
        reject(new TimeoutError(`no reply to guest-sync-delimited within ${timeoutMs} ms`, { command: 'guest-sync-delimited', timeoutMs }))
      }, timeoutMs)
      this.syncWaiter = {
        id,
        resolve: () => {
          clearTimeout(timer)
          this.log.debug({ command: 'guest-sync-delimited', ms: elapsed(started) }, 'qga recv')
          resolve()
        },
        reject: (err) => {
          clearTimeout(timer)
          reject(err)
        },
      }
      this.log.debug({ command: 'guest-sync-delimited' }, 'qga send')
      socket.write(Buffer.concat([Buffer.from([DELIMITER]), Buffer.from(JSON.stringify({ execute: 'guest-sync-delimited', arguments: { id } }) + '\n')]))
    })
  }

  // ----------------------------------------------------------------------------------------
  // Receiving
  // ----------------------------------------------------------------------------------------

  /** Opens the socket and performs the first sync; connect() bounds it with its timeout. */
  private async open(): Promise<void> {
    const short = shortSocketPath(this.path)
    const socket = net.connect({ path: short.path })
    this.socket = socket
    this.closed = new Promise<void>((resolve) => socket.once('close', () => resolve()))
    try {
      await new Promise<void>((resolve, reject) => {
        const onError = (err: Error): void => reject(err)
        socket.once('error', onError)
        socket.once('connect', () => {
          socket.off('error', onError)
          resolve()
        })
      })
    } finally {
      short.release()
    }
    socket.on('data', (chunk: Buffer) => this.onData(chunk))
    socket.on('end', () => this.end(this.lost('the guest agent socket was closed by QEMU (EOF)', 'eof')))
    socket.on('close', () => this.end(this.lost('the guest agent socket was closed', 'eof')))
    socket.on('error', (err: NodeJS.ErrnoException) => this.end(this.lost(`guest agent socket error: ${err.message}`, 'socket-error', err)))
    // connect() may have timed out (and ended the session) while the socket connected.
    if (this.state === 'closed') throw this.closeCause ?? this.unavailable('connect')
    await this.sync(2 ** 31 - 1)
  }

  private onData(chunk: Buffer): void {
    if (this._state === 'closed') return
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk])
    for (;;) {
      if (!this.inSync) {
        // Everything before the delimiter is stale: replies to someone else's requests, or the
        // parse error our own 0xFF provoked.
        const ff = this.buf.indexOf(DELIMITER)
        if (ff < 0) {
          this.buf = Buffer.alloc(0)
          return
        }
        const nl = this.buf.indexOf(LF, ff + 1)
        if (nl < 0) {
          this.buf = this.buf.subarray(ff)
          if (this.buf.length > QGA_MAX_LINE_BYTES) this.tooLong()
          return
        }
        const line = this.buf.subarray(ff + 1, nl).toString('utf8')
        this.buf = this.buf.subarray(nl + 1)
        this.onSyncLine(line)
        continue
      }
      const nl = this.buf.indexOf(LF)
      if (nl < 0) {
        if (this.buf.length > QGA_MAX_LINE_BYTES) this.tooLong()
        return
      }
      const line = this.buf.subarray(0, nl).toString('utf8').trim()
      this.buf = this.buf.subarray(nl + 1)
      if (line.length > 0) this.onLine(line)
    }
  }

  private onSyncLine(line: string): void {
    const waiter = this.syncWaiter
    const msg = parseObject(line)
    if (waiter && msg && msg['return'] === waiter.id) {
      this.syncWaiter = undefined
      this.inSync = true
      waiter.resolve()
      return
    }
    // A sync reply for an earlier (timed-out) sync or another client: keep looking.
    this.log.debug({ line: excerpt(line) }, 'qga stale sync reply dropped')
  }

  private onLine(line: string): void {
    const msg = parseObject(line)
    if (!msg || !('return' in msg || 'error' in msg)) {
      this.log.warn({ line: excerpt(line) }, 'qga unexpected message dropped')
      return
    }
    const p = this.pending
    const rawId = msg['id']
    // We resync after every timeout, so no stale reply can be in the stream: an id-less reply
    // (old agents do not echo ids) belongs to the one command in flight.
    if (!p || (rawId !== undefined && rawId !== p.id)) {
      this.log.warn({ id: rawId, line: excerpt(line) }, 'qga reply with unknown id dropped')
      return
    }
    this.pending = undefined
    clearTimeout(p.timer)
    const ms = elapsed(p.sentAt)
    if ('error' in msg) {
      const e = msg['error']
      const body = typeof e === 'object' && e !== null ? (e as Record<string, unknown>) : {}
      const qgaClass = typeof body['class'] === 'string' ? body['class'] : 'GenericError'
      const desc = typeof body['desc'] === 'string' ? body['desc'] : excerpt(JSON.stringify(e))
      this.log.debug({ id: p.id, command: p.command, ms, qgaClass }, 'qga recv')
      p.reject(new QmpdError('QGA_COMMAND_FAILED', `${p.command}: ${desc}`, { command: p.command, qgaClass, desc }))
      return
    }
    this.log.debug({ id: p.id, command: p.command, ms }, 'qga recv')
    p.resolve(msg['return'])
  }

  // ----------------------------------------------------------------------------------------
  // Ending
  // ----------------------------------------------------------------------------------------

  private tooLong(): void {
    this.end(this.lost(`the guest agent sent a line longer than ${QGA_MAX_LINE_BYTES} bytes`, 'protocol-error'))
  }

  private lost(message: string, reason: QgaCloseReason, cause?: unknown): QmpdError {
    return new QmpdError('QGA_UNAVAILABLE', message, { path: this.path, reason }, { cause })
  }

  /** Ends the session once: rejects the sync and the command in flight, destroys the socket. */
  private end(cause: QmpdError): void {
    if (this._state === 'closed') return
    const wasReady = this._state === 'ready'
    this._state = 'closed'
    this.closeCause = cause
    this.buf = Buffer.alloc(0)
    const waiter = this.syncWaiter
    this.syncWaiter = undefined
    waiter?.reject(cause)
    const p = this.pending
    this.pending = undefined
    if (p) {
      clearTimeout(p.timer)
      p.reject(new QmpdError('QGA_UNAVAILABLE', `${p.command}: ${cause.message}`, { command: p.command, ...cause.data }, { cause }))
    }
    this.socket?.destroy()
    if (wasReady) {
      const level = cause.data['reason'] === 'client' || cause.data['reason'] === 'eof' ? 'info' : 'warn'
      this.log[level]({ path: this.path, reason: cause.data['reason'], cause: cause.message }, 'qga disconnected')
    }
  }

  private unavailable(command: string): QmpdError {
    const cause = this.closeCause
    return new QmpdError(
      'QGA_UNAVAILABLE',
      `${command}: not connected to the guest agent${cause ? ` (${cause.message})` : ''}`,
      { command, path: this.path, state: this._state },
      { cause },
    )
  }
}

/**
 * Freezes the guest's filesystems, runs `fn`, and always thaws: also when `fn` throws, in which
 * case `fn`'s error is rethrown and a thaw failure is only logged (on `log`, default the
 * client's logger). A thaw failure after a successful `fn` is thrown. When the freeze itself
 * fails, `fn` does not run; a freeze that timed out on our side may still complete in the guest,
 * so a thaw is attempted then, but not after an agent error (the agent has thawed what it froze,
 * and a second freezer's frozen state must not be undone).
 */
export async function withFrozenFilesystems<T>(qga: QgaClient, fn: () => Promise<T>, log?: Logger): Promise<T> {
  const logger = log ?? qga.logger
  const started = performance.now()
  try {
    const frozen = await qga.fsfreezeFreeze()
    logger.info({ frozen, ms: elapsed(started) }, 'qga filesystems frozen')
  } catch (err) {
    if (err instanceof TimeoutError) {
      await qga.fsfreezeThaw().catch((thawErr: unknown) => logger.error({ err: thawErr }, 'qga thaw after a timed-out freeze failed'))
    }
    throw err
  }
  let result: T
  try {
    result = await fn()
  } catch (err) {
    try {
      await qga.fsfreezeThaw()
      logger.info({ ms: elapsed(started) }, 'qga filesystems thawed')
    } catch (thawErr) {
      logger.error({ err: thawErr, fnErr: err }, 'qga thaw failed after the frozen section failed; the guest may still be frozen')
    }
    throw err
  }
  const thawed = await qga.fsfreezeThaw()
  logger.info({ thawed, ms: elapsed(started) }, 'qga filesystems thawed')
  return result
}

function parseObject(line: string): Record<string, unknown> | undefined {
  try {
    const v: unknown = JSON.parse(line)
    return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : undefined
  } catch {
    return undefined
  }
}

function excerpt(line: string): string {
  return line.length > 200 ? `${line.slice(0, 200)}… (${line.length} chars)` : line
}

function elapsed(since: number): number {
  return Math.round((performance.now() - since) * 10) / 10
}
