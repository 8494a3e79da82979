// HTTP from the host to a guest's server through a user-mode NIC's hostfwd, and a free loopback
// port for such a forward or a VNC display; test helpers, no assertions.
import { get } from 'node:http'
import { createServer } from 'node:net'
import { eventually } from './daemon.ts'

/** GET http://127.0.0.1:port/path on a fresh connection (no keep-alive across QEMU relaunches). */
export function httpGet(port: number, path: string, timeoutMs = 5_000): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = get({ host: '127.0.0.1', port, path, agent: false, timeout: timeoutMs }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (c: string) => (body += c))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
      res.on('error', reject)
    })
    req.on('timeout', () => req.destroy(new Error('timeout')))
    req.on('error', reject)
  })
}

/**
 * The guest's answer (trimmed) once it serves, retried every 250 ms for `timeoutMs` (slirp accepts
 * the connection before the guest listens); each try waits `requestTimeoutMs`.
 */
export async function guestGet(port: number, path: string, timeoutMs = 60_000, requestTimeoutMs = 5_000): Promise<string> {
  let last: unknown
  let body: string | undefined
  const ok = await eventually(
    async () => {
      try {
        const r = await httpGet(port, path, requestTimeoutMs)
        if (r.status === 200) body = r.body.trim()
        else last = `HTTP ${r.status}`
      } catch (err) {
        last = err
      }
      return body !== undefined
    },
    timeoutMs,
    250,
  )
  if (!ok || body === undefined) throw new Error(`GET :${port}${path} never answered: ${String(last)}`)
  return body
}

/** A port the kernel just gave out and took back: free now. */
export async function freePort(): Promise<number> {
  const srv = createServer()
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  const port = (srv.address() as { port: number }).port
  await new Promise((r) => srv.close(r))
  return port
}
