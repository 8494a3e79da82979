// Crash tests: a `qmpd serve` child process armed with one fail point (it SIGKILLs itself there,
// or kills the VM's QEMU), then a fresh daemon on the same state directory, judged from outside.
import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import { FAILPOINT_ENV, type FailAction } from '../../src/ops/failpoints.ts'
import { isAlive, waitForExit } from '../../src/vm/proc.ts'
import type { TestDaemon } from './daemon.ts'
import { RISKY_QMP_COMMANDS } from '../../src/vm/passthrough.ts'
import { checkDiskAgainstCounter, checkStampsAgainstCounter } from './guest.ts'
import { qmpdServeCommand } from './qmpd-cmd.ts'
import { diskBytes, dumpRam, slotsOf, stampsOf } from './snap.ts'

/** A `qmpd serve` child on a unix socket. */
export interface ChildDaemon {
  child: ChildProcess
  /** One request; `body` as JSON, `headers` added. Rejects when the daemon dies before answering. */
  api(method: string, path: string, body?: unknown, headers?: Record<string, string>): Promise<{ status: number; body: any }>
  /** Resolves with how the process ended, or undefined if it still runs after timeoutMs. */
  ended(timeoutMs: number): Promise<{ code: number | null; signal: string | null } | undefined>
  logs(): string
}

/** Starts `qmpd serve` on stateDir, armed with `point` (or tracing every point into `trace`). */
export async function startChildDaemon(
  t: Test,
  stateDir: string,
  opts: { point?: string; action?: FailAction; trace?: string } = {},
): Promise<ChildDaemon> {
  const sockDir = mkdtempSync(join(tmpdir(), 'qmpd-crash-'))
  const sock = join(sockDir, 'api.sock')
  const env: NodeJS.ProcessEnv = { ...process.env }
  delete env[FAILPOINT_ENV.point]
  if (opts.point) env[FAILPOINT_ENV.point] = opts.point
  if (opts.action) env[FAILPOINT_ENV.action] = opts.action
  if (opts.trace) env[FAILPOINT_ENV.trace] = opts.trace
  // Scenarios read guest RAM through the escape hatch (pmemsave), as with startTestDaemon.
  env['QMPD_QMP_PASSTHROUGH'] = '1'
  env['QMPD_QMP_ALLOW'] = ['*', ...RISKY_QMP_COMMANDS].join(',')
  const [exe, argv, childEnv] = qmpdServeCommand(['serve', '--listen', `unix:${sock}`, '--state-dir', stateDir, '--accel', 'tcg', '--log-level', 'warn'], env)
  const child = spawn(exe, argv, {
    env: childEnv,
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let out = ''
  child.stdout.on('data', (d) => (out += d))
  child.stderr.on('data', (d) => (out += d))
  const exit = new Promise<{ code: number | null; signal: string | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })))
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL')
      await exit
    }
    rmSync(sockDir, { recursive: true, force: true })
  })
  const deadline = Date.now() + 30_000
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`qmpd exited at start: ${out}`)
    if (Date.now() > deadline) throw new Error(`qmpd did not start: ${out}`)
    if (await ping(sock)) break
    await new Promise((r) => setTimeout(r, 50))
  }
  return {
    child,
    api: (method, path, body, headers) => http(sock, method, path, body, headers),
    async ended(timeoutMs) {
      let timer: NodeJS.Timeout | undefined
      const r = await Promise.race([exit, new Promise<undefined>((res) => (timer = setTimeout(() => res(undefined), timeoutMs)))])
      clearTimeout(timer)
      return r
    },
    logs: () => out,
  }
}

async function ping(sock: string): Promise<boolean> {
  try {
    return (await http(sock, 'GET', '/healthz')).status === 200
  } catch {
    return false
  }
}

function http(socketPath: string, method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<{ status: number; body: any }> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body)
    const req = request({ socketPath, method, path, headers: { ...(payload ? { 'content-type': 'application/json' } : {}), ...headers } }, (res) => {
      let text = ''
      res.on('data', (d) => (text += d))
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text ? JSON.parse(text) : undefined }))
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end(payload)
  })
}

/** QEMU processes (not zombies) whose cwd lies under `dir`. */
export function qemusUnder(dir: string): number[] {
  return processesUnder(dir, 'qemu-system')
}

/** Live processes whose command line contains `needle` and whose cwd lies under `dir`. */
function processesUnder(dir: string, needle: string): number[] {
  const out: number[] = []
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue
    try {
      if (!readFileSync(`/proc/${e}/cmdline`, 'utf8').includes(needle)) continue
      const cwd = readlinkSync(`/proc/${e}/cwd`)
      if ((cwd === dir || cwd.startsWith(`${dir}/`)) && isAlive(Number(e))) out.push(Number(e))
    } catch {
      // gone meanwhile
    }
  }
  return out
}

/** Kills, by PID, every QEMU (and RAM-state receiver) running under `dir` (the test's own state directory). */
export async function reapQemusUnder(dir: string): Promise<void> {
  for (const pid of [...qemusUnder(dir), ...processesUnder(dir, 'receiver.mjs')]) {
    try {
      process.kill(pid, 'SIGKILL')
    } catch {
      /* gone */
    }
    await waitForExit(pid, 5000)
  }
}

/** What a snapshot held when it was taken: the guest-visible bytes of each disk it captured. */
export interface SnapRef {
  name: string
  memory: boolean
  disks: Map<string, Buffer>
}

/** The bytes every snapshot of the VM holds now, read from outside with qemu-img. */
export async function snapshotRefs(td: TestDaemon, vm: string): Promise<SnapRef[]> {
  const list = (await td.api('GET', `/v1/vms/${vm}/snapshots`)).body.snapshots as Array<{ name: string; memory: boolean; disks: Array<{ id: string; mode: string; file: string }> }>
  const out: SnapRef[] = []
  for (const s of list) {
    const disks = new Map<string, Buffer>()
    for (const d of s.disks) {
      if (d.mode === 'internal') disks.set(d.id, await diskBytes(d.file, { internal: s.name }))
      else if (d.mode === 'external') disks.set(d.id, await diskBytes(d.file))
    }
    out.push({ name: s.name, memory: s.memory, disks })
  }
  return out
}

/** The bytes the VM's disks hold now (its active layers). */
export async function activeBytes(td: TestDaemon, vm: string): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>()
  for (const d of td.daemon.vms.record(vm).runtime.disks) out.set(d.id, await diskBytes(d.file))
  return out
}

/**
 * Reverts to a snapshot (paused when it has RAM) and proves from outside that the VM's disks
 * read exactly what the snapshot held, and that RAM comes from that same instant: every stamped
 * page and every disk slot agree with the restored counter. Returns the problems found.
 */
export async function revertExact(td: TestDaemon, vm: string, ref: SnapRef): Promise<string[]> {
  const problems: string[] = []
  const res = await td.api('POST', `/v1/vms/${vm}/snapshots/${ref.name}/revert?wait=true&timeoutSec=120`, ref.memory ? { state: 'paused' } : { state: 'shutoff' })
  if (res.status !== 200) return [`revert ${ref.name}: ${res.status} ${JSON.stringify(res.body)}`]
  const now = await activeBytes(td, vm)
  for (const [id, bytes] of ref.disks) {
    if (!now.get(id)?.equals(bytes)) problems.push(`after revert ${ref.name}: disk ${id} differs from what the snapshot held`)
  }
  if (ref.memory) {
    const ram = await dumpRam(td, vm)
    const { counter, pending } = ram.counters
    problems.push(...checkStampsAgainstCounter(stampsOf(ram), counter, pending).map((p) => `after revert ${ref.name}: RAM ${p}`))
    let i = 0
    for (const d of td.daemon.vms.record(vm).runtime.disks) {
      if (ref.disks.has(d.id)) problems.push(...checkDiskAgainstCounter(slotsOf(now.get(d.id)!), counter, pending, i).map((p) => `after revert ${ref.name}: disk ${d.id} vs RAM: ${p}`))
      i++
    }
  }
  return problems
}
