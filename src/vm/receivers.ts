// The RAM-state receiver processes (src/state/receiver.mjs) of one VM directory, found from
// /proc: a receiver outlives a dead daemon, and the next one waits for it, or ends it.
import { readdirSync, readFileSync, readlinkSync } from 'node:fs'
import { isAlive, waitForExit } from './proc.ts'

/** The file name every receiver process runs; how /proc tells one from any other process. */
export const RECEIVER_SCRIPT = 'receiver.mjs'

/** PIDs of live receiver processes whose cwd is `dir`. */
export function receiversIn(dir: string): number[] {
  const out: number[] = []
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue
    try {
      const argv = readFileSync(`/proc/${e}/cmdline`, 'utf8').split('\0')
      if (!argv.some((a) => a.endsWith(`/${RECEIVER_SCRIPT}`))) continue
      if (readlinkSync(`/proc/${e}/cwd`) === dir && isAlive(Number(e))) out.push(Number(e))
    } catch {
      // gone meanwhile
    }
  }
  return out
}

/**
 * Waits (at most timeoutMs) until the VM directory's receivers have exited: each ends by itself
 * once QEMU's stream to it has ended. Returns the PIDs still alive then.
 */
export async function waitForReceivers(dir: string, timeoutMs: number): Promise<number[]> {
  const deadline = Date.now() + timeoutMs
  for (const pid of receiversIn(dir)) await waitForExit(pid, Math.max(0, deadline - Date.now()))
  return receiversIn(dir)
}

/** SIGKILLs the VM directory's receivers (one left waiting for a stream that never came). */
export async function endReceivers(dir: string): Promise<number[]> {
  const pids = receiversIn(dir)
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL')
    } catch {
      /* gone */
    }
    await waitForExit(pid, 5000)
  }
  return pids
}
