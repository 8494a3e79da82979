// A minimal QMP client on a plain net.Socket, sharing no code with src/qmp. Tests use it to drive
// QEMU without qmpd and benchmarks use it as the "raw QMP" baseline, so it does only what the
// protocol needs: greeting, qmp_capabilities, newline-delimited JSON with ids, events.
import net from 'node:net'
import { EventEmitter } from 'node:events'

interface Pending {
  resolve: (value: unknown) => void
  reject: (err: Error) => void
}

/** A QMP event as QEMU sends it. */
export interface RawQmpEvent {
  event: string
  data?: any
  timestamp: { seconds: number; microseconds: number }
}

/**
 * Minimal raw QMP client; emits 'event' (RawQmpEvent) and 'close' (Error).
 * Create with RawQmp.connect(); call close() when done.
 */
export class RawQmp extends EventEmitter {
  readonly #sock: net.Socket
  readonly #pending = new Map<number, Pending>()
  #nextId = 1
  #buf = ''
  #closed: Error | undefined
  #onGreeting: (() => void) | undefined

  private constructor(sock: net.Socket) {
    super()
    this.#sock = sock
    sock.setEncoding('utf8')
    sock.on('data', (chunk: string) => this.#onData(chunk))
    sock.on('error', (err) => this.#fail(err))
    sock.on('close', () => this.#fail(new Error('QMP socket closed')))
  }

  /** Connects to a QMP unix socket, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(path: string): Promise<RawQmp> {
    const qmp = new RawQmp(net.createConnection(path))
    try {
      // The greeting comes before any command may be sent (QMP spec 2.2).
      await new Promise<void>((resolve, reject) => {
        qmp.once('close', reject)
        qmp.#onGreeting = () => {
          qmp.off('close', reject)
          resolve()
        }
      })
      await qmp.cmd('qmp_capabilities')
    } catch (err) {
      qmp.close()
      throw err
    }
    return qmp
  }

  /** Runs one command; resolves with its `return` value, rejects with Error(desc) on a QMP error. */
  cmd(execute: string, args?: Record<string, unknown>): Promise<any> {
    if (this.#closed) return Promise.reject(this.#closed)
    const id = this.#nextId++
    const msg: Record<string, unknown> = { execute, id }
    if (args !== undefined) msg['arguments'] = args
    return new Promise((resolve, reject) => {
      // Registered before the write so that the reply always finds its waiter.
      this.#pending.set(id, { resolve, reject })
      this.#sock.write(JSON.stringify(msg) + '\n')
    })
  }

  /**
   * Resolves with the data of the next event called `name` (whose data satisfies `pred`, when
   * given), rejects after timeoutMs or on close. Only events arriving after the call count: call
   * it before the command that causes the event.
   */
  waitEvent(name: string, timeoutMs: number, pred?: (data: any) => boolean): Promise<any> {
    return new Promise((resolve, reject) => {
      const onEvent = (ev: RawQmpEvent): void => {
        if (ev.event !== name || (pred && !pred(ev.data ?? {}))) return
        cleanup()
        resolve(ev.data ?? {})
      }
      const onClose = (err: Error): void => {
        cleanup()
        reject(err)
      }
      const timer = setTimeout(() => {
        cleanup()
        reject(new Error(`timed out after ${timeoutMs} ms waiting for QMP event ${name}`))
      }, timeoutMs)
      const cleanup = (): void => {
        clearTimeout(timer)
        this.off('event', onEvent)
        this.off('close', onClose)
      }
      this.on('event', onEvent)
      this.on('close', onClose)
    })
  }

  /** Closes the socket and rejects pending commands. Safe to call more than once. */
  close(): void {
    this.#sock.destroy()
    this.#fail(new Error('QMP client closed'))
  }

  #onData(chunk: string): void {
    this.#buf += chunk
    let nl: number
    while ((nl = this.#buf.indexOf('\n')) >= 0) {
      const line = this.#buf.slice(0, nl).trim()
      this.#buf = this.#buf.slice(nl + 1)
      if (line.length === 0) continue
      let msg: any
      try {
        msg = JSON.parse(line)
      } catch {
        this.#sock.destroy()
        this.#fail(new Error(`invalid JSON from QMP: ${line}`))
        return
      }
      this.#dispatch(msg)
    }
  }

  #dispatch(msg: any): void {
    if (this.#onGreeting) {
      if (msg?.QMP === undefined) {
        this.#sock.destroy()
        this.#fail(new Error(`unexpected QMP greeting: ${JSON.stringify(msg)}`))
        return
      }
      const done = this.#onGreeting
      this.#onGreeting = undefined
      done()
      return
    }
    if (typeof msg?.event === 'string') {
      this.emit('event', msg as RawQmpEvent)
      return
    }
    const p = typeof msg?.id === 'number' ? this.#pending.get(msg.id) : undefined
    if (!p) return
    this.#pending.delete(msg.id)
    if (msg.error) p.reject(new Error(String(msg.error.desc ?? JSON.stringify(msg.error))))
    else p.resolve(msg.return)
  }

  #fail(err: Error): void {
    if (this.#closed) return
    this.#closed = err
    for (const p of this.#pending.values()) p.reject(err)
    this.#pending.clear()
    this.emit('close', err)
  }
}
