// Every QEMU the bench starts (raw ones and the ones qmpd spawns for it) is registered here by PID
// and killed by PID when its case ends, also on failure and on SIGINT/SIGTERM. Nothing is ever
// killed by name.
import { isAlive, procInfo, waitForExit } from '../../src/vm/proc.ts'

const pids = new Map<number, string | undefined>()

/** Registers a QEMU process the bench is responsible for (with its /proc start time when known). */
export function track(pid: number | undefined): void {
  if (!pid || pids.has(pid)) return
  pids.set(pid, procInfo(pid)?.startTime)
}

/** How many tracked processes still run. */
export function aliveCount(): number {
  let n = 0
  for (const [pid, start] of pids) if (isAlive(pid, start)) n++
  return n
}

/** SIGKILLs every tracked process that still runs and waits until each is gone. */
export async function reapAll(): Promise<number> {
  let killed = 0
  for (const [pid, start] of pids) {
    if (isAlive(pid, start)) {
      try {
        process.kill(pid, 'SIGKILL')
        killed++
      } catch {
        /* gone meanwhile */
      }
      await waitForExit(pid, 5000, start)
    }
    pids.delete(pid)
  }
  return killed
}

/** Synchronous last resort for process exit paths: SIGKILL every tracked PID that still runs. */
export function killAllSync(): void {
  for (const [pid, start] of pids) {
    if (!isAlive(pid, start)) continue
    try {
      process.kill(pid, 'SIGKILL')
    } catch {
      /* gone */
    }
  }
}

const syncCleanups: Array<() => void> = []

/** Registers a synchronous cleanup (e.g. removing the work directory) for the exit paths. */
export function onExitSync(fn: () => void): void {
  syncCleanups.push(fn)
}

function exitCleanup(): void {
  killAllSync()
  for (const fn of syncCleanups.splice(0)) {
    try {
      fn()
    } catch {
      /* best effort */
    }
  }
}

let installed = false
/** Kills tracked QEMUs when the bench is interrupted or exits without cleaning up. */
export function installExitHandlers(): void {
  if (installed) return
  installed = true
  process.on('exit', exitCleanup)
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => {
      process.stderr.write(`\n${sig}: killing the bench's QEMU processes and removing its work directory\n`)
      exitCleanup()
      process.exit(130)
    })
  }
}
