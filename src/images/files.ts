// Classifies files where they are used (lstat/stat, never open) and opens the ones qmpd reads
// itself without following a symlink planted after the check; knows nothing of VMs.
import { constants as fsc, realpathSync, statSync, type Stats } from 'node:fs'
import { open, type FileHandle } from 'node:fs/promises'
import { dirname } from 'node:path'
import { QmpdError } from '../errors.ts'

/** What a path names now, from stat (symlinks followed; nothing is opened, so a FIFO cannot block). */
export type FileKind = 'file' | 'directory' | 'fifo' | 'socket' | 'char-device' | 'block-device' | 'missing' | 'other'

function kindOf(st: Stats): FileKind {
  if (st.isFile()) return 'file'
  if (st.isDirectory()) return 'directory'
  if (st.isFIFO()) return 'fifo'
  if (st.isSocket()) return 'socket'
  if (st.isCharacterDevice()) return 'char-device'
  if (st.isBlockDevice()) return 'block-device'
  return 'other'
}

const KIND_NAMES: Record<FileKind, string> = {
  file: 'a regular file',
  directory: 'a directory',
  fifo: 'a FIFO',
  socket: 'a socket',
  'char-device': 'a character device',
  'block-device': 'a block device',
  missing: 'missing',
  other: 'not a regular file',
}

/**
 * The kind of file at `file` (stat, following symlinks). A dangling symlink, a symlink loop or
 * a missing parent count as missing; a path the kernel refuses (ENAMETOOLONG) is INVALID_PATH.
 * @throws QmpdError INVALID_PATH when the kernel refuses the path itself.
 */
export function fileKind(file: string, field = 'path'): FileKind {
  try {
    const st = statSync(file, { throwIfNoEntry: false })
    return st ? kindOf(st) : 'missing'
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOTDIR' || code === 'ELOOP') return 'missing'
    throw new QmpdError('INVALID_PATH', `${field} ${file} cannot be looked up: ${(err as Error).message}`, { field, path: file, errno: code })
  }
}

/**
 * Refuses anything but a regular file (FIFO, device, socket, directory) before anything opens
 * it. With `allowMissing`, a missing file passes (returns false); else it is INVALID_PATH too.
 * @throws QmpdError INVALID_PATH.
 */
export function assertRegularFile(file: string, field = 'path', opts: { allowMissing?: boolean } = {}): boolean {
  const kind = fileKind(file, field)
  if (kind === 'file') return true
  if (kind === 'missing' && opts.allowMissing) return false
  throw new QmpdError('INVALID_PATH', `${field} ${file} is ${KIND_NAMES[kind]}${kind === 'missing' ? '' : '; a regular file is needed'}`, { field, path: file, kind })
}

/**
 * For a file about to be created: nothing of another kind is in its place, and its parent
 * directory exists (or, when `mayCreateUnder` is given and the file is inside that directory,
 * the deepest existing ancestor is a directory: qmpd creates the rest).
 * @throws QmpdError INVALID_PATH.
 */
export function assertCreatable(file: string, field = 'path', opts: { mayCreateUnder?: string } = {}): void {
  const kind = fileKind(file, field)
  if (kind !== 'missing' && kind !== 'file') {
    throw new QmpdError('INVALID_PATH', `${field} ${file} is ${KIND_NAMES[kind]}; a regular file is needed`, { field, path: file, kind })
  }
  const under = opts.mayCreateUnder
  let dir = dirname(file)
  if (under && (dir === under || dir.startsWith(under + '/'))) {
    while (fileKind(dir, field) === 'missing' && dirname(dir) !== dir) dir = dirname(dir)
  }
  const parent = fileKind(dir, field)
  if (parent !== 'directory') {
    throw new QmpdError('INVALID_PATH', `${field}: the directory ${dir} ${parent === 'missing' ? 'does not exist' : `is ${KIND_NAMES[parent]}`}`, { field, path: file })
  }
}

/**
 * Opens a regular file for reading: its real path is taken now, opened with O_NOFOLLOW (a
 * symlink swapped in after that is refused) and O_NONBLOCK (a FIFO swapped in cannot block a
 * thread), and the open descriptor is checked to be a regular file. `check` runs on the real
 * path before the open (the path policy).
 * @throws QmpdError INVALID_PATH for anything but a regular file, when `check` refuses, or when it cannot be opened.
 */
export async function openRegularFile(file: string, field = 'file', check?: (real: string) => void): Promise<FileHandle> {
  assertRegularFile(file, field)
  let real: string
  try {
    real = realpathSync.native(file)
  } catch (err) {
    throw new QmpdError('INVALID_PATH', `${field} ${file} cannot be resolved: ${(err as Error).message}`, { field, path: file })
  }
  check?.(real)
  let fh: FileHandle
  try {
    fh = await open(real, fsc.O_RDONLY | fsc.O_NOFOLLOW | fsc.O_NONBLOCK | fsc.O_NOCTTY)
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ELOOP') throw new QmpdError('INVALID_PATH', `${field} ${file} was replaced by a symlink`, { field, path: file })
    throw new QmpdError('INVALID_PATH', `${field} ${file} cannot be opened: ${(err as Error).message}`, { field, path: file, errno: code })
  }
  try {
    const st = await fh.stat()
    if (!st.isFile()) throw new QmpdError('INVALID_PATH', `${field} ${file} is ${KIND_NAMES[kindOf(st)]}; a regular file is needed`, { field, path: file })
  } catch (err) {
    await fh.close()
    throw err
  }
  return fh
}
