// Starts a qmpd daemon inside the test process, on a test directory, and guarantees that every
// QEMU it started is gone when the test ends (killed by PID, never by name).
import { mkdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { FastifyInstance } from 'fastify'
import { pino } from 'pino'
import type { Test } from 'tap'
import { makeConfig, type Config } from '../../src/config.ts'
import { startDaemon, type Daemon } from '../../src/daemon.ts'
import type { Job } from '../../src/jobs/model.ts'
import type { SnapshotTestHooks } from '../../src/snapshot/service.ts'
import type { VmTestHooks } from '../../src/vm/manager.ts'
import { RISKY_QMP_COMMANDS } from '../../src/vm/passthrough.ts'
import { isAlive, waitForExit } from '../../src/vm/proc.ts'
import { contractOf } from './contract.ts'
import { GUEST_COUNTER_ADDR, makeGuestDisk, parseCounters, type GuestCounters } from './guest.ts'

/** A daemon under test with an injected-request helper. */
export interface TestDaemon {
  daemon: Daemon
  app: FastifyInstance
  stateDir: string
  /** Sends a request through fastify.inject; `body` is sent as JSON. A response the OpenAPI document does not declare fails the test. */
  api(method: string, url: string, body?: unknown, headers?: Record<string, string>): Promise<{ status: number; body: any; headers: Record<string, unknown> }>
  /** Closes the daemon (QEMUs keep running, like a daemon restart). */
  close(opts?: { drainTimeoutMs?: number }): Promise<void>
}

const pids = new Set<number>()

// Last resort when a test process ends without its teardowns (a timeout, an uncaught error): QEMU
// runs in its own session and would outlive it. Kill what this process started, by PID.
process.once('exit', () => {
  for (const pid of pids) {
    try {
      if (isAlive(pid)) process.kill(pid, 'SIGKILL')
    } catch {
      /* gone */
    }
  }
})

/** Kills (SIGKILL, by PID) every QEMU a test daemon ever reported, and waits until each is gone. */
export async function reapQemus(): Promise<void> {
  for (const pid of pids) {
    if (isAlive(pid)) {
      try {
        process.kill(pid, 'SIGKILL')
      } catch {
        /* already gone */
      }
      await waitForExit(pid, 5000)
    }
    pids.delete(pid)
  }
}

/** Starts a daemon on `stateDir` (default: a fresh t.testdir()); registers teardown. */
export async function startTestDaemon(
  t: Test,
  opts: { stateDir?: string; config?: Partial<Config>; token?: string; hooks?: { snapshots?: SnapshotTestHooks; vms?: VmTestHooks } } = {},
): Promise<TestDaemon> {
  const stateDir = opts.stateDir ?? t.testdir()
  // Tests read guest RAM and drive QEMU through the escape hatch (pmemsave, migrate, NBD…): it is
  // on with everything allowed unless a test's config says otherwise.
  const config = makeConfig({ stateDir, accel: 'tcg', qmpPassthrough: true, qmpAllow: ['*', ...RISKY_QMP_COMMANDS], ...opts.config }, {})
  const log = pino({ level: process.env['QMPD_TEST_LOG'] ?? 'silent' })
  const daemon = await startDaemon(config, log, opts.hooks ?? {})
  const app = await daemon.app(opts.token ? { token: opts.token } : {})
  let closed = false
  const td: TestDaemon = {
    daemon,
    app,
    stateDir,
    async api(method, url, body, headers = {}) {
      const res = await app.inject({
        method: method as 'GET',
        url,
        headers: { ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...headers },
        ...(body !== undefined ? { payload: JSON.stringify(body) } : {}),
      })
      // Every response a test receives is checked against the API's own document (test/helpers/contract.ts).
      const verdict = contractOf(app).check(method, url, res.statusCode, res.headers['content-type'] as string | undefined, res.body)
      if (verdict.problem) t.fail(`response breaks the OpenAPI contract: ${verdict.problem}`)
      const parsed = res.body ? JSON.parse(res.body) : undefined
      for (const vm of (parsed?.vms ?? [parsed]) as Array<{ pid?: number } | undefined>) if (vm?.pid) pids.add(vm.pid)
      if (parsed?.result?.pid) pids.add(parsed.result.pid)
      return { status: res.statusCode, body: parsed, headers: res.headers }
    },
    async close(opts) {
      if (closed) return
      closed = true
      for (const vm of await daemon.vms.list()) if (vm.pid) pids.add(vm.pid)
      await app.close()
      await daemon.close(opts)
    },
  }
  t.teardown(async () => {
    await td.close()
    await reapQemus()
  })
  return td
}

/** Defines a VM running the counting boot-sector guest on `disks` fresh qcow2 disks (the first boots). */
export async function defineGuestVm(
  td: TestDaemon,
  name: string,
  opts: { disks?: number; memoryMiB?: number; stampMiB?: number; format?: 'qcow2' | 'raw'; machine?: 'q35' | 'pc'; bus?: 'virtio' | 'ide' } = {},
): Promise<any> {
  const dir = join(td.stateDir, 'vms', name)
  const format = opts.format ?? 'qcow2'
  const disks = []
  await mkdir(dir, { recursive: true })
  for (let i = 0; i < (opts.disks ?? 1); i++) {
    const file = join(dir, `disk${i}.${format}`)
    await makeGuestDisk(file, { format, sizeMiB: 16, boot: i === 0, stampMiB: opts.stampMiB ?? 0 })
    disks.push({ id: `vd${String.fromCharCode(97 + i)}`, file, format, bus: opts.bus ?? 'virtio' })
  }
  const res = await td.api('POST', '/v1/vms', { name, memoryMiB: opts.memoryMiB ?? 32, machine: opts.machine ?? 'q35', disks })
  if (res.status !== 201) throw new Error(`define ${name}: ${res.status} ${JSON.stringify(res.body)}`)
  return res.body
}

/** Runs an operation with ?wait=true and returns the finished job (throws on a non-2xx answer). */
export async function op(td: TestDaemon, vm: string, action: string, body: unknown = {}): Promise<Job> {
  const res = await td.api('POST', `/v1/vms/${vm}/${action}?wait=true&timeoutSec=120`, body)
  if (res.status !== 200) throw new Error(`${action} ${vm}: ${res.status} ${JSON.stringify(res.body)}`)
  return res.body as Job
}

/** Reads the guest's counters from its RAM with pmemsave (through the QMP escape hatch). */
export async function guestCounters(td: TestDaemon, vm: string): Promise<GuestCounters> {
  await mkdir(join(td.stateDir, 'vms', vm), { recursive: true })
  const file = join(td.stateDir, 'vms', vm, `pmem-${Date.now()}-${Math.random().toString(36).slice(2)}.bin`)
  const res = await td.api('POST', `/v1/vms/${vm}/qmp`, { execute: 'pmemsave', arguments: { val: GUEST_COUNTER_ADDR, size: 16, filename: file } })
  if (res.status !== 200) throw new Error(`pmemsave: ${res.status} ${JSON.stringify(res.body)}`)
  return parseCounters(await readFile(file))
}

/** Polls until `check` returns true or the time runs out; returns whether it became true. */
export async function eventually(check: () => Promise<boolean> | boolean, timeoutMs = 10_000, everyMs = 50): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await check()) return true
    if (Date.now() > deadline) return false
    await new Promise((r) => setTimeout(r, everyMs))
  }
}
