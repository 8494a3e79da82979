// Finds and ends QEMUs a crashed daemon launched but never recorded; touches no store row.
import { readFileSync, readdirSync, readlinkSync, realpathSync } from 'node:fs'
import { join } from 'node:path'
import type { Logger } from 'pino'
import { QmpClient } from '../qmp/index.ts'
import { VM_FILES } from './argv.ts'
import { isAlive, procInfo, waitForExit } from './proc.ts'
import { shortSocketPath } from './sockpath.ts'

/** How long a stray QEMU gets to exit after `quit` (it runs no guest: -S) before SIGKILL. */
const STRAY_QUIT_TIMEOUT_MS = 3_000
/** How long the QMP connect to a stray may take; one that does not answer is killed. */
const STRAY_CONNECT_TIMEOUT_MS = 2_000
/** How long a SIGKILLed QEMU may take to disappear (closing its images, unmapping its RAM). */
const STRAY_KILL_TIMEOUT_MS = 10_000

/** A stray QEMU that endStrayQemus ended, and how. */
export interface EndedStray {
  pid: number
  how: 'quit' | 'SIGKILL'
}

/**
 * The live qemu-system processes running in `vmDir`: the PID in its qemu.pid (QEMU writes it
 * once it is up) and every qemu-system process whose cwd is the directory (qmpd launches QEMU
 * there; this finds one that died before writing the pid file, or whose pid file was replaced).
 * The cwd check also keeps a PID reused by another program out.
 */
export function findQemusIn(vmDir: string): number[] {
  let real: string
  try {
    real = realpathSync(vmDir)
  } catch {
    return [] // no directory, no QEMU launched in it
  }
  const found = new Set<number>()
  const isQemuHere = (pid: number): boolean => {
    try {
      if (readlinkSync(`/proc/${pid}/cwd`) !== real) return false
      const argv0 = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0] ?? ''
      return argv0.includes('qemu-system') && isAlive(pid)
    } catch {
      return false // gone while we looked, or not ours to inspect
    }
  }
  try {
    const pid = Number(readFileSync(join(real, VM_FILES.pidfile), 'utf8').trim())
    if (Number.isInteger(pid) && pid > 0 && isQemuHere(pid)) found.add(pid)
  } catch {
    // no pid file: QEMU died before writing it, or was never started
  }
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    const pid = Number(entry)
    if (pid !== process.pid && !found.has(pid) && isQemuHere(pid)) found.add(pid)
  }
  return [...found]
}

/**
 * Ends every QEMU found running in `vmDir` (findQemusIn): `quit` over its qmp.sock when it
 * answers, else SIGKILL, and waits until each is gone, so its images are free again. Such a QEMU
 * was launched by a job that a daemon crash interrupted before its PID was recorded; it started
 * with -S, so no guest ran in it (unless a RAM state load had begun, which nothing can resume).
 * Call it only for a VM no recorded, live QEMU belongs to: re-attach does, for a VM whose store
 * state is 'starting' or whose recorded QEMU is gone, and so may the recovery of an operation.
 */
export async function endStrayQemus(vmDir: string, log: Logger): Promise<EndedStray[]> {
  const ended: EndedStray[] = []
  for (const pid of findQemusIn(vmDir)) {
    const startTime = procInfo(pid)?.startTime
    let how: EndedStray['how'] = 'quit'
    if (!(await quitOverQmp(join(vmDir, VM_FILES.qmpSocket), log)) || !(await waitForExit(pid, STRAY_QUIT_TIMEOUT_MS, startTime))) {
      how = 'SIGKILL'
      try {
        process.kill(pid, 'SIGKILL')
      } catch {
        // exited in the meantime
      }
      await waitForExit(pid, STRAY_KILL_TIMEOUT_MS, startTime)
    }
    log.warn({ pid, how, dir: vmDir }, 'ended a QEMU left by an interrupted start (its PID was never recorded)')
    ended.push({ pid, how })
  }
  return ended
}

/** Sends `quit` on a QMP socket; false when nothing answers there. */
async function quitOverQmp(socket: string, log: Logger): Promise<boolean> {
  const qmp = new QmpClient({ logger: log.child({ component: 'qmp' }) })
  const short = shortSocketPath(socket)
  try {
    await qmp.connect({ path: short.path }, { timeoutMs: STRAY_CONNECT_TIMEOUT_MS })
  } catch {
    return false
  } finally {
    short.release()
  }
  // QEMU closes the socket as it goes, which may beat its answer: the exit wait decides.
  await qmp.execute('quit').catch(() => {})
  await qmp.disconnect().catch(() => {})
  return true
}
