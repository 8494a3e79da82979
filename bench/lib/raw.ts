// Raw-QMP baselines: QEMU spawned by the bench with the very argv qmpd would use (buildArgv), driven
// by test/helpers/rawqmp.ts (a plain socket client that shares no code with src/qmp). Nothing here
// goes through qmpd's QMP client, job manager, store or HTTP layer.
import { spawn, type ChildProcess } from 'node:child_process'
import { closeSync, existsSync, mkdirSync, openSync, rmSync } from 'node:fs'
import { createReadStream, createWriteStream } from 'node:fs'
import { open, rm } from 'node:fs/promises'
import { connect, createServer, type Socket } from 'node:net'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { buildArgv, type ActiveDisk, VM_FILES } from '../../src/vm/argv.ts'
import { VmDefinition } from '../../src/vm/definition.ts'
import { RawQmp, type RawQmpEvent } from '../../test/helpers/rawqmp.ts'
import { benchQemu } from './qemu-choice.ts'
import { track } from './reaper.ts'

/** Builds a full VmDefinition (defaults applied by qmpd's own schema) for buildArgv. */
export function vmDef(name: string, memoryMiB: number, disks: Array<{ id: string; file: string }>): VmDefinition {
  return VmDefinition.parse({ name, memoryMiB, machine: 'q35', disks: disks.map((d) => ({ id: d.id, file: d.file, format: 'qcow2', bus: 'virtio' })) })
}

/** A QEMU the bench launched itself. */
export interface RawVm {
  pid: number
  dir: string
  qmp: RawQmp
  child: ChildProcess
  exited: Promise<void>
  /** quit over QMP, SIGKILL after 5 s; resolves once the process is gone. Idempotent. */
  quit(): Promise<void>
}

/**
 * Spawns qemu-system-x86_64 in `dir` (its cwd, like qmpd does: relative socket paths) with
 * buildArgv's argument vector, polls for the QMP socket every 10 ms (qmpd polls at the same rate)
 * and connects RawQmp. The guest stays paused (-S) or waits for an incoming migration. `binary`
 * (default: the bench's QEMU) and `extraArgs` (appended) serve cases that run a second QEMU.
 */
export async function launchRaw(dir: string, def: VmDefinition, disks: ActiveDisk[], opts: { incoming?: boolean; binary?: string; extraArgs?: string[] } = {}): Promise<RawVm> {
  mkdirSync(dir, { recursive: true })
  const sock = join(dir, VM_FILES.qmpSocket)
  if (Buffer.byteLength(sock) > 100) throw new Error(`socket path too long: ${sock}`)
  rmSync(sock, { force: true })
  const argv = [...buildArgv(def, { accel: benchQemu().accel, disks, ...(opts.incoming ? { incoming: true } : {}) }), ...(opts.extraArgs ?? [])]
  const logFd = openSync(join(dir, VM_FILES.qemuLog), 'a', 0o640)
  let child: ChildProcess
  try {
    child = spawn(opts.binary ?? benchQemu().binary, argv, { cwd: dir, detached: true, stdio: ['ignore', logFd, logFd] })
  } finally {
    closeSync(logFd)
  }
  track(child.pid)
  let gone = false
  const exited = new Promise<void>((resolve) => {
    child.once('exit', () => {
      gone = true
      resolve()
    })
    child.once('error', () => {
      gone = true
      resolve()
    })
  })
  let qmp: RawQmp | undefined
  const deadline = Date.now() + 30_000
  while (!qmp) {
    if (gone) throw new Error(`raw QEMU exited during start (see ${join(dir, VM_FILES.qemuLog)})`)
    if (existsSync(sock)) {
      try {
        qmp = await RawQmp.connect(sock)
        break
      } catch (err) {
        if (Date.now() > deadline) {
          child.kill('SIGKILL')
          await exited
          throw err
        }
      }
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL')
      await exited
      throw new Error('raw QEMU opened no QMP socket within 30 s')
    }
    await new Promise((r) => setTimeout(r, 10))
  }
  const connected = qmp
  let quitting: Promise<void> | undefined
  return {
    pid: child.pid!,
    dir,
    qmp: connected,
    child,
    exited,
    quit: () =>
      (quitting ??= (async () => {
        if (!gone) {
          connected.cmd('quit').catch(() => {})
          const timer = setTimeout(() => {
            if (!gone) child.kill('SIGKILL')
          }, 5000)
          await exited
          clearTimeout(timer)
        }
        connected.close()
      })()),
  }
}

/** The status (completed, failed or cancelled) of the next MIGRATION event that ends one; call before migrate. */
export async function migrationEnd(qmp: RawQmp): Promise<string> {
  const data = await qmp.waitEvent('MIGRATION', 120_000, (d) => ['completed', 'failed', 'cancelled'].includes(d.status))
  return data.status
}

/**
 * Measures the guest pause from QEMU's STOP/RESUME event timestamps (the same clock and rule qmpd's
 * trackDowntime uses: first STOP to last RESUME after it).
 */
export function rawDowntime(qmp: RawQmp): { end(): number } {
  let stopAt: number | undefined
  let resumeAt: number | undefined
  const ms = (e: RawQmpEvent): number => e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000
  const on = (e: RawQmpEvent): void => {
    if (e.event === 'STOP' && stopAt === undefined) stopAt = ms(e)
    if (e.event === 'RESUME' && stopAt !== undefined) resumeAt = ms(e)
  }
  qmp.on('event', on)
  return {
    end() {
      qmp.off('event', on)
      if (stopAt === undefined) return 0
      return (resumeAt ?? Date.now()) - stopAt
    },
  }
}

/**
 * A QEMU job to its end the way the raw script does it: wait for each status in JOB_STATUS_CHANGE,
 * job-complete on ready, job-finalize on pending (when created with auto-finalize false),
 * job-dismiss once concluded, and the error from query-jobs. `issue` sends the command that
 * creates the job; the listener is registered before it.
 */
export async function rawJob(qmp: RawQmp, id: string, issue: () => Promise<unknown>, opts: { finalize: boolean }): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const onEvent = (ev: RawQmpEvent): void => {
      if (ev.event !== 'JOB_STATUS_CHANGE' || ev.data?.id !== id) return
      const st = ev.data.status
      if (st === 'ready') qmp.cmd('job-complete', { id }).catch(fail)
      else if (st === 'pending' && opts.finalize) qmp.cmd('job-finalize', { id }).catch(fail)
      else if (st === 'concluded') {
        cleanup()
        resolve()
      }
    }
    const fail = (err: Error): void => {
      cleanup()
      reject(err)
    }
    const cleanup = (): void => {
      qmp.off('event', onEvent)
      qmp.off('close', fail)
    }
    qmp.on('event', onEvent)
    qmp.on('close', fail)
    issue().catch(fail)
  })
  const jobs = (await qmp.cmd('query-jobs')) as Array<{ id: string; error?: string }>
  const error = jobs.find((j) => j.id === id)?.error
  await qmp.cmd('job-dismiss', { id })
  if (error) throw new Error(`QEMU job ${id}: ${error}`)
}

/**
 * Serves one unix-socket connection and writes everything it receives to `file`, then fsyncs it
 * (a save is only done when durable: the same as qmpd's saveRamState). Call listen() before the
 * migrate command; done() resolves with the byte count.
 */
export async function serveToFile(socketPath: string, file: string, opts: { fsync?: boolean } = {}): Promise<{ done: () => Promise<number>; close: () => void }> {
  rmSync(socketPath, { force: true })
  const server = createServer()
  let conn: Socket | undefined
  const received = new Promise<number>((resolve, reject) => {
    server.once('connection', (sock) => {
      conn = sock
      server.close()
      const out = createWriteStream(file, { flags: 'w', mode: 0o600 })
      pipeline(sock, out).then(() => resolve(out.bytesWritten), reject)
    })
  })
  received.catch(() => {})
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(socketPath, () => resolve())
  })
  return {
    done: async () => {
      const bytes = await received
      if (opts.fsync === false) return bytes
      const fh = await open(file, 'r+')
      try {
        await fh.sync()
      } finally {
        await fh.close()
      }
      return bytes
    },
    close: () => {
      conn?.destroy()
      server.close()
      rmSync(socketPath, { force: true })
    },
  }
}

/** Connects to a unix socket QEMU listens on (migrate-incoming) and streams `file` into it. */
export async function feedFile(socketPath: string, file: string): Promise<{ sent: Promise<void>; sock: Socket }> {
  const sock = await new Promise<Socket>((resolve, reject) => {
    const s = connect(socketPath, () => resolve(s))
    s.once('error', reject)
  })
  // QEMU decides when the stream is complete (MIGRATION completed) and may close its end before
  // reading the last bytes of the file: a broken pipe or premature close then is not a failure.
  const sent = pipeline(createReadStream(file), sock).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE' && err.code !== 'ECONNRESET' && err.code !== 'ERR_STREAM_PREMATURE_CLOSE') throw err
  })
  return { sent, sock }
}

/** Removes a file or directory tree, ignoring absence. */
export async function rmrf(path: string): Promise<void> {
  await rm(path, { recursive: true, force: true })
}

/** cont, retrying "Migration is not finalized yet" briefly (QEMU finishes a migration in a bottom half). */
export async function rawCont(qmp: RawQmp): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await qmp.cmd('cont')
      return
    } catch (err) {
      if (i < 50 && /not finalized/i.test((err as Error).message)) {
        await new Promise((r) => setTimeout(r, 10))
        continue
      }
      throw err
    }
  }
}
