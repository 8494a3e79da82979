// The row checks of every table, gathered from the repositories for the start-up scan and the
// purge (src/store/integrity.ts); no checks of its own.
import type { RowChecks } from './integrity.ts'
import { parseJobRow } from './jobs.ts'
import { parseJournalRow } from './journal.ts'
import { parseImageRow, parseSnapshotRow } from './snapshots.ts'
import { parseVmRow } from './vms.ts'

/** Each table's read-path parse, as the scan runs it. */
export const ROW_CHECKS: RowChecks = {
  vms: parseVmRow,
  snapshots: parseSnapshotRow,
  images: parseImageRow,
  jobs: parseJobRow,
  journal: parseJournalRow,
}
