// Takes the state directory for this daemon (abstract unix socket lock); no other start-up work.
import { createHash } from 'node:crypto'
import { realpathSync } from 'node:fs'
import { connect, createServer, type Server } from 'node:net'
import { QmpdError } from './errors.ts'

/** How long a refused daemon waits for the holder to say its PID. */
const HOLDER_QUERY_TIMEOUT_MS = 1_000

/** The exclusive hold of one state directory by one daemon; release() gives it up. */
export interface StateDirLock {
  /** The abstract socket name, without the leading NUL (for logs). */
  name: string
  release(): Promise<void>
}

/**
 * Takes the state directory for this process, or throws BUSY naming the directory and, when it
 * answers, the PID of the daemon holding it. The lock is a Linux abstract unix socket named from
 * the directory's real path: the kernel frees it when the last descriptor closes, so a daemon
 * killed with SIGKILL leaves no stale lock behind (a pid file or a socket file in the directory
 * would). Whoever connects to it is told the holder's PID. The directory must exist.
 */
export async function lockStateDir(stateDir: string): Promise<StateDirLock> {
  const real = realpathSync(stateDir)
  const name = `qmpd:${createHash('sha256').update(real).digest('hex')}`
  const server: Server = createServer((sock) => {
    sock.on('error', () => {})
    sock.end(JSON.stringify({ pid: process.pid }) + '\n')
  })
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject)
      server.listen(`\0${name}`, () => {
        server.off('error', reject)
        resolve()
      })
    })
  } catch (err) {
    server.close()
    if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE') {
      throw new QmpdError('INTERNAL', `cannot lock state directory ${real}: ${(err as Error).message}`, { stateDir: real }, { cause: err })
    }
    const pid = await holderPid(name)
    throw new QmpdError(
      'BUSY',
      `state directory ${real} is in use by another qmpd${pid ? ` (pid ${pid})` : ''}; one daemon per state directory`,
      { stateDir: real, ...(pid ? { pid } : {}) },
    )
  }
  // The lock must not keep an otherwise finished process alive.
  server.unref()
  let released: Promise<void> | undefined
  return {
    name,
    release: () => (released ??= new Promise<void>((resolve) => server.close(() => resolve()))),
  }
}

/** Asks the lock's holder for its PID; undefined when it does not answer in time. */
function holderPid(name: string): Promise<number | undefined> {
  return new Promise((resolve) => {
    let buf = ''
    const sock = connect(`\0${name}`)
    const done = (pid: number | undefined): void => {
      clearTimeout(timer)
      sock.destroy()
      resolve(pid)
    }
    const timer = setTimeout(() => done(undefined), HOLDER_QUERY_TIMEOUT_MS)
    sock.setEncoding('utf8')
    sock.on('data', (d: string) => (buf += d))
    sock.on('end', () => {
      try {
        const pid = (JSON.parse(buf) as { pid?: unknown }).pid
        done(typeof pid === 'number' ? pid : undefined)
      } catch {
        done(undefined)
      }
    })
    sock.on('error', () => done(undefined))
  })
}
