// Asks QEMU whether an outgoing migration is blocked (query-migrate blocked-reasons) before an
// operation that migrates starts; sends nothing else and changes nothing.
import { QmpdError } from '../errors.ts'
import type { QmpClient } from '../qmp/index.ts'

/**
 * QEMU's reasons why migration (and so a checkpoint, save or managed save, which all migrate the
 * VM's state to a file; savevm checks the same blockers) cannot run now: query-migrate's
 * `blocked-reasons` (qapi/migration.json MigrationInfo, since 6.0), present and non-empty only
 * while a blocker is registered. A QEMU that does not report the member answers []: its
 * migration then fails with QEMU's own message, at the job's migrate step, before any change.
 * @throws QmpdError the QMP errors of query-migrate.
 */
export async function migrationBlockers(qmp: QmpClient): Promise<string[]> {
  return (await qmp.execute('query-migrate'))['blocked-reasons'] ?? []
}

/**
 * Refuses `what` on VM `vm` with 409 MIGRATION_BLOCKED, QEMU's reasons in details, while QEMU
 * reports a migration blocker.
 * @throws QmpdError MIGRATION_BLOCKED; the QMP errors of query-migrate.
 */
export async function assertMigratable(qmp: QmpClient, vm: string, what: string): Promise<void> {
  const reasons = await migrationBlockers(qmp)
  if (reasons.length > 0) throw new QmpdError('MIGRATION_BLOCKED', `cannot ${what} VM ${vm}: QEMU blocks migration: ${reasons.join('; ')}`, { vm, reasons })
}
