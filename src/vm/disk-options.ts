// A disk's cache/aio/discard/detect-zeroes/bus options (zod) and the QEMU blockdev and device
// properties they become; builds no command line and talks to no QEMU.
import { z } from 'zod'

/** Cache modes as -drive names them; QEMU maps each to cache.direct, cache.no-flush and the device's write-cache. */
export const CacheMode = z.enum(['none', 'writeback', 'writethrough', 'directsync', 'unsafe'])
export type CacheMode = z.output<typeof CacheMode>

/** The disk fields this file owns, merged into DiskDefinition. */
export const DiskOptionFields = {
  cache: CacheMode.optional().describe('host cache mode (default writeback, as QEMU)'),
  aio: z.enum(['threads', 'native', 'io_uring']).optional().describe('AIO backend of the file node (native needs cache none or directsync)'),
  discard: z.enum(['ignore', 'unmap']).optional().describe('pass guest discard requests to the image (default unmap)'),
  detectZeroes: z.enum(['off', 'on', 'unmap']).optional().describe('detect zero writes (unmap needs discard unmap)'),
  serial: z
    .string()
    .regex(/^[A-Za-z0-9._-]{1,20}$/, 'must be 1-20 letters, digits, ".", "_" or "-"')
    .optional()
    .describe('serial number the guest sees'),
  bootIndex: z.number().int().min(0).max(99).optional().describe('boot order (lowest first); default: the first disk boots when there is no kernel'),
}

/** What -drive cache=MODE means, per QEMU's blockdev_parse_cache_mode. */
export const CACHE_MAP: Record<CacheMode, { direct: boolean; noFlush: boolean; writeCache: boolean }> = {
  writeback: { direct: false, noFlush: false, writeCache: true },
  none: { direct: true, noFlush: false, writeCache: true },
  writethrough: { direct: false, noFlush: false, writeCache: false },
  directsync: { direct: true, noFlush: false, writeCache: false },
  unsafe: { direct: false, noFlush: true, writeCache: true },
}

/** A disk's options as the definition has them (every field optional). */
export interface DiskOptions {
  cache?: CacheMode | undefined
  aio?: 'threads' | 'native' | 'io_uring' | undefined
  discard?: 'ignore' | 'unmap' | undefined
  detectZeroes?: 'off' | 'on' | 'unmap' | undefined
}

/** Why a disk's options do not fit together, or undefined. */
export function diskOptionIssue(d: DiskOptions): string | undefined {
  const cache = CACHE_MAP[d.cache ?? 'writeback']
  if (d.aio === 'native' && !cache.direct) return 'aio native needs cache none or directsync (cache.direct)'
  if (d.detectZeroes === 'unmap' && (d.discard ?? 'unmap') !== 'unmap') return 'detectZeroes unmap needs discard unmap'
  return undefined
}

/**
 * Properties of a disk's format node and of its file (protocol) node, for -blockdev and every
 * blockdev-add of a node that takes the disk's place (mirror targets). discard defaults to unmap,
 * as qmpd always set it.
 */
export function blockdevProps(d: DiskOptions | undefined): { format: Record<string, unknown>; file: Record<string, unknown> } {
  const c = CACHE_MAP[d?.cache ?? 'writeback']
  const cache = { cache: { direct: c.direct, 'no-flush': c.noFlush } }
  return {
    format: { discard: d?.discard ?? 'unmap', ...(d?.detectZeroes ? { 'detect-zeroes': d.detectZeroes } : {}), ...cache },
    file: { ...(d?.aio ? { aio: d.aio } : {}), ...cache },
  }
}

/** The guest device's write-cache property for a cache mode. */
export function writeCacheProp(cache: CacheMode | undefined): 'on' | 'off' {
  return CACHE_MAP[cache ?? 'writeback'].writeCache ? 'on' : 'off'
}
