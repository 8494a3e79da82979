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

/**
 * Names of the images and RAM state files qmpd creates by default: overlays `<disk>-<snapshot>.qcow2`
 * and revert layers `<disk>-<snapshot>-r<N>.qcow2` (a disk id is [a-z][a-z0-9]{0,15}), RAM state
 * `<snapshot>.vmstate`. Only these can be qmpd's leftovers: a file a user named (a disk, a layer
 * of a chain built outside qmpd that a commit or copy left unused) is the user's to keep, and a
 * file a user named for an operation that crashed is removed by that operation's recovery.
 */
const IMAGE_OR_STATE = /^([a-z][a-z0-9]{0,15}-[A-Za-z0-9][A-Za-z0-9._-]*\.qcow2|[A-Za-z0-9][A-Za-z0-9._-]*\.vmstate)$/

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
