// Reads the QEMU binary's version (`qemu-system-x86_64 --version`, execFile, no shell) for the
// start-up log; it runs nothing else and never throws.
import { execFile } from 'node:child_process'

/** The first line of `<binary> --version` ("QEMU emulator version 7.2.x …"), or the error that prevented it. */
export function qemuVersion(binary: string, timeoutMs = 5000): Promise<{ version?: string; error?: string }> {
  return new Promise((resolve) => {
    execFile(binary, ['--version'], { timeout: timeoutMs, maxBuffer: 64 * 1024 }, (err, stdout) => {
      if (err) return resolve({ error: err.message })
      const line = stdout.split('\n')[0]?.trim()
      resolve(line ? { version: line } : { error: 'no output' })
    })
  })
}
