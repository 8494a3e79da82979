// The parent side of bench/lib/sidecar.mjs: spawn, send a command, read its one-line answer.
import { spawn, type ChildProcess } from 'node:child_process'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { track } from './reaper.ts'

export interface Sidecar {
  pid: number
  ask<T>(msg: Record<string, unknown>): Promise<T>
  close(): Promise<void>
}

/** Starts a sidecar process at nice 0 (the bench's own priority). */
export function startSidecar(): Sidecar {
  const child: ChildProcess = spawn(process.execPath, [join(import.meta.dirname, 'sidecar.mjs')], { stdio: ['pipe', 'pipe', 'inherit'] })
  track(child.pid)
  const lines = createInterface({ input: child.stdout! })
  const waiting: Array<(line: string) => void> = []
  lines.on('line', (l) => waiting.shift()?.(l))
  const exited = new Promise<void>((r) => child.once('exit', () => r()))
  return {
    pid: child.pid!,
    ask<T>(msg: Record<string, unknown>): Promise<T> {
      return new Promise<T>((resolve, reject) => {
        waiting.push((l) => resolve(JSON.parse(l) as T))
        child.stdin!.write(JSON.stringify(msg) + '\n', (err) => err && reject(err))
      })
    },
    async close() {
      child.stdin!.end(JSON.stringify({ cmd: 'exit' }) + '\n')
      const t = setTimeout(() => child.kill('SIGKILL'), 3000)
      await exited
      clearTimeout(t)
    },
  }
}
