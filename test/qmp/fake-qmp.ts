/**
 * Test helpers for the QMP client: a fake QMP server (only for protocol faults real QEMU does
 * not produce, CONVENTIONS #14), short unix socket paths, and a pino logger that records lines.
 * Not a test file itself (tap runs *.test.ts only).
 */

import fs from 'node:fs'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { Writable } from 'node:stream'
import { pino, type Logger } from 'pino'

/** The part of a tap Test the helpers need. */
export type TapLike = {
  testdir(): string
  teardown(fn: () => unknown): void
}

/** A QMP command as the fake server received it. */
export interface FakeCommand {
  execute: string
  arguments?: Record<string, unknown>
  id?: unknown
  [k: string]: unknown
}

/** One client connection of the fake server. */
export class FakeConn {
  readonly commands: FakeCommand[] = []
  private waiters: Array<() => void> = []

  constructor(readonly socket: net.Socket) {}

  /** Writes one JSON message (or a raw string, sent as is) followed by CRLF like QEMU. */
  send(msg: unknown): void {
    if (!this.socket.destroyed) this.socket.write((typeof msg === 'string' ? msg : JSON.stringify(msg)) + '\r\n')
  }

  /** Writes raw bytes, without adding a line end. */
  raw(data: string | Buffer): void {
    if (!this.socket.destroyed) this.socket.write(data)
  }

  /** Replies {"return": value} to cmd. */
  reply(cmd: FakeCommand, value: unknown = {}): void {
    this.send({ return: value, id: cmd.id })
  }

  /** Sends an event in QEMU's wire form (no `data` key when data is undefined). */
  event(name: string, data?: Record<string, unknown>): void {
    this.send({ timestamp: { seconds: 1, microseconds: 2 }, event: name, ...(data ? { data } : {}) })
  }

  /** Resolves once at least n commands (after qmp_capabilities) were received. */
  async waitForCommands(n: number): Promise<FakeCommand[]> {
    while (this.commands.length < n) await new Promise<void>((r) => this.waiters.push(r))
    return this.commands
  }

  /** @internal */
  received(cmd: FakeCommand): void {
    this.commands.push(cmd)
    for (const w of this.waiters.splice(0)) w()
  }
}

/** Options of startFakeQmp. */
export interface FakeQmpOptions {
  /** Greeting to send on accept; false for none. */
  greeting?: unknown
  /** Called for each command after qmp_capabilities; default: reply {}. */
  onCommand?: (cmd: FakeCommand, conn: FakeConn) => void
  /** Called for qmp_capabilities instead of replying {}. */
  onCapabilities?: (cmd: FakeCommand, conn: FakeConn) => void
  /** Listen on TCP 127.0.0.1 instead of a unix socket. */
  tcp?: boolean
}

/** A running fake QMP server. */
export interface FakeQmp {
  /** Unix socket path (unix mode). */
  path: string
  /** TCP port (tcp mode). */
  port: number
  /** Capability negotiation commands received (qmp_capabilities), in order. */
  capabilities: FakeCommand[]
  /** Resolves with the latest accepted connection that is still open, waiting for one if needed. */
  connection(): Promise<FakeConn>
  /** Resolves with the n-th accepted connection (1-based), waiting for it if needed. */
  nthConnection(n: number): Promise<FakeConn>
}

/** The greeting of QEMU 7.2.22 as seen on the wire. */
export const QEMU_GREETING = {
  QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: 'fake' }, capabilities: ['oob'] },
}

/**
 * Starts a fake QMP server in the test's directory; it answers qmp_capabilities with {} and
 * hands every other command to onCommand. Closed in t.teardown.
 */
export async function startFakeQmp(t: TapLike, opts: FakeQmpOptions = {}): Promise<FakeQmp> {
  const conns: FakeConn[] = []
  const connWaiters: Array<() => void> = []
  const capabilities: FakeCommand[] = []
  const server = net.createServer((socket) => {
    const conn = new FakeConn(socket)
    socket.on('error', () => {})
    if (opts.greeting !== false) conn.send(opts.greeting ?? QEMU_GREETING)
    let buf = ''
    socket.setEncoding('utf8')
    socket.on('data', (d: string) => {
      buf += d
      let i: number
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i)
        buf = buf.slice(i + 1)
        if (!line.trim()) continue
        const cmd = JSON.parse(line) as FakeCommand
        if (cmd.execute === 'qmp_capabilities') {
          capabilities.push(cmd)
          if (opts.onCapabilities) opts.onCapabilities(cmd, conn)
          else conn.reply(cmd)
          continue
        }
        conn.received(cmd)
        if (opts.onCommand) opts.onCommand(cmd, conn)
        else conn.reply(cmd)
      }
    })
    conns.push(conn)
    for (const w of connWaiters.splice(0)) w()
  })
  let sockPath = ''
  let port = 0
  if (opts.tcp) {
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
    port = (server.address() as net.AddressInfo).port
  } else {
    sockPath = socketPath(t, 'fake.sock')
    await new Promise<void>((r) => server.listen(sockPath, r))
  }
  t.teardown(async () => {
    for (const c of conns) c.socket.destroy()
    await new Promise<void>((r) => server.close(() => r()))
  })
  return {
    path: sockPath,
    port,
    capabilities,
    connection: async () => {
      for (;;) {
        const last = conns[conns.length - 1]
        if (last && !last.socket.destroyed) return last
        await new Promise<void>((r) => connWaiters.push(r))
      }
    },
    nthConnection: async (n: number) => {
      while (conns.length < n) await new Promise<void>((r) => connWaiters.push(r))
      return conns[n - 1] as FakeConn
    },
  }
}

/**
 * A unix socket path for `name` inside t.testdir(). sun_path holds 108 bytes and tap's fixture
 * directories are long, so when needed the path goes through a short symlink in the OS temp
 * directory (removed in teardown); the socket file itself still lives in the test directory.
 */
export function socketPath(t: TapLike, name: string): string {
  const dir = t.testdir()
  const direct = path.join(dir, name)
  if (Buffer.byteLength(direct) <= 100) return direct
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'qmpd-'))
  fs.symlinkSync(dir, path.join(base, 'd'))
  t.teardown(() => fs.rmSync(base, { recursive: true, force: true }))
  return path.join(base, 'd', name)
}

/** A debug-level pino logger whose records are kept in `records`. */
export function recordingLogger(): { logger: Logger; records: Array<Record<string, unknown>> } {
  const records: Array<Record<string, unknown>> = []
  const stream = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) if (line) records.push(JSON.parse(line) as Record<string, unknown>)
      cb()
    },
  })
  return { logger: pino({ level: 'debug' }, stream), records }
}

/** Resolves after ms milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms))
}
