// File names and reservations for snapshot files (O_EXCL, unique names); never overwrites a file.
import { closeSync, existsSync, open as fsOpen, rmSync } from 'node:fs'
import { stat } from 'node:fs/promises'
import { join } from 'node:path'
import { QmpdError } from '../errors.ts'
import type { QmpClient } from '../qmp/index.ts'
import { isAlive } from '../vm/proc.ts'
import type { SnapshotDeps } from './deps.ts'
import type { Snapshot } from './model.ts'

/** Creates an empty file, failing if it exists: claims a name before QEMU or qemu-img writes it. */
export async function reserveFile(file: string): Promise<void> {
  // One thread-pool round trip (the open creates the file); closing an empty file's fd is cheap.
  const fd = await new Promise<number>((resolve, reject) => fsOpen(file, 'wx', 0o600, (err, fd) => (err ? reject(err) : resolve(fd)))).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'EEXIST') throw new QmpdError('FILE_EXISTS', `${file} exists; qmpd never overwrites a file`, { file })
    throw new QmpdError('INVALID_PATH', `cannot create ${file}: ${err.message}`, { file })
  })
  closeSync(fd)
}

/** Reserves several files at once; each one created gets its removal in `r`, then the first failure is thrown. */
export async function reserveFiles(files: string[], r: { add(what: string, fn: () => unknown): void }): Promise<void> {
  const results = await Promise.allSettled(files.map(reserveFile))
  results.forEach((res, i) => {
    if (res.status === 'fulfilled') r.add(`remove ${files[i]}`, () => rmSync(files[i]!, { force: true }))
  })
  const failed = results.find((res) => res.status === 'rejected')
  if (failed) throw failed.reason
}

/** The first `<dir>/<stem><n><ext>` that does not exist (n from 1). */
export function uniqueFile(dir: string, stem: string, ext: string, taken: string[] = []): string {
  for (let i = 1; ; i++) {
    const f = join(dir, `${stem}${i}${ext}`)
    if (!existsSync(f) && !taken.includes(f)) return f
  }
}

/** Bytes on disk of what only an external snapshot holds: the images it froze and its RAM state. */
export async function externalBytes(s: Snapshot): Promise<number> {
  const files = s.disks.filter((d) => d.mode === 'external').map((d) => d.file)
  if (s.vmstateFile) files.push(s.vmstateFile)
  let size = 0
  for (const bytes of await Promise.all(files.map(fileBytes))) size += bytes
  return size
}

/** Bytes allocated to a file (0 when it is missing); stat runs off the event loop. */
export async function fileBytes(file: string): Promise<number> {
  try {
    return (await stat(file)).blocks * 512
  } catch {
    return 0
  }
}

/** The QEMU version of a session, as recorded with RAM state ("unknown" without a greeting). */
export function versionOf(qmp: QmpClient): string {
  const v = qmp.greeting?.version.qemu
  return v ? `${v.major}.${v.minor}.${v.micro}` : 'unknown'
}

/**
 * True when the VM's QEMU is gone (killed, crashed): an undo then works on the files offline,
 * since nothing holds the images any more. Read from /proc, not from the VM's recorded state,
 * which the exit handler may not have updated yet.
 */
export function qemuGone(d: SnapshotDeps, vm: string): boolean {
  const rt = d.vms.record(vm).runtime
  return !rt.pid || !isAlive(rt.pid, rt.pidStartTime)
}
