// Reads and durably writes a VM's backup manifest (<vm dir>/backups.json); knows nothing of QEMU.
import { closeSync, existsSync, fsyncSync, openSync, readFileSync, renameSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { QmpdError } from '../errors.ts'
import { Manifest, type BackupChain } from './model.ts'

/** The manifest file of a VM directory. */
export function manifestPath(vmDir: string): string {
  return join(vmDir, 'backups.json')
}

/**
 * The VM's backup chains (none when the file does not exist yet).
 * @throws QmpdError STORE_ROW_INVALID when the file exists but does not parse as a manifest.
 */
export function readManifest(vmDir: string): Manifest {
  const file = manifestPath(vmDir)
  if (!existsSync(file)) return { chains: [] }
  const parsed = Manifest.safeParse(JSON.parse(readFileSync(file, 'utf8')))
  if (!parsed.success) throw new QmpdError('STORE_ROW_INVALID', `${file} is not a backup manifest: ${parsed.error.message}`, { file })
  return parsed.data
}

/**
 * Writes the manifest whole: temp file, fsync, rename, fsync the directory (CONVENTIONS 12), so
 * after a crash it is either the old or the new one.
 */
export function writeManifest(vmDir: string, m: Manifest): void {
  const file = manifestPath(vmDir)
  const tmp = `${file}.tmp-${process.pid}`
  writeFileSync(tmp, JSON.stringify(Manifest.parse(m), null, 1) + '\n', { mode: 0o640 })
  const fd = openSync(tmp, 'r')
  try {
    fsyncSync(fd)
  } finally {
    closeSync(fd)
  }
  renameSync(tmp, file)
  const dfd = openSync(dirname(file), 'r')
  try {
    fsyncSync(dfd)
  } finally {
    closeSync(dfd)
  }
}

/** Applies `fn` to the chain `id` and writes the manifest (no-op when the chain is gone). */
export function updateChain(vmDir: string, id: string, fn: (c: BackupChain) => BackupChain): void {
  const m = readManifest(vmDir)
  const i = m.chains.findIndex((c) => c.id === id)
  if (i < 0) return
  m.chains[i] = fn(m.chains[i]!)
  writeManifest(vmDir, m)
}
