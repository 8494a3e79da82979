// The path policy: resolves and confines files to the state dir and allowed dirs; touches no file
// content.
import { lstatSync, readlinkSync, realpathSync } from 'node:fs'
import { basename, dirname, isAbsolute, join, normalize, relative, resolve, sep } from 'node:path'
import { QmpdError } from '../errors.ts'

/**
 * The path policy: every file qmpd reads or writes on a user's behalf is resolved here and must
 * lie under the state directory or one of the configured allowed directories.
 */
export class PathPolicy {
  readonly roots: string[]

  constructor(readonly stateDir: string, allowedDirs: string[] = []) {
    this.roots = [resolve(stateDir), ...allowedDirs.map((d) => resolve(d))].flatMap((r) => {
      const real = realLocation(r)
      return real === r ? [r] : [r, real]
    })
  }

  /** The directory that holds one VM's files (QMP socket, logs, disks it created, overlays). */
  vmDir(vm: string): string {
    return join(this.stateDir, 'vms', vm)
  }

  /**
   * Resolves a user-supplied path: relative paths are taken relative to `baseDir` (a VM's directory).
   * Rejects NUL bytes, `..` segments and anything outside the allowed roots, before any file is touched.
   * @throws QmpdError INVALID_PATH for a path outside the allowed roots (symlinks resolved).
   */
  resolve(input: string, baseDir: string, field = 'path'): string {
    if (input.length === 0) throw new QmpdError('INVALID_PATH', `${field} is empty`, { field })
    if (input.includes('\0')) throw new QmpdError('INVALID_PATH', `${field} contains a NUL byte`, { field })
    // Checked on the raw input: normalize() would silently fold "a/../b" into "b".
    if (input.split(/[\\/]+/).includes('..')) {
      throw new QmpdError('INVALID_PATH', `${field} must not contain '..' segments`, { field, path: input })
    }
    const abs = isAbsolute(input) ? normalize(input) : resolve(baseDir, input)
    return this.confine(abs, field)
  }

  /**
   * Checks an absolute path again where it is used (a stored path, a backing file named in an
   * image header): its shape, and that it and its real location (symlinks resolved now, not when
   * it was stored) lie inside the allowed roots. Opens nothing.
   * @throws QmpdError INVALID_PATH for a path too long for the kernel, or outside the allowed roots.
   */
  confine(abs: string, field = 'path'): string {
    if (!isAbsolute(abs) || abs.includes('\0')) throw new QmpdError('INVALID_PATH', `${field} ${abs} is not an absolute path`, { field, path: abs })
    assertShape(abs, field)
    // A symlink inside an allowed directory must not lead out of it: check the real location too.
    if (!this.isAllowed(abs) || !this.isAllowed(realLocation(abs))) {
      throw new QmpdError('INVALID_PATH', `${field} ${abs} is outside the allowed directories (${this.roots.join(', ')})`, {
        field,
        path: abs,
      })
    }
    return abs
  }

  /** True when `abs` lies inside one of the roots. */
  isAllowed(abs: string): boolean {
    return this.roots.some((root) => {
      const rel = relative(root, abs)
      return rel !== '' && !rel.startsWith('..' + sep) && rel !== '..' && !isAbsolute(rel)
    })
  }
}

/** Linux's PATH_MAX (bytes, with the terminating NUL) and NAME_MAX (bytes per component). */
export const PATH_MAX = 4096
export const NAME_MAX = 255

/**
 * Refuses a path the kernel would refuse with ENAMETOOLONG: checked on the absolute (stored)
 * form, since a short relative path can resolve to one over the limit.
 * @throws QmpdError INVALID_PATH.
 */
export function assertShape(abs: string, field = 'path'): void {
  const bytes = Buffer.byteLength(abs)
  if (bytes >= PATH_MAX) {
    throw new QmpdError('INVALID_PATH', `${field} is ${bytes} bytes long as an absolute path; the limit is ${PATH_MAX - 1}`, { field, bytes })
  }
  for (const part of abs.split(sep)) {
    const n = Buffer.byteLength(part)
    if (n > NAME_MAX) {
      throw new QmpdError('INVALID_PATH', `${field} has a component of ${n} bytes (${part.slice(0, 32)}…); the limit is ${NAME_MAX}`, { field, bytes: n })
    }
  }
}

/** The path with its deepest existing ancestor replaced by that ancestor's real path. */
function realLocation(abs: string, depth = 0): string {
  let head = abs
  const tail: string[] = []
  // lstat, which does not throw for a missing entry, finds the deepest existing ancestor: most
  // paths checked here are files about to be created, and a thrown ENOENT per level is costly.
  while (!present(head)) {
    const parent = dirname(head)
    if (parent === head) return abs
    tail.unshift(basename(head))
    head = parent
  }
  try {
    return join(realpathSync.native(head), ...tail)
  } catch {
    // A dangling symlink: judge where it points (a file created through it would land there),
    // relative targets from the link's real directory, as the kernel follows them.
    if (depth < 40 && lstatSync(head, { throwIfNoEntry: false })?.isSymbolicLink()) {
      try {
        return join(realLocation(resolve(realpathSync.native(dirname(head)), readlinkSync(head)), depth + 1), ...tail)
      } catch {
        /* vanished in between */
      }
    }
    return abs
  }
}

/** Whether the entry exists (ENOENT, ENOTDIR, EACCES: treated as missing, like realpath failing). */
function present(p: string): boolean {
  try {
    return lstatSync(p, { throwIfNoEntry: false }) !== undefined
  } catch {
    return false
  }
}
