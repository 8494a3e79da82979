// Listens on TCP or a unix socket for the app; knows nothing of the routes.
import { chmodSync, rmSync } from 'node:fs'
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

/**
 * Starts listening. TCP requires the bearer token on every API request; a unix socket (mode 0660)
 * relies on file permissions instead. Returns the app and the address it listens on.
 */
export async function listen(daemon: Daemon, listenSpec: string): Promise<{ app: FastifyInstance; address: string }> {
  const target = parseListen(listenSpec)
  if (target.kind === 'unix') {
    const app = await daemon.app()
    rmSync(target.path, { force: true })
    await app.listen({ path: target.path })
    chmodSync(target.path, 0o660)
    daemon.log.info({ socket: target.path }, 'listening on unix socket (no token)')
    return { app, address: `unix:${target.path}` }
  }
  const { token, path } = loadOrCreateToken(daemon.config)
  const app = await daemon.app({ token })
  const address = await app.listen({ host: target.host, port: target.port })
  daemon.log.info({ address, tokenFile: path ?? '(QMPD_TOKEN)' }, 'listening; API requests need Authorization: Bearer <token>')
  return { app, address }
}
