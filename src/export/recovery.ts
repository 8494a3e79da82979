// Recovery rules of export-add and export-remove after a crash (decision table:
// docs/architecture.md, "Crash recovery"): either way the export is taken down; no other code
// decides what happens to these operations after a crash.
import type { Recovery } from '../ops/recovery.ts'
import { EXPORT_ADD_OP, EXPORT_REMOVE_OP, ExportRecord } from './model.ts'
import type { ExportService } from './service.ts'

/**
 * Registers both rules. A setup interrupted at any step is undone (the graph restored, scratch
 * removed, NBD server stopped when nothing else uses it): exports do not survive a daemon restart
 * anyway. An interrupted removal is finished the same way.
 */
export function registerExportRecovery(recovery: Recovery, exports: ExportService): void {
  recovery.register(EXPORT_ADD_OP, async (entry) => ({ action: 'back', detail: await exports.undoAfterCrash(ExportRecord.parse(entry.body)) }))
  recovery.register(EXPORT_REMOVE_OP, async (entry) => ({ action: 'forward', detail: await exports.undoAfterCrash(ExportRecord.parse(entry.body)) }))
}
