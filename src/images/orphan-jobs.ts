// qemu-img processes a dead daemon left behind. qemu-img runs as the daemon's child without a
// session of its own, and a SIGKILLed parent takes none of its children with it: an offline
// commit, rebase or convert goes on writing after the daemon died. Recovery ends them before it
// looks at (or writes) the images they hold.
import { readdirSync, readFileSync } from 'node:fs'
import { basename } from 'node:path'
import { isAlive, waitForExit } from '../vm/proc.ts'

/**
 * SIGKILLs every qemu-img process whose arguments name one of `files` (or a file under `dir`), and
 * waits until each is gone. Returns the PIDs it ended. Only processes of this user are touched
 * (others cannot be signalled anyway).
 */
export async function endQemuImgOn(files: string[], dir?: string): Promise<number[]> {
  const names = new Set(files)
  const ended: number[] = []
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue
    let argv: string[]
    try {
      argv = readFileSync(`/proc/${e}/cmdline`, 'utf8').split('\0').filter(Boolean)
    } catch {
      continue
    }
    if (!argv[0] || basename(argv[0]) !== 'qemu-img') continue
    const touches = argv.some((a) => names.has(a) || (dir !== undefined && a.startsWith(`${dir}/`)))
    if (!touches || !isAlive(Number(e))) continue
    try {
      process.kill(Number(e), 'SIGKILL')
    } catch {
      continue
    }
    await waitForExit(Number(e), 5000)
    ended.push(Number(e))
  }
  return ended
}
