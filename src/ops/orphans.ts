// Says why a file in a VM directory counts as an orphan (no record accounts for it); deletes nothing.
import { VM_FILES } from '../vm/argv.ts'

/** Why a file in a VM directory counts as an orphan. */
export type OrphanKind =
  /** A temporary file of qmpd's own naming: never useful once the operation that made it is over. */
  | 'temporary'
  /** An image or RAM state file (by qmpd's naming) that no record names. */
  | 'unreferenced'

/**
 * Temporary names qmpd itself makes in a VM directory: RAM state being written
 * (`.<file>.partial`, state/ramfile.ts partialName; older daemons added `-<hex>`), RAM state transfer sockets (`mig-<hex>.sock`) and a
 * restored managed save on its way out.
 */
const TEMPORARY: RegExp[] = [/^\..+\.partial(-[^/]+)?$/, /^mig-[^/]+\.sock$/, new RegExp(`^${VM_FILES.restoredSave.replace(/\./g, '\\.')}$`)]

/** Names of the images and RAM state files qmpd creates (overlays, revert layers, checkpoints). */
const IMAGE_OR_STATE = /\.(qcow2|vmstate)$/

/**
 * Classifies one entry of a VM directory: an orphan kind, or undefined when it is not an orphan.
 * `referenced` holds the absolute paths that any record names (definition, runtime, image graph,
 * snapshots). Files of any other name (a user's, a test's pmem-*.bin) are never orphans.
 */
export function orphanKind(name: string, path: string, referenced: ReadonlySet<string>): OrphanKind | undefined {
  if (TEMPORARY.some((re) => re.test(name))) return 'temporary'
  if (IMAGE_OR_STATE.test(name) && !referenced.has(path)) return 'unreferenced'
  return undefined
}
