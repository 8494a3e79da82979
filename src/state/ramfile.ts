// RAM state files: save a migration stream to a file through a receiver process, check one, load
// one; no VM records.
import { randomBytes } from 'node:crypto'
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { open, rename, rm, stat, type FileHandle } from 'node:fs/promises'
import { connect, type Socket } from 'node:net'
import { basename, dirname, join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import type { Logger } from 'pino'
import { QmpdError } from '../errors.ts'
import { fileKind, openRegularFile } from '../images/files.ts'
import type { QmpClient } from '../qmp/index.ts'
import { shortSocketPath } from '../vm/sockpath.ts'
import { settlesWithin } from '../util.ts'
import { fileMigrationSupport, loadFromFile, saveToFile } from './filemig.ts'
import { FORMAT_HEADER_BYTES, parseStateFormat, type RamFormat, type StateFormat } from './ramformat.ts'

/** QEMU_VM_FILE_MAGIC ("QEVM") and QEMU_VM_FILE_VERSION, the first 8 bytes of a migration stream (migration/savevm.c). */
const STREAM_MAGIC = Buffer.from([0x51, 0x45, 0x56, 0x4d, 0x00, 0x00, 0x00, 0x03])

/** Migration runs at disk speed: QEMU's default cap is 32 MiB/s, far below a local file. 1 TiB/s = no cap. */
const UNCAPPED_BANDWIDTH = 2 ** 40

/**
 * The name a RAM state file has while it is written: hidden, beside the final name, fixed so that
 * crash recovery (which knows only the final name, from the journal) can find and remove it.
 */
export function partialName(file: string): string {
  return join(dirname(file), `.${basename(file)}.partial`)
}

/** Where a RAM state transfer's unix socket is: `path` for qmpd, `qemuPath` as QEMU (with its cwd) sees it. */
export interface StateSocket {
  path: string
  qemuPath: string
  /**
   * A save to a QEMU whose cwd is elsewhere (an adopted one) when `path` is too long for
   * sun_path: QEMU connects through the receiver's cwd, `/proc/<receiver pid>/cwd/<name>`.
   */
  viaReceiverCwd?: boolean
  /**
   * QEMU was launched by qmpd (runs as qmpd's user, in `dir`): it may open qmpd's /proc fd links,
   * so the mapped-ram file: path is open to it. An adopted QEMU (maybe another user) keeps the stream.
   */
  ownQemu: boolean
}

/** sun_path holds 108 bytes with its NUL; leave a margin (as src/vm/sockpath.ts). */
const MAX_SUN_PATH = 100

/**
 * A fresh socket name in `dir`. QEMU runs with `dir` as cwd when qmpd launched it, so it gets a
 * short relative path; any other QEMU (adopted: its cwd is its owner's) gets the absolute path,
 * or, for a save when that is too long, the receiver's /proc cwd link (see StateSocket).
 */
export function stateSocket(dir: string, qemuCwdIsDir: boolean): StateSocket {
  const name = `mig-${randomBytes(4).toString('hex')}.sock`
  const path = join(dir, name)
  if (qemuCwdIsDir) return { path, qemuPath: name, ownQemu: true }
  return { path, qemuPath: path, ownQemu: false, ...(Buffer.byteLength(path) > MAX_SUN_PATH ? { viaReceiverCwd: true } : {}) }
}

/**
 * Throws unless `file` exists and starts like a QEMU migration stream. Opens nothing but a
 * regular file, without following a symlink swapped in after the check (src/images/files.ts):
 * a FIFO or device as state file is refused before anything could block on it.
 * @throws QmpdError INVALID_INPUT when it is missing, unreadable or not a migration stream; INVALID_PATH when it is not a regular file or `check` refuses its real path.
 */
export async function checkMigrationStream(file: string, check?: (real: string) => void): Promise<number> {
  return (await checkStateFile(file, check)).size
}

/**
 * Like checkMigrationStream, and also reads the file's format (stream or mapped-ram) and the
 * capabilities its loader needs, from the configuration section QEMU wrote into it.
 * @throws QmpdError as checkMigrationStream.
 */
export async function checkStateFile(file: string, check?: (real: string) => void): Promise<StateFormat & { size: number }> {
  const fh = await openStateFile(file, check)
  try {
    return await readStreamHeader(fh, file)
  } finally {
    await fh.close()
  }
}

async function openStateFile(file: string, check?: (real: string) => void): Promise<FileHandle> {
  if (fileKind(file, 'file') === 'missing') throw new QmpdError('INVALID_INPUT', `${file} cannot be read: it does not exist`, { file })
  return openRegularFile(file, 'file', check)
}

/** The size and format of an open state file, after checking its magic. */
async function readStreamHeader(fh: FileHandle, file: string): Promise<StateFormat & { size: number }> {
  const header = Buffer.alloc(FORMAT_HEADER_BYTES)
  let size: number
  let got: number
  try {
    size = (await fh.stat()).size
    got = (await fh.read(header, 0, header.length, 0)).bytesRead
  } catch (err) {
    throw new QmpdError('INVALID_INPUT', `${file} cannot be read: ${(err as Error).message}`, { file })
  }
  if (got < STREAM_MAGIC.length || !header.subarray(0, STREAM_MAGIC.length).equals(STREAM_MAGIC)) {
    throw new QmpdError('INVALID_INPUT', `${file} is not a QEMU migration stream`, { file })
  }
  return { size, ...parseStateFormat(header.subarray(0, got)) }
}

/** Options of saveRamState. */
export interface SaveOptions {
  /** The final file; written as partialName(file), fsynced, then renamed. Must not exist. */
  file: string
  socket: StateSocket
  log: Logger
  /**
   * background-snapshot: RAM is written as of the migration's start while the guest runs on
   * (userfaultfd write-protect). QEMU resumes a stopped guest when it starts such a migration.
   */
  background?: boolean
  /**
   * Pre-copy with pause-before-switchover: called while the guest is stopped for the final pass,
   * so that disk snapshots taken in it belong to the same instant as the RAM state.
   */
  beforeSwitchover?: () => Promise<void>
  onProgress?: (current: number, total: number) => void
  /**
   * Runs just before `migrate`, once capabilities and parameters are set and the socket listens:
   * a live checkpoint stops the guest and switches its disks here, so its pause holds only what
   * must happen inside it.
   */
  beforeMigrate?: () => Promise<void>
  /**
   * Runs once every byte of the stream has reached the file, before the fsync: a checkpoint
   * switches its disks and resumes the guest here, so the guest does not wait for the disk flush.
   * If the fsync then fails, the save fails as a whole (the caller undoes what this did).
   */
  afterTransfer?: () => Promise<void>
  /** Runs once QEMU has accepted `migrate` (the stream is under way): a crash test's fail point. */
  onMigrating?: () => Promise<void>
}

/** What a save wrote and how it went. */
export interface SaveResult {
  bytes: number
  ms: number
  /** mapped-ram: a file: migration with multifd (QEMU 9.0+, guest stopped); stream: the socket stream. */
  format: RamFormat
  /** The mapped-ram file was written O_DIRECT. */
  directIo?: boolean
}

/**
 * Streams the VM's RAM and device state into `file` through a unix socket qmpd serves (QEMU 7.2
 * has no file: URI, and exec: would need a shell). On any failure the migration is cancelled and
 * no file is left; on success the file is fsynced and renamed into place, so a file under the
 * final name is always a whole stream.
 */
export async function saveRamState(qmp: QmpClient, opts: SaveOptions): Promise<SaveResult> {
  const t0 = performance.now()
  const dir = dirname(opts.file)
  const partial = partialName(opts.file)
  // A partial file of this name can only be left by a save a crash interrupted (one save per
  // file at a time: the VM's queue, and O_EXCL on the final name): it is never a whole stream.
  await rm(partial, { force: true })
  const fileMig = await fileMigrationSupport(qmp)
  // A stopped guest's RAM goes through a mapped-ram file: migration where QEMU has one. A live
  // migration (background-snapshot, pre-copy) keeps the stream: mapped-ram excludes the former,
  // and the latter's pages would be written again as they change.
  if (fileMig && opts.socket.ownQemu && !opts.background && !opts.beforeSwitchover) {
    await opts.beforeMigrate?.()
    const r = await saveToFile(qmp, fileMig, { file: opts.file, partial, log: opts.log, ...pick(opts) })
    return { bytes: r.bytes, ms: Math.round(performance.now() - t0), format: 'mapped-ram', directIo: r.directIo }
  }
  const receiver = startReceiver(opts.socket.path, partial)
  let writeError: QmpdError | undefined
  // Not awaited on purpose: a listener, not a step. `failed` resolves only if the receiver
  // cannot write, never rejects, and the steps below race against it.
  void receiver.failed.then((msg) => {
    // The file cannot take the stream (ENOSPC, EIO): stop QEMU sending at once, unless it is a
    // background snapshot: QEMU 7.2 never releases the guest's RAM from one that does not
    // complete (the receiver drains the rest of it instead).
    writeError = new QmpdError('IO_ERROR', `writing ${opts.file} failed: ${msg}`, { file: opts.file })
    if (!opts.background) qmp.execute('migrate_cancel').catch(() => {})
  })
  const events = qmp.events({ names: ['MIGRATION'] })
  let poll: NodeJS.Timeout | undefined
  try {
    await receiver.listening
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'events', state: true },
        { capability: 'background-snapshot', state: !!opts.background },
        { capability: 'pause-before-switchover', state: !!opts.beforeSwitchover },
        // Left on by a mapped-ram save or load on this QEMU; the socket stream takes neither.
        ...(fileMig ? [{ capability: 'mapped-ram' as const, state: false }, { capability: 'multifd' as const, state: false }] : []),
      ],
    })
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': UNCAPPED_BANDWIDTH })
    await opts.beforeMigrate?.()
    const qemuPath = opts.socket.viaReceiverCwd ? `/proc/${receiver.pid}/cwd/${basename(opts.socket.path)}` : opts.socket.qemuPath
    await qmp.execute('migrate', { uri: `unix:${qemuPath}` })
    await opts.onMigrating?.()
    if (opts.onProgress) {
      poll = setInterval(() => {
        qmp.execute('query-migrate').then(
          (m) => m.ram && opts.onProgress?.(m.ram.transferred, m.ram.total),
          () => {},
        )
      }, 250)
    }
    for await (const ev of events) {
      const status = ev.data.status
      opts.log.debug({ status }, 'migration status')
      if (status === 'pre-switchover') {
        await opts.beforeSwitchover!()
        await qmp.execute('migrate-continue', { state: 'pre-switchover' })
      } else if (status === 'completed') {
        if (writeError) throw writeError
        break
      } else if (status === 'failed' || status === 'cancelled') {
        // A write error of the receiver is what made QEMU fail: let its report arrive first.
        await settlesWithin(receiver.exited, 2000)
        if (writeError) throw writeError
        const info = await qmp.execute('query-migrate').catch(() => undefined)
        throw new QmpdError('QMP_COMMAND_FAILED', `saving RAM state failed: ${info?.['error-desc'] ?? status}`, { status })
      }
    }
    const bytes = await Promise.race([receiver.received, receiver.failed.then((m) => Promise.reject(writeError ?? new QmpdError('IO_ERROR', m)))])
    await opts.afterTransfer?.()
    await Promise.race([receiver.synced, receiver.failed.then((m) => Promise.reject(writeError ?? new QmpdError('IO_ERROR', m)))])
    await rename(partial, opts.file)
    await fsyncDir(dir)
    return { bytes, ms: Math.round(performance.now() - t0), format: 'stream' }
  } catch (err) {
    // A background snapshot still streaming is let run to its end for the reason above (the
    // receiver drains it); anything else is cancelled and its receiver ended at once.
    const status = await qmp.execute('query-migrate').then((m) => m.status, () => undefined)
    const streaming = !!opts.background && status !== undefined && ['setup', 'active', 'device'].includes(status)
    if (!streaming) await qmp.execute('migrate_cancel').catch(() => {})
    if (!streaming || !(await settlesWithin(receiver.exited, 60_000))) await receiver.end()
    await rm(partial, { force: true })
    throw err
  } finally {
    if (poll) clearInterval(poll)
    await events.return?.()
    await rm(opts.socket.path, { force: true })
  }
}

/** A receiver process (receiver.mjs) and what it has reported. */
interface Receiver {
  /** The receiver's PID (its cwd is the socket's directory). */
  pid: number | undefined
  listening: Promise<void>
  /** The stream ended: its byte count (every byte is in the file, not yet flushed). */
  received: Promise<number>
  /** The file is fsynced. */
  synced: Promise<void>
  /** Resolves with the receiver's error, if it fails (never rejects). */
  failed: Promise<string>
  /** Resolves once the receiver process has exited (and every line it wrote was read). */
  exited: Promise<unknown>
  /** Ends the receiver if it still runs, and waits for it. */
  end(): Promise<void>
}

const RECEIVER = fileURLToPath(new URL('./receiver.mjs', import.meta.url))

/**
 * Starts the receiver of one save in the socket's directory. It runs in a session of its own
 * and is not waited for by the daemon's event loop: if the daemon dies, the stream still ends
 * and the next daemon finds the file (see receiver.mjs).
 */
function startReceiver(socketPath: string, partial: string): Receiver {
  const child = spawn(process.execPath, [RECEIVER, basename(socketPath), partial], { cwd: dirname(socketPath), detached: true, stdio: ['ignore', 'pipe', 'pipe'] })
  child.unref()
  const lines: Array<(line: string) => void> = []
  let buf = ''
  let stderr = ''
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    buf += d
    for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
      const line = buf.slice(0, i)
      buf = buf.slice(i + 1)
      for (const l of lines) l(line)
    }
  })
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  for (const stream of [child.stdout, child.stderr] as unknown as Array<{ unref?: () => void }>) stream.unref?.()
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)))
  const on = (prefix: string): Promise<string> =>
    new Promise((resolve) => lines.push((l) => l.startsWith(prefix) && resolve(l.slice(prefix.length).trim())))
  const failed = Promise.race([
    on('error'),
    exited.then((code) => (code === 0 ? new Promise<string>(() => {}) : `the receiver exited with ${code}: ${stderr.trim().slice(-500)}`)),
  ])
  const orFail = <T>(p: Promise<T>): Promise<T> => Promise.race([p, failed.then((m) => Promise.reject(new QmpdError('IO_ERROR', m)))])
  return {
    pid: child.pid,
    listening: orFail(on('listening').then(() => undefined)),
    received: on('received').then(Number),
    synced: on('synced').then(() => undefined),
    failed,
    exited: Promise.all([exited, new Promise((resolve) => child.stdout.once('close', resolve))]),
    async end() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL')
        await exited
      }
    },
  }
}

/**
 * After a crash: when `file` is missing but its partial file holds a stream that QEMU reports it
 * sent whole (its last outgoing migration completed; the receiver, which outlives the daemon,
 * has written and fsynced it), the partial file is the RAM state: it is fsynced again and given
 * its final name. Returns whether `file` is whole now. `qmp` is undefined when QEMU is gone: then
 * nothing says the stream was whole.
 */
export async function finishReceivedState(qmp: QmpClient | undefined, file: string): Promise<boolean> {
  const partial = partialName(file)
  const have = async (f: string) => stat(f).then((s) => s.size > 0, () => false)
  if (await have(file)) return true
  if (!qmp || !(await have(partial))) return false
  if ((await qmp.execute('query-migrate')).status !== 'completed') return false
  try {
    await checkMigrationStream(partial)
  } catch {
    return false
  }
  const fh = await open(partial, 'r+')
  try {
    await fh.sync()
  } finally {
    await fh.close()
  }
  await rename(partial, file)
  await fsyncDir(dirname(file))
  return true
}

/** The refusal to load a mapped-ram file into a QEMU that has no mapped-ram capability. */
export function mappedRamUnsupported(file: string): QmpdError {
  return new QmpdError('NOT_SUPPORTED', `${file} is a mapped-ram RAM state file; this QEMU has no mapped-ram migration capability (QEMU 9.0+ loads it)`, { file, format: 'mapped-ram' })
}

/** Options of loadRamState. */
export interface LoadOptions {
  file: string
  /** Confines the file's real path just before qmpd opens it (the path policy). */
  check?: (real: string) => void
  socket: StateSocket
  log: Logger
}

/**
 * Feeds a RAM state file to a QEMU started with -incoming defer, in the format the file's header
 * says: a stream goes through the socket (QEMU listens with migrate-incoming, qmpd connects and
 * streams the file); a mapped-ram file is loaded by QEMU itself (filemig.ts), refused with
 * NOT_SUPPORTED by a QEMU without mapped-ram before anything is loaded. Resolves when QEMU reports the incoming
 * migration completed; the guest is then paused (QEMU runs with -S) until cont.
 */
export async function loadRamState(qmp: QmpClient, opts: LoadOptions): Promise<{ bytes: number; ms: number; format: RamFormat }> {
  const t0 = performance.now()
  // Opened once, here, and streamed from this descriptor: what was checked is what QEMU gets.
  const fh = await openStateFile(opts.file, opts.check)
  let streaming = false
  try {
    return await loadFrom(qmp, opts, fh, t0, () => (streaming = true))
  } finally {
    if (!streaming) await fh.close()
  }
}

async function loadFrom(qmp: QmpClient, opts: LoadOptions, fh: FileHandle, t0: number, onStream: () => void): Promise<{ bytes: number; ms: number; format: RamFormat }> {
  const { size, format } = await readStreamHeader(fh, opts.file)
  if (format === 'mapped-ram') {
    const s = await fileMigrationSupport(qmp)
    if (!s) throw mappedRamUnsupported(opts.file)
    await loadFromFile(qmp, s, fh, opts.file, opts.log)
    return { bytes: size, ms: Math.round(performance.now() - t0), format }
  }
  await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] })
  const events = qmp.events({ names: ['MIGRATION'] })
  let sock: Socket | undefined
  try {
    await qmp.execute('migrate-incoming', { uri: `unix:${opts.socket.qemuPath}` })
    const short = shortSocketPath(opts.socket.path)
    try {
      sock = await new Promise<Socket>((resolve, reject) => {
        const s = connect(short.path, () => resolve(s))
        s.once('error', reject)
      })
    } finally {
      short.release()
    }
    // QEMU closes its end as soon as it has read the stream's end marker, sometimes before the
    // last bytes are flushed or the pipeline has finished: EPIPE, ECONNRESET or a premature close
    // of the socket are then harmless. Whether the load worked is decided by QEMU's MIGRATION event.
    onStream()
    const sent = pipeline(fh.createReadStream({ start: 0 }), sock).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'EPIPE' && err.code !== 'ECONNRESET' && err.code !== 'ERR_STREAM_PREMATURE_CLOSE') throw err
    })
    sent.catch(() => {}) // settled below, or no longer of interest once QEMU has the whole state
    for await (const ev of events) {
      const status = ev.data.status
      opts.log.debug({ status }, 'incoming migration status')
      if (status === 'completed') break
      if (status === 'failed' || status === 'cancelled') {
        const local = await sent.then(() => undefined, (err: Error) => err.message)
        throw new QmpdError(
          'QMP_COMMAND_FAILED',
          `loading RAM state from ${opts.file} failed (${status}${local ? `; reading the file: ${local}` : ''}); see qemu.log`,
          { status, file: opts.file },
        )
      }
    }
    // QEMU has read the stream to its end marker: the load is done, whatever the sending side is
    // still doing (waiting for the socket to drain or close). Not waiting for it saved ~20 ms.
    return { bytes: size, ms: Math.round(performance.now() - t0), format }
  } finally {
    sock?.destroy()
    await events.return?.()
    await rm(opts.socket.path, { force: true })
  }
}

/** The optional hooks of a save that the file: path runs too. */
function pick(opts: SaveOptions): Pick<SaveOptions, 'onProgress' | 'afterTransfer' | 'onMigrating'> {
  return {
    ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
    ...(opts.afterTransfer ? { afterTransfer: opts.afterTransfer } : {}),
    ...(opts.onMigrating ? { onMigrating: opts.onMigrating } : {}),
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r')
  try {
    await fh.sync()
  } finally {
    await fh.close()
  }
}

