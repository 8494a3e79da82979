// Migration after the fact: cancel one a previous daemon left running, cont once one is finalized;
// starts no migration.
import type { Logger } from 'pino'
import { QmpdError } from '../errors.ts'
import type { QmpClient } from '../qmp/index.ts'
import { sleep } from '../util.ts'
import { endReceivers, receiversIn, waitForReceivers } from './receivers.ts'

/** query-migrate statuses of an outgoing migration that still runs (qapi/migration.json MigrationStatus). */
const ACTIVE_MIGRATION = new Set(['setup', 'active', 'pre-switchover', 'device', 'cancelling', 'postcopy-active', 'postcopy-paused', 'wait-unplug'])

/** Statuses in which QEMU streams on without the daemon (pre-switchover waits for it). */
const SELF_RUNNING = new Set(['setup', 'active', 'device'])

/** How long re-attach lets a stream whose receiver survived the daemon run to its end. */
const RECEIVER_WAIT_MS = 120_000

/** How long a cancelled migration may take to reach 'cancelled' (its thread must notice). */
const CANCEL_TIMEOUT_MS = 10_000

/** What cancelStaleMigration found and left. */
export interface StaleMigration {
  /** The status query-migrate reported first. */
  found: string
  /** The status once it was cancelled (or 'cancelling' if QEMU did not get there in time). */
  now: string
  /** Whether it was a background-snapshot migration: under QEMU 7.2 its guest may be wedged (see below). */
  background: boolean
}

/**
 * Ends an outgoing migration a dead daemon left in QEMU (a save, a managed save or a checkpoint
 * streams to a unix socket the daemon served): migrate_cancel, then waits (bounded) until it is
 * cancelled or failed. Returns undefined when no migration runs. It does not resume the guest:
 * the recovery of the interrupted operation decides that (contAfterMigration).
 *
 * QEMU 7.2 un-protects guest RAM after a background-snapshot only when the migration completes
 * (ram_write_tracking_stop in bg_migration_completion; moved to every ending in QEMU 8.1, commit
 * 3a8b81f2e6 "migration: stop tracking ram writes when cancelling background migration"). A
 * background snapshot that failed or was cancelled therefore leaves every vCPU that writes a page
 * not yet saved asleep in handle_userfault for good: QEMU reports 'running', `cont` changes
 * nothing, and `stop` or `quit` never return (they wait for the vCPUs). Only SIGKILL ends such
 * a QEMU; the result says `background: true` so the caller can tell.
 */
export async function cancelStaleMigration(qmp: QmpClient, log: Logger, vmDir?: string): Promise<StaleMigration | undefined> {
  let found = (await qmp.execute('query-migrate')).status
  if (!found || !ACTIVE_MIGRATION.has(found)) {
    // A receiver the dead daemon started for a stream that never began waits for ever: end it.
    if (vmDir !== undefined) await endReceivers(vmDir)
    return undefined
  }
  // The stream's receiver is a process of its own (state/receiver.mjs) that outlived the daemon:
  // while it runs and QEMU streams on its own (not waiting for the daemon in pre-switchover),
  // let the stream end. A completed background snapshot releases the guest's RAM; a cancelled
  // one would wedge it under QEMU 7.2 (below).
  if (vmDir !== undefined) {
    for (const deadline = Date.now() + RECEIVER_WAIT_MS; SELF_RUNNING.has(found ?? '') && receiversIn(vmDir).length > 0 && Date.now() < deadline; ) {
      await sleep(20)
      found = (await qmp.execute('query-migrate')).status
    }
    // Ended (completed or failed): the receiver writes the stream's tail and fsyncs, then exits.
    if (!found || !ACTIVE_MIGRATION.has(found)) await waitForReceivers(vmDir, RECEIVER_WAIT_MS)
    await endReceivers(vmDir)
    if (!found || !ACTIVE_MIGRATION.has(found)) {
      log.warn({ status: found }, 'an outgoing migration left by the previous daemon ran to its end')
      return undefined
    }
  }
  const caps = await qmp.execute('query-migrate-capabilities').catch(() => [])
  const background = caps.some((c) => c.capability === 'background-snapshot' && c.state)
  if (found !== 'cancelling') await qmp.execute('migrate_cancel')
  let now = found
  for (const deadline = Date.now() + CANCEL_TIMEOUT_MS; ; ) {
    now = (await qmp.execute('query-migrate')).status ?? 'none'
    if (!ACTIVE_MIGRATION.has(now) || Date.now() > deadline) break
    await sleep(20)
  }
  log.warn({ found, now, background }, 'cancelled an outgoing migration left by the previous daemon')
  return { found, now, background }
}

/**
 * Resumes a guest (QMP cont) after a migration ended. Right after a migration completes or is
 * cancelled QEMU may still answer "Migration is not finalized yet" (it finishes in a bottom half):
 * retry briefly. It cannot revive a guest wedged by a failed background snapshot under QEMU 7.2
 * (see cancelStaleMigration): cont answers and the vCPUs stay asleep.
 */
export async function contAfterMigration(qmp: QmpClient): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await qmp.execute('cont')
      return
    } catch (err) {
      if (attempt < 50 && err instanceof QmpdError && /not finalized/i.test(err.message)) {
        await sleep(10)
        continue
      }
      throw err
    }
  }
}
