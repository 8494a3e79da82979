// Ending an outgoing migration that nobody follows any more (its receiver, the daemon, died).
import type { QmpClient } from '../qmp/index.ts'
import { sleep } from '../util.ts'

/** Outgoing migration statuses in which QEMU is still sending (or about to). */
const ACTIVE = new Set(['setup', 'active', 'pre-switchover', 'device', 'postcopy-active', 'cancelling', 'wait-unplug'])

/**
 * Cancels the VM's outgoing migration, if one is under way, and waits (at most `timeoutMs`) until
 * QEMU reports it ended. Returns the status it ended in, or undefined when none was under way.
 */
export async function cancelOutgoingMigration(qmp: QmpClient, timeoutMs = 10_000): Promise<string | undefined> {
  let status = (await qmp.execute('query-migrate')).status
  if (!status || !ACTIVE.has(status)) return undefined
  await qmp.execute('migrate_cancel')
  const deadline = Date.now() + timeoutMs
  while (status && ACTIVE.has(status) && Date.now() < deadline) {
    await sleep(20)
    status = (await qmp.execute('query-migrate')).status
  }
  return status
}
