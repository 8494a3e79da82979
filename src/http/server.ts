// Listens on TCP or a unix socket for the app; knows nothing of the routes.
import { chmodSync, lstatSync, renameSync, rmSync, unlinkSync } from 'node:fs'
import { connect } from 'node:net'
import { basename, dirname, join } from 'node:path'
import type { FastifyInstance } from 'fastify'
import { QmpdError } from '../errors.ts'
import type { Daemon } from '../daemon.ts'
import { loadOrCreateToken } from '../daemon.ts'

/** A parsed --listen value. */
export type ListenTarget = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string }

/** Parses "host:port", "[v6]:port", ":port" or "unix:/path". */
export function parseListen(s: string): ListenTarget {
  if (s.startsWith('unix:')) {
    const path = s.slice(5)
    if (!path.startsWith('/')) throw new QmpdError('INVALID_INPUT', `--listen unix: needs an absolute path, got ${s}`)
    return { kind: 'unix', path }
  }
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(s)
  const port = Number(m?.[3])
  if (!m || port > 65535) throw new QmpdError('INVALID_INPUT', `--listen must be host:port or unix:/path, got ${s}`)
  return { kind: 'tcp', host: m[1] ?? (m[2] || '127.0.0.1'), port }
}

/** Whether something accepts connections on the unix socket at path (ECONNREFUSED: nobody does). */
function socketAnswers(path: string): Promise<boolean | NodeJS.ErrnoException> {
  return new Promise((resolve) => {
    const s = connect(path)
    const timer = setTimeout(() => {
      s.destroy()
      resolve(true) // a listener with a full backlog is still a listener
    }, 2000)
    s.once('connect', () => {
      clearTimeout(timer)
      s.destroy()
      resolve(true)
    })
    s.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer)
      resolve(err.code === 'ECONNREFUSED' ? false : err)
    })
  })
}

/**
 * Makes room for a unix socket at path: nothing there, or a stale socket (nobody listens) that is
 * removed. Anything else is left alone and refused: a regular file, a directory, a socket another
 * process (a second qmpd) serves.
 * @throws QmpdError INVALID_INPUT when path is not a socket; BUSY when something listens on it.
 */
export async function claimUnixPath(path: string): Promise<void> {
  let st
  try {
    st = lstatSync(path)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return
    throw new QmpdError('INVALID_INPUT', `--listen unix:${path}: cannot inspect it: ${(err as Error).message}`, { path })
  }
  if (!st.isSocket()) {
    throw new QmpdError('INVALID_INPUT', `--listen unix:${path}: it exists and is not a socket; qmpd replaces only a stale socket (remove it or pick another path)`, { path })
  }
  const answers = await socketAnswers(path)
  if (answers === true) throw new QmpdError('BUSY', `--listen unix:${path}: another process (another qmpd?) listens on this socket; stop it or pick another path`, { path })
  if (answers !== false) throw new QmpdError('INVALID_INPUT', `--listen unix:${path}: cannot tell whether the socket is stale: ${answers.message}`, { path })
}

/**
 * Starts listening. TCP requires the bearer token on every API request; a unix socket (mode 0660)
 * relies on file permissions instead. Returns the app and the address it listens on.
 * @throws QmpdError INVALID_INPUT for a bad --listen or a unix path that is not a stale socket; BUSY when another process listens there.
 */
export async function listen(daemon: Daemon, listenSpec: string): Promise<{ app: FastifyInstance; address: string }> {
  const target = parseListen(listenSpec)
  if (target.kind === 'unix') {
    await claimUnixPath(target.path)
    const app = await daemon.app()
    // Listen on a private name, then rename it over the target: the path never points at a half-made
    // socket, a stale one is replaced atomically, and Node's own unlink at close hits the private
    // name (gone), never the path, which by then may be another daemon's socket.
    const tmp = join(dirname(target.path), `.${basename(target.path).slice(0, 16)}.${process.pid}`)
    rmSync(tmp, { force: true })
    await app.listen({ path: tmp })
    chmodSync(tmp, 0o660)
    const ino = lstatSync(tmp).ino
    try {
      await claimUnixPath(target.path) // again: a daemon may have taken it while this one started
      renameSync(tmp, target.path)
    } catch (err) {
      await app.close()
      throw err
    }
    app.server.once('close', () => {
      // Remove the socket only if it is still the one this daemon made.
      try {
        if (lstatSync(target.path).ino === ino) unlinkSync(target.path)
      } catch {
        /* already gone */
      }
    })
    daemon.log.info({ socket: target.path }, 'listening on unix socket (no token)')
    return { app, address: `unix:${target.path}` }
  }
  const { token, path } = loadOrCreateToken(daemon.config)
  const app = await daemon.app({ token })
  const address = await app.listen({ host: target.host, port: target.port })
  daemon.log.info({ address, tokenFile: path ?? '(QMPD_TOKEN)' }, 'listening; API requests need Authorization: Bearer <token>')
  return { app, address }
}
