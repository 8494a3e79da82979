// qmpd under measurement: the daemon runs inside the bench process (startDaemon + its fastify app),
// requests go through app.inject (fastify's full request pipeline without a socket) or, for the
// TCP case, through node:http over loopback. Every QEMU it spawns is registered with the reaper.
import { createWriteStream, mkdirSync } from 'node:fs'
import { join } from 'node:path'
import type { FastifyInstance } from 'fastify'
import { pino, type Logger } from 'pino'
import { makeConfig } from '../../src/config.ts'
import { startDaemon, type Daemon } from '../../src/daemon.ts'
import { benchQemu } from './qemu-choice.ts'
import { track } from './reaper.ts'

/** An in-process daemon with an inject helper. */
export interface BenchDaemon {
  daemon: Daemon
  app: FastifyInstance
  stateDir: string
  /** fastify.inject; `body` is sent as JSON. */
  api(method: string, url: string, body?: unknown): Promise<{ status: number; body: any }>
  /** POST …?wait=true and returns the finished job; throws unless 200 (a failed job is never timed as a result). */
  op(url: string, body?: unknown): Promise<any>
  /** Registers the QEMU PIDs of the named VMs with the reaper (call after every start/restore/revert). */
  trackVms(...names: string[]): void
  /** Force-stops every VM it still runs, closes the app and the daemon. Idempotent. */
  close(): Promise<void>
}

/** Where the debug log goes, when asked for (--log debug): one file per daemon. */
export function benchLogger(level: string, file: string | undefined): Logger {
  if (level === 'silent' || !file) return pino({ level: 'silent' })
  return pino({ level }, createWriteStream(file, { flags: 'a' }))
}

/**
 * Starts a daemon on `stateDir` on the bench's QEMU and accelerator (benchQemu(): the same for every
 * case and both sides), or on `qemu` for a case that compares two QEMUs in one run.
 */
export async function startBenchDaemon(stateDir: string, log: Logger, qemu?: { binary: string; qemuImg: string }): Promise<BenchDaemon> {
  mkdirSync(stateDir, { recursive: true })
  const q = { ...benchQemu(), ...qemu }
  const config = makeConfig({ stateDir, accel: q.accel, qemuBinary: q.binary, qemuImgBinary: q.qemuImg, logLevel: log.level }, {})
  const daemon = await startDaemon(config, log)
  const app = await daemon.app()
  const names = new Set<string>()
  let closed = false
  const bd: BenchDaemon = {
    daemon,
    app,
    stateDir,
    async api(method, url, body) {
      const res = await app.inject({
        method: method as 'GET',
        url,
        ...(body !== undefined ? { headers: { 'content-type': 'application/json' }, payload: JSON.stringify(body) } : {}),
      })
      const m = /^\/v1\/vms\/([^/?]+)/.exec(url)
      if (m) names.add(decodeURIComponent(m[1]!))
      return { status: res.statusCode, body: res.body ? JSON.parse(res.body) : undefined }
    },
    async op(url, body = {}) {
      const sep = url.includes('?') ? '&' : '?'
      const res = await bd.api('POST', `${url}${sep}wait=true&timeoutSec=600`, body)
      const m = /^\/v1\/vms\/([^/?]+)/.exec(url)
      if (m) bd.trackVms(decodeURIComponent(m[1]!))
      if (res.status !== 200) throw new Error(`POST ${url}: ${res.status} ${JSON.stringify(res.body).slice(0, 2000)}`)
      return res.body
    },
    trackVms(...vms) {
      for (const vm of vms) {
        names.add(vm)
        try {
          track(daemon.vms.record(vm).runtime.pid)
        } catch {
          /* not defined (yet) */
        }
      }
    },
    async close() {
      if (closed) return
      closed = true
      // Every VM has its own job queue: stop them all at once.
      await Promise.all(
        [...names].map(async (vm) => {
          try {
            const rt = daemon.vms.record(vm).runtime
            track(rt.pid)
            if (rt.state === 'running' || rt.state === 'paused') await bd.op(`/v1/vms/${vm}/stop`, { force: true }).catch(() => {})
          } catch {
            /* deleted */
          }
        }),
      )
      await app.close().catch(() => {})
      await daemon.close().catch(() => {})
    },
  }
  return bd
}

/** The VM directory qmpd uses for `vm` (disk images the bench makes go there, inside the allowed root). */
export function vmDir(bd: BenchDaemon, vm: string): string {
  return join(bd.stateDir, 'vms', vm)
}
