// Reads a QEMU binary's version (`<binary> --version`, execFile, no shell), once per binary per
// process: the start-up log, the KVM probe and GET /v1/host share the answer. Never throws.
import { execFile } from 'node:child_process'

/** The first line of `--version` ("QEMU emulator version 7.2.x …") and its x.y.z, or why it could not be read. */
export type QemuVersion = { line: string; version: string; error?: undefined } | { line?: undefined; version?: undefined; error: string }

const known = new Map<string, Promise<QemuVersion>>()

/** `binary --version`, read once per binary; a failure is not kept (the next call tries again). */
export function qemuVersion(binary: string, timeoutMs = 10_000): Promise<QemuVersion> {
  let p = known.get(binary)
  if (!p) {
    p = new Promise<QemuVersion>((resolve) => {
      execFile(binary, ['--version'], { timeout: timeoutMs, maxBuffer: 64 * 1024 }, (err, stdout) => {
        if (err) return resolve({ error: err.message })
        const line = stdout.split('\n')[0]?.trim()
        if (!line) return resolve({ error: 'no output' })
        resolve({ line, version: /version (\d+\.\d+\.\d+)/.exec(line)?.[1] ?? line })
      })
    })
    known.set(binary, p)
    void p.then((v) => {
      if (v.error !== undefined) known.delete(binary)
    })
  }
  return p
}
