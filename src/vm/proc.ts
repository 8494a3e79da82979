// Process facts from /proc (alive, zombie, start time, exit status); signals nothing.
import { readFileSync, readdirSync, readlinkSync, realpathSync } from 'node:fs'
import { constants } from 'node:os'

/** What /proc says about a process. */
export interface ProcInfo {
  /** One-letter state from /proc/PID/stat: R, S, D, Z (zombie), T… */
  state: string
  /** Start time in clock ticks since boot: with the PID, identifies one process for its whole life. */
  startTime: string
  /** For a zombie: how it ended, decoded from the waitpid status in field 52. */
  exit?: { code: number | null; signal: string | null }
}

/**
 * Reads /proc/PID/stat. Returns undefined when the process does not exist. A zombie (state Z) has
 * exited: on these machines PID 1 reaps orphans only about once a second, so kill(pid, 0) would
 * wrongly say it lives.
 */
export function procInfo(pid: number): ProcInfo | undefined {
  let text: string
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'latin1')
  } catch {
    return undefined
  }
  // comm (field 2) is in parentheses and may itself contain spaces or ')': split after the last ')'.
  const rest = text.slice(text.lastIndexOf(')') + 2).trim().split(' ')
  const state = rest[0] ?? '?'
  const startTime = rest[19] ?? '0' // field 22
  const info: ProcInfo = { state, startTime }
  if (state === 'Z' || state === 'X') {
    const status = Number(rest[49]) // field 52, exit_code, Linux >= 3.5
    if (Number.isFinite(status)) info.exit = decodeWaitStatus(status)
  }
  return info
}

/** True when the process exists, is not a zombie and (when given) started at `startTime`. */
export function isAlive(pid: number, startTime?: string): boolean {
  const info = procInfo(pid)
  if (!info || info.state === 'Z' || info.state === 'X') return false
  return startTime === undefined || info.startTime === startTime
}

/** Decodes a waitpid(2) status word. */
export function decodeWaitStatus(status: number): { code: number | null; signal: string | null } {
  const sig = status & 0x7f
  if (sig === 0) return { code: (status >> 8) & 0xff, signal: null }
  const name = Object.entries(constants.signals).find(([, n]) => n === sig)?.[0] ?? `SIG${sig}`
  return { code: null, signal: name }
}

/** Finds the PID of a QEMU whose command line mentions `needle` (used to adopt by QMP socket path). */
export function findQemuByArg(needle: string): number | undefined {
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const argv = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0')
      if (argv[0]?.includes('qemu-system') && argv.some((a) => a.includes(needle))) return Number(entry)
    } catch {
      // the process went away while we looked
    }
  }
  return undefined
}

/** Resolves once the process is gone or a zombie, or returns false after timeoutMs. */
export async function waitForExit(pid: number, timeoutMs: number, startTime?: string): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  while (isAlive(pid, startTime)) {
    if (Date.now() >= deadline) return false
    await new Promise((r) => setTimeout(r, 20))
  }
  return true
}

/**
 * PIDs of the live (not zombie) qemu-system processes whose working directory is `dir`: qmpd
 * launches each QEMU with its VM directory as cwd, so this finds a VM's QEMU whatever the store
 * says. Processes of other users whose cwd cannot be read are skipped.
 */
export function qemuPidsWithCwd(dir: string): number[] {
  const out: number[] = []
  let want: string
  try {
    want = realpathSync.native(dir) // the kernel reports the cwd with symlinks resolved
  } catch {
    return out // no directory, no process in it
  }
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      if (readlinkSync(`/proc/${entry}/cwd`) !== want) continue
      const argv0 = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0')[0] ?? ''
      if (argv0.includes('qemu-system') && isAlive(Number(entry))) out.push(Number(entry))
    } catch {
      // gone while we looked, or not ours to read
    }
  }
  return out
}
