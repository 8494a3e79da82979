// A loopback TCP listener that forwards every connection to an export's NBD unix socket (QEMU runs
// one NBD server per process, on the unix socket qmpd owns); holds no export state of its own.
import { createConnection, createServer, type Server, type Socket } from 'node:net'
import { QmpdError } from '../errors.ts'

/** Where a forwarder listens. */
export interface TcpAddress {
  host: '127.0.0.1' | '::1'
  port: number
}

/** An open forwarder: its bound address, and close() (drops the clients it carries). */
export interface TcpForward {
  readonly address: TcpAddress
  close(): Promise<void>
}

/**
 * Binds `want` (port 0: any free port) on loopback and pipes each accepted connection to
 * `socketPath()` (at most MAX_CLIENTS at once; errors after the bind go to `onError`). Nothing is connected to the unix socket until a client comes.
 * @throws QmpdError PORT_IN_USE when the port is taken; HOST_RESOURCE_MISSING when it cannot be bound otherwise.
 */
/** Connections one forwarder carries at once; more are closed at accept (each costs a socket to QEMU). */
const MAX_CLIENTS = 16

export async function openTcpForward(want: TcpAddress, socketPath: () => string, onError: (err: Error) => void = () => {}): Promise<TcpForward> {
  const clients = new Set<Socket>()
  const server: Server = createServer((client) => {
    if (clients.size >= MAX_CLIENTS) {
      client.destroy()
      return
    }
    clients.add(client)
    const upstream = createConnection(socketPath())
    const drop = (): void => {
      client.destroy()
      upstream.destroy()
      clients.delete(client)
    }
    client.on('error', drop).on('close', drop)
    upstream.on('error', drop).on('close', drop)
    client.pipe(upstream)
    upstream.pipe(client)
  })
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EADDRINUSE') reject(new QmpdError('PORT_IN_USE', `tcp: ${want.host} port ${want.port} is already in use on this host`, { port: want.port }))
      else reject(new QmpdError('HOST_RESOURCE_MISSING', `tcp: cannot listen on ${want.host} port ${want.port}: ${err.message}`, { port: want.port }))
    })
    server.listen({ host: want.host, port: want.port, ipv6Only: want.host === '::1' }, resolve)
  })
  // Accept errors later on (EMFILE...) are reported, never thrown out of the daemon.
  server.removeAllListeners('error')
  server.on('error', onError)
  const bound = server.address()
  const port = typeof bound === 'object' && bound ? bound.port : want.port
  return {
    address: { host: want.host, port },
    close: () =>
      new Promise<void>((resolve) => {
        for (const c of clients) c.destroy()
        server.close(() => resolve())
      }),
  }
}
