// Finds the daemon a CLI command talks to and its token (flags, environment, the state dir's token
// file); it reads files and never writes one.
import { readFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { defaultStateDir } from '../config.ts'
import { parseDaemonUrl } from '../client/index.ts'

/** What --url, --token and --state-dir said (any may be absent). */
export interface TargetFlags {
  url?: string
  token?: string
  stateDir?: string
}

/** The daemon's address and the token to send (none on a unix socket, which needs none). */
export interface Target {
  url: string
  token?: string
  /** Where the token came from, for error messages. */
  tokenFrom?: string
}

/** The default address, the daemon's own default listener. */
export const DEFAULT_URL = 'http://127.0.0.1:7777'

/**
 * --url, else QMPD_URL, else 127.0.0.1:7777. The token: --token, else QMPD_TOKEN, else the token
 * file of the state dir the daemon uses (--state-dir, QMPD_STATE_DIR, $XDG_STATE_HOME/qmpd or
 * ~/.local/state/qmpd: the daemon's resolution in src/config.ts), when it can be read.
 * @throws Error for an address that is neither http://host:port nor unix:/path.
 */
export function resolveTarget(flags: TargetFlags, env: NodeJS.ProcessEnv = process.env): Target {
  const url = flags.url ?? (env['QMPD_URL'] || DEFAULT_URL)
  parseDaemonUrl(url)
  if (url.startsWith('unix:')) return { url }
  if (flags.token) return { url, token: flags.token, tokenFrom: '--token' }
  if (env['QMPD_TOKEN']) return { url, token: env['QMPD_TOKEN'], tokenFrom: 'QMPD_TOKEN' }
  const file = join(resolve(flags.stateDir ?? env['QMPD_STATE_DIR'] ?? defaultStateDir(env)), 'token')
  try {
    const token = readFileSync(file, 'utf8').trim()
    if (token) return { url, token, tokenFrom: file }
  } catch {
    // No token file readable: the daemon will say 401, and the message names where we looked.
  }
  return { url, tokenFrom: `none (no --token, QMPD_TOKEN or readable ${file})` }
}
