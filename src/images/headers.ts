// Reads qcow2 headers (backing file, its format, external data file) and walks a backing chain
// checking every file before QEMU or qemu-img opens it; never runs qemu-img, never writes.
import { dirname, isAbsolute, normalize, resolve } from 'node:path'
import { QmpdError } from '../errors.ts'
import { assertRegularFile, fileKind, openRegularFile } from './files.ts'

const QCOW2_MAGIC = 0x514649fb
const EXT_END = 0
const EXT_BACKING_FORMAT = 0xe2792aca
const EXT_DATA_FILE = 0x44415441
/** Incompatible feature bit 2: the image keeps its guest data in an external data file. */
const INCOMPAT_DATA_FILE = 1n << 2n
/** QEMU refuses backing file names longer than this (block/qcow2.c). */
const MAX_BACKING_NAME = 1023
/** More layers than anyone keeps; also ends a loop that names files in a circle. */
export const MAX_CHAIN_DEPTH = 1000

/** What a qcow2 header names: the files QEMU opens along with the image. */
export interface Qcow2Header {
  backing?: string
  backingFormat?: string
  dataFile?: string
}

/** One layer of a checked chain, top first. */
export interface CheckedLayer {
  file: string
  format: 'qcow2' | 'raw'
  /** The backing file, resolved as QEMU resolves it (relative to this layer's directory). */
  backing?: string
}

/** Refuses a confinement check's path (the path policy's confine()). */
export type Confine = (abs: string, field: string) => void

/**
 * Reads a qcow2 header. Returns undefined when the file does not start with the qcow2 magic
 * (QEMU refuses to open it as qcow2). The file is opened with O_NOFOLLOW|O_NONBLOCK after a
 * stat that refuses special files.
 * @throws QmpdError INVALID_PATH for a file that is not regular, or a header that cannot be read.
 */
export async function readQcow2Header(file: string, field = 'image', check?: (real: string) => void): Promise<Qcow2Header | undefined> {
  const fh = await openRegularFile(file, field, check)
  try {
    const read = async (pos: number, len: number): Promise<Buffer> => {
      const buf = Buffer.alloc(len)
      const { bytesRead } = await fh.read(buf, 0, len, pos)
      return buf.subarray(0, bytesRead)
    }
    const head = await read(0, 104)
    if (head.length < 72 || head.readUInt32BE(0) !== QCOW2_MAGIC) return undefined
    const version = head.readUInt32BE(4)
    const backingOffset = Number(head.readBigUInt64BE(8))
    const backingSize = head.readUInt32BE(16)
    const clusterBits = head.readUInt32BE(20)
    const bad = (why: string): QmpdError => new QmpdError('INVALID_PATH', `${field} ${file}: ${why}`, { field, path: file })
    // QEMU accepts clusters of 512 B to 2 MiB; anything else it refuses to open, so do we.
    if (clusterBits < 9 || clusterBits > 21) throw bad(`a qcow2 header with cluster_bits ${clusterBits}`)
    const out: Qcow2Header = {}
    // An external data file is opened by QEMU with the name as stored, relative names from the
    // opener's working directory, not the image's: qmpd creates no such images and takes none.
    if (version >= 3 && head.length >= 104 && (head.readBigUInt64BE(72) & INCOMPAT_DATA_FILE) !== 0n) out.dataFile = ''
    if (backingOffset > 0 && backingSize > 0) {
      if (backingSize > MAX_BACKING_NAME) throw new QmpdError('INVALID_PATH', `${field} ${file}: its header names a backing file of ${backingSize} bytes`, { field, path: file })
      out.backing = (await read(backingOffset, backingSize)).toString('utf8')
    }
    // Header extensions follow the header (72 bytes in v2, header_length in v3) up to the END
    // extension, within the first cluster (and before the backing file name), as QEMU reads
    // them (block/qcow2.c qcow2_read_extensions): every one is read, however many there are, and
    // a list that runs off that area is refused rather than taken as "no extensions".
    let pos = version >= 3 && head.length >= 104 ? head.readUInt32BE(100) : 72
    const clusterEnd = 2 ** clusterBits
    const end = backingOffset > 0 ? Math.min(backingOffset, clusterEnd) : clusterEnd
    for (;;) {
      if (pos + 8 > end) throw bad('its header extensions run past the first cluster')
      const h = await read(pos, 8)
      if (h.length < 8) throw bad('its header extensions are cut short')
      const type = h.readUInt32BE(0)
      const len = h.readUInt32BE(4)
      if (type === EXT_END) break
      if (pos + 8 + len > end) throw bad(`a header extension of ${len} bytes runs past the first cluster`)
      if (type === EXT_BACKING_FORMAT) out.backingFormat = (await read(pos + 8, len)).toString('utf8')
      if (type === EXT_DATA_FILE) out.dataFile = (await read(pos + 8, len)).toString('utf8')
      pos += 8 + Math.ceil(len / 8) * 8
    }
    return out
  } finally {
    await fh.close()
  }
}

/** True when the file starts with the qcow2 magic (read as readQcow2Header reads). */
async function isQcow2(file: string, field: string): Promise<boolean> {
  const fh = await openRegularFile(file, field)
  try {
    const buf = Buffer.alloc(4)
    const { bytesRead } = await fh.read(buf, 0, 4, 0)
    return bytesRead === 4 && buf.readUInt32BE(0) === QCOW2_MAGIC
  } finally {
    await fh.close()
  }
}

/**
 * Where QEMU finds a file a header names: an absolute path as it is, a relative one under the
 * naming image's directory. Refused: json: and protocol names (nbd:, http:, …: anything with a
 * ':' before the first '/'), which would make QEMU open something that is not a confined file.
 * @throws QmpdError INVALID_PATH.
 */
function headerPath(name: string, image: string, what: string, field: string): string {
  const head = name.split('/')[0]!
  if (name.length === 0 || name.includes('\0') || head.includes(':')) {
    throw new QmpdError('INVALID_PATH', `${field}: the header of ${image} names ${what} ${JSON.stringify(name.slice(0, 200))}, which is not a plain file path`, { field, path: image, named: name })
  }
  return isAbsolute(name) ? normalize(name) : resolve(dirname(image), name)
}

/**
 * Checks every file QEMU or qemu-img opens for the image `file` of `format`, before any of them
 * is opened by anyone but qmpd: each layer is confined (`confine`, when given), must be a
 * regular file, and its header is read for the next layer (the backing file, as QEMU resolves
 * it), down the whole chain; an image with an external data file, or declared qcow2 without the
 * qcow2 magic, is refused. A format of 'probe' is guessed from the magic, as qemu-img would
 * without -f; any format but qcow2, raw and 'probe' is refused. A layer that is missing ends the
 * walk (QEMU or qemu-img reports it); a missing top returns [].
 * @throws QmpdError INVALID_PATH when a file is outside the roots, not a regular file, named as json: or a protocol, in an
 *   unsupported format, has a data file or no qcow2 magic, or the chain loops or is deeper than MAX_CHAIN_DEPTH.
 */
export async function checkChain(file: string, format: string, confine?: Confine, field = 'image'): Promise<CheckedLayer[]> {
  const layers: CheckedLayer[] = []
  const seen = new Set<string>()
  let cur = file
  let fmt: string = format
  for (let depth = 0; ; depth++) {
    const what = depth === 0 ? field : `${field} (backing file ${cur}, layer ${depth})`
    if (depth >= MAX_CHAIN_DEPTH) throw new QmpdError('INVALID_PATH', `${field}: the backing chain of ${file} is deeper than ${MAX_CHAIN_DEPTH}`, { field, path: file })
    if (seen.has(cur)) throw new QmpdError('INVALID_PATH', `${field}: the backing chain of ${file} loops at ${cur}`, { field, path: file })
    seen.add(cur)
    confine?.(cur, what)
    if (!assertRegularFile(cur, what, { allowMissing: true })) return layers
    if (fmt === 'probe') fmt = (await isQcow2(cur, what)) ? 'qcow2' : 'raw'
    if (fmt === 'raw') {
      layers.push({ file: cur, format: 'raw' })
      return layers
    }
    if (fmt !== 'qcow2') {
      throw new QmpdError('INVALID_PATH', `${what}: format ${fmt} is not supported (qcow2 or raw only)`, { field, path: cur, format: fmt })
    }
    const h = await readQcow2Header(cur, what, confine ? (real) => confine(real, what) : undefined)
    const layer: CheckedLayer = { file: cur, format: 'qcow2' }
    layers.push(layer)
    // Declared qcow2 but no qcow2 magic: QEMU would refuse it, and qemu-img commands without a
    // format option (snapshot) would probe it and might take it for vmdk and open its extents.
    if (!h) throw new QmpdError('INVALID_PATH', `${what}: ${cur} is not a qcow2 image (no qcow2 magic)`, { field, path: cur, format: 'qcow2' })
    if (h.dataFile !== undefined) {
      // QEMU opens a data file by its stored name from its own working directory (not the
      // image's) and read-write with the image: refused whatever it names, inside or out.
      const named = h.dataFile ? ` (${JSON.stringify(h.dataFile.slice(0, 200))})` : ''
      throw new QmpdError('INVALID_PATH', `${what}: ${cur} keeps its data in an external data file${named}, which qmpd does not take`, { field, path: cur, named: h.dataFile })
    }
    if (h.backing === undefined) return layers
    const next = headerPath(h.backing, cur, 'the backing file', field)
    layer.backing = next
    if (h.backingFormat !== undefined) {
      fmt = h.backingFormat
    } else {
      // No format recorded: QEMU probes. Only a qcow2 magic is trusted; anything else must be
      // rebased with its format (-F), since a probe could take it for vmdk and open its extents.
      confine?.(next, `${what} backing file`)
      if (fileKind(next, field) === 'missing') return layers
      if (!(await isQcow2(next, `${what} backing file`))) {
        throw new QmpdError('INVALID_PATH', `${field}: the header of ${cur} names the backing file ${next} without its format; rebase with -F raw or -F qcow2`, { field, path: cur })
      }
      fmt = 'qcow2'
    }
    cur = next
  }
}
