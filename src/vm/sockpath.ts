// Reaches unix sockets whose path is too long for sun_path (/proc/self/fd); no protocol.
import { closeSync, openSync } from 'node:fs'
import { basename, dirname } from 'node:path'

/** sun_path holds 108 bytes including the NUL; leave a margin. */
const MAX_SUN_PATH = 100

/**
 * A unix socket path short enough for sun_path. Long paths (deep state dirs, test fixtures) are
 * reached through /proc/self/fd/N/<name>, with N an open descriptor of the socket's directory: the
 * kernel resolves that like any path, so connect() and bind() work. Call release() once the
 * connect or listen has completed.
 */
export function shortSocketPath(path: string): { path: string; release: () => void } {
  if (Buffer.byteLength(path) <= MAX_SUN_PATH) return { path, release: () => {} }
  const fd = openSync(dirname(path), 'r')
  let released = false
  return {
    path: `/proc/self/fd/${fd}/${basename(path)}`,
    release: () => {
      if (!released) closeSync(fd)
      released = true
    },
  }
}
