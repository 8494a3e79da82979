// RAM state through a file: migration with mapped-ram and multifd (QEMU 9.0+): whether a QEMU can,
// and the save and load themselves; no journal, no VM records, no socket streams.
import { constants as fsc, openSync, closeSync, rmSync } from 'node:fs'
import { open, rename, rm, type FileHandle } from 'node:fs/promises'
import { availableParallelism } from 'node:os'
import { randomBytes } from 'node:crypto'
import { dirname, join } from 'node:path'
import type { Logger } from 'pino'
import { QmpdError } from '../errors.ts'
import type { MigrationCapabilityStatus, QmpClient } from '../qmp/index.ts'

/** What a QEMU offers for a file: migration: mapped-ram with multifd, and whether it has direct-io. */
export interface FileMigrationSupport {
  /** The direct-io migration parameter exists (QEMU 9.1+). */
  directIo: boolean
}

const support = new WeakMap<QmpClient, FileMigrationSupport | null>()

/**
 * Whether this QEMU writes and loads mapped-ram files, from what it reports itself
 * (query-migrate-capabilities lists mapped-ram and multifd; query-migrate-parameters direct-io).
 * Undefined for a QEMU without them (7.2): such a QEMU uses the socket stream.
 */
export async function fileMigrationSupport(qmp: QmpClient): Promise<FileMigrationSupport | undefined> {
  const known = support.get(qmp)
  if (known !== undefined) return known ?? undefined
  const caps = new Set((await qmp.execute('query-migrate-capabilities')).map((c) => c.capability as string))
  let found: FileMigrationSupport | null = null
  if (caps.has('mapped-ram') && caps.has('multifd')) {
    const params = await qmp.execute('query-migrate-parameters')
    found = { directIo: Object.hasOwn(params, 'direct-io') }
  }
  support.set(qmp, found)
  return found ?? undefined
}

/** Multifd threads per transfer: more than the host's cores only contend. */
export function multifdChannels(): number {
  return Math.max(1, Math.min(4, availableParallelism()))
}

/**
 * Whether files in `dir` can be opened O_DIRECT (tmpfs and some FUSE file systems refuse it with
 * EINVAL): probed with a scratch file, since QEMU's direct-io would fail the migration instead.
 */
export function directIoWorks(dir: string): boolean {
  const probe = join(dir, `.odirect-${randomBytes(4).toString('hex')}`)
  try {
    closeSync(openSync(probe, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY | fsc.O_DIRECT, 0o600))
    return true
  } catch {
    return false
  } finally {
    rmSync(probe, { force: true })
  }
}

/** The capabilities and parameters of a mapped-ram transfer, the same on both sides. */
async function setUp(qmp: QmpClient, s: FileMigrationSupport, dir: string): Promise<{ directIo: boolean }> {
  const capabilities: MigrationCapabilityStatus[] = [
    { capability: 'events', state: true },
    { capability: 'background-snapshot', state: false },
    { capability: 'pause-before-switchover', state: false },
    { capability: 'multifd', state: true },
    { capability: 'mapped-ram', state: true },
  ]
  await qmp.execute('migrate-set-capabilities', { capabilities })
  const directIo = s.directIo && directIoWorks(dir)
  await qmp.execute('migrate-set-parameters', {
    'multifd-channels': multifdChannels(),
    // Migration runs at disk speed: QEMU's default cap is 32 MiB/s. 1 TiB/s = no cap.
    'max-bandwidth': 2 ** 40,
    ...(s.directIo ? { 'direct-io': directIo } : {}),
  })
  return { directIo }
}

/**
 * The path QEMU opens for a file qmpd holds open: its /proc fd link, so QEMU gets the very file
 * qmpd created or checked (a symlink swapped in on the way since is not followed), and no
 * character of the user's path reaches QEMU's URI parser (`file:` takes `,offset=`).
 */
function procPath(fh: FileHandle): string {
  return `/proc/${process.pid}/fd/${fh.fd}`
}

/** Options of saveToFile (a subset of saveRamState's). */
export interface FileSaveOptions {
  file: string
  partial: string
  log: Logger
  onProgress?: (current: number, total: number) => void
  afterTransfer?: () => Promise<void>
  onMigrating?: () => Promise<void>
}

/**
 * Writes the VM's RAM and device state to `opts.partial` with a mapped-ram file: migration (the
 * guest must be stopped: mapped-ram writes each page once, at its offset), fsyncs and renames it to
 * `opts.file`. On failure the migration is cancelled and no file is left.
 * @throws QmpdError IO_ERROR when QEMU cannot write the file; QMP_COMMAND_FAILED for any other failed migration.
 */
export async function saveToFile(qmp: QmpClient, s: FileMigrationSupport, opts: FileSaveOptions): Promise<{ bytes: number; directIo: boolean }> {
  const fh = await open(opts.partial, fsc.O_CREAT | fsc.O_EXCL | fsc.O_RDWR | fsc.O_NOFOLLOW, 0o600)
  const events = qmp.events({ names: ['MIGRATION'] })
  let poll: NodeJS.Timeout | undefined
  try {
    const { directIo } = await setUp(qmp, s, dirname(opts.file))
    await qmp.execute('migrate', { uri: `file:${procPath(fh)}` })
    await opts.onMigrating?.()
    if (opts.onProgress) {
      poll = setInterval(() => {
        qmp.execute('query-migrate').then((m) => m.ram && opts.onProgress?.(m.ram.transferred, m.ram.total), () => {})
      }, 250)
    }
    for await (const ev of events) {
      const status = ev.data.status
      opts.log.debug({ status }, 'migration status')
      if (status === 'completed') break
      if (status === 'failed' || status === 'cancelled') {
        const desc = (await qmp.execute('query-migrate').catch(() => undefined))?.['error-desc'] ?? status
        const code = /No space|Input\/output|Disk quota/i.test(desc) ? 'IO_ERROR' : 'QMP_COMMAND_FAILED'
        throw new QmpdError(code, `saving RAM state to ${opts.file} failed: ${desc}`, { status, file: opts.file })
      }
    }
    await opts.afterTransfer?.()
    await fh.sync()
    const bytes = (await fh.stat()).size
    await fh.close()
    await rename(opts.partial, opts.file)
    const d = await open(dirname(opts.file), 'r')
    try {
      await d.sync()
    } finally {
      await d.close()
    }
    return { bytes, directIo }
  } catch (err) {
    await qmp.execute('migrate_cancel').catch(() => {})
    await fh.close().catch(() => {})
    await rm(opts.partial, { force: true })
    throw err
  } finally {
    if (poll) clearInterval(poll)
    await events.return?.()
  }
}

/**
 * Loads a mapped-ram file, open in `fh` (already checked), into a QEMU started with -incoming
 * defer: the same capabilities as the save on the incoming side, then migrate-incoming of the
 * file. Resolves when QEMU reports the load completed (the guest is paused until cont).
 * @throws QmpdError QMP_COMMAND_FAILED when QEMU fails the load.
 */
export async function loadFromFile(qmp: QmpClient, s: FileMigrationSupport, fh: FileHandle, file: string, log: Logger): Promise<{ directIo: boolean }> {
  const { directIo } = await setUp(qmp, s, dirname(file))
  const events = qmp.events({ names: ['MIGRATION'] })
  try {
    await qmp.execute('migrate-incoming', { uri: `file:${procPath(fh)}` })
    for await (const ev of events) {
      const status = ev.data.status
      log.debug({ status }, 'incoming migration status')
      if (status === 'completed') break
      if (status === 'failed' || status === 'cancelled') {
        throw new QmpdError('QMP_COMMAND_FAILED', `loading RAM state from ${file} failed (${status}); see qemu.log`, { status, file })
      }
    }
    return { directIo }
  } finally {
    await events.return?.()
  }
}
