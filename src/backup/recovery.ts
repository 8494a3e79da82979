// Crash recovery of backups and restores (decision table: docs/architecture.md, "Crash recovery");
// the re-attach has already cancelled or dismissed the QEMU jobs (qmpd-backup-*) a dead daemon left.
import { rm } from 'node:fs/promises'
import type { Logger } from 'pino'
import type { Recovery, RecoveryOutcome } from '../ops/recovery.ts'
import type { QmpClient } from '../qmp/index.ts'
import type { JournalEntry } from '../store/journal.ts'
import { readManifest, updateChain } from './manifest.ts'
import { BackupJournal, RestoreJournal } from './model.ts'

/** What the rules use. */
export interface BackupRecoveryDeps {
  vmDir: (vm: string) => string
  /** The VM's QMP client when its QEMU runs. */
  qmp: (vm: string) => QmpClient | undefined
}

/** Steps from which QEMU may have finalized the group, i.e. cleared the bitmaps (run.ts). */
const FINALIZING = new Set(['finalize', 'detach', 'rebase', 'record'])

/** Registers the rules of backup and backup-restore. */
export function registerBackupRecovery(recovery: Recovery, d: BackupRecoveryDeps): void {
  recovery.register('backup', (e, log) => recoverBackup(d, e, BackupJournal.parse(e.body), log))
  recovery.register('backup-restore', async (e) => {
    const { file } = RestoreJournal.parse(e.body)
    await rm(file, { force: true })
    return { action: 'back', detail: `the restore into ${file} had not finished: removed it` }
  })
}

async function recoverBackup(d: BackupRecoveryDeps, e: JournalEntry, j: BackupJournal, log: Logger): Promise<RecoveryOutcome> {
  let qmp: QmpClient | undefined
  try {
    qmp = d.qmp(e.vm)
  } catch {
    qmp = undefined // no QMP session (state unknown): the nodes went with it or go with the QEMU
  }
  if (qmp) {
    for (const t of j.targets) await qmp.execute('blockdev-del', { 'node-name': t.node }).catch(() => {})
  }
  const chain = readManifest(d.vmDir(e.vm)).chains.find((c) => c.id === j.chain)
  const point = chain?.points.find((p) => p.id === j.point)
  if (point) return { action: 'forward', detail: `backup ${j.point} was recorded`, result: { chain: j.chain, point } }
  for (const t of j.targets) await rm(t.file, { force: true })
  if (e.step && FINALIZING.has(e.step) && chain) {
    // QEMU may have cleared the bitmaps for a point that is now gone: the next backup must be full.
    const reason = `backup ${j.point} was interrupted while QEMU finalized it: the bitmaps may have been restarted for a point that was not kept`
    updateChain(d.vmDir(e.vm), chain.id, (c) => ({ ...c, invalid: { reason, at: new Date().toISOString() } }))
    log.warn({ chain: chain.id, point: j.point }, reason)
    return { action: 'back', detail: `${reason}; its files were removed and the chain's next backup is full` }
  }
  return { action: 'back', detail: `backup ${j.point} had not finished: its files were removed, the bitmaps are as they were` }
}
