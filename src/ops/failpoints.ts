// Fail points: named places at every step boundary of every journaled operation where a crash
// test can make the daemon die (or kill the VM's QEMU). Armed only through the environment of a
// daemon a test starts; never reachable over HTTP. Must not hold any operation logic.
import { appendFileSync } from 'node:fs'
import { waitForExit } from '../vm/proc.ts'

/** What an armed fail point does. */
export type FailAction = 'kill-daemon' | 'kill-qemu'

/** The environment a crash test sets on the daemon it starts. */
export const FAILPOINT_ENV = {
  /**
   * The one fail point to arm, e.g. `snapshot-create.transaction.after`; `NAME#N` arms its N-th
   * pass (a step that runs once per disk passes the same point once per disk).
   */
  point: 'QMPD_FAILPOINT',
  /** kill-daemon (default: SIGKILL the daemon itself) or kill-qemu (SIGKILL the VM's QEMU, go on). */
  action: 'QMPD_FAILPOINT_ACTION',
  /** A file every fail point passed is appended to, one a line: `NAME`, then `NAME#2`, `NAME#3`… */
  trace: 'QMPD_FAILPOINT_TRACE',
} as const

/** How often each point was passed in this process (only counted while fail points are in use). */
const passes = new Map<string, number>()

/** What the point knows about the VM, for kill-qemu. */
export interface FailContext {
  qemuPid?: number | undefined
}

/**
 * Passes a fail point. Does nothing unless the daemon was started with QMPD_FAILPOINT naming
 * this point (or QMPD_FAILPOINT_TRACE set). kill-daemon never returns: the process SIGKILLs
 * itself, exactly as `kill -9` would, with no cleanup and no flush of anything not yet written.
 * kill-qemu SIGKILLs the VM's QEMU and waits until it is gone, then the operation goes on and
 * meets the dead QEMU at its next step.
 */
export async function failPoint(name: string, ctx: FailContext = {}): Promise<void> {
  const env = process.env
  const trace = env[FAILPOINT_ENV.trace]
  const armed = env[FAILPOINT_ENV.point]
  if (!trace && !armed) return
  const n = (passes.get(name) ?? 0) + 1
  passes.set(name, n)
  const here = n === 1 ? name : `${name}#${n}`
  if (trace) appendFileSync(trace, `${here}\n`)
  if (armed !== here) return
  const action = (env[FAILPOINT_ENV.action] ?? 'kill-daemon') as FailAction
  if (action === 'kill-qemu') {
    if (ctx.qemuPid === undefined) return
    try {
      process.kill(ctx.qemuPid, 'SIGKILL')
    } catch {
      return
    }
    // Gone means not in /proc any more or a zombie (PID 1 reaps orphans late on these machines).
    await waitForExit(ctx.qemuPid, 5000)
    return
  }
  process.kill(process.pid, 'SIGKILL')
  // SIGKILL is delivered before kill() returns to a single-threaded caller; never go on.
  await new Promise(() => {})
}
