// The offline chains GET /v1/vms shows, cached by the identity of every layer's file (inode,
// size, mtime, ctime) and inspected a few at a time; reads images only, knows nothing of VMs.
import { stat } from 'node:fs/promises'
import PQueue from 'p-queue'
import type { ImageInfo, QemuImg } from '../images/qemu-img.ts'

/** qemu-img processes that may inspect chains at the same time (a list of 1,000 stopped VMs must not fork 1,000). */
export const CHAIN_INSPECTIONS = 1
/** Files remembered at most; beyond, the cache starts over (entries of deleted VMs go with it). */
const MAX_ENTRIES = 20_000

interface Entry {
  /** The file of each layer, top first, and its identity when the chain was read. */
  files: string[]
  stamps: string[]
  layers: ImageInfo[]
}

/** A file's identity: any write, truncation, rename over it or metadata change alters it. */
async function stampOf(file: string): Promise<string> {
  const s = await stat(file, { bigint: true })
  return `${s.dev}:${s.ino}:${s.size}:${s.blocks}:${s.mtimeNs}:${s.ctimeNs}`
}

/**
 * `qemu-img info --backing-chain -U` of stopped disks, cached: a chain is read again only when one of
 * its files changed (a stat per layer decides), and at most CHAIN_INSPECTIONS qemu-img run at once.
 */
export class ChainCache {
  private readonly entries = new Map<string, Entry>()
  private readonly slots: PQueue
  /** qemu-img runs so far (tests read it: a warm list runs none). */
  inspections = 0

  constructor(
    private readonly qemuImg: QemuImg,
    concurrency = CHAIN_INSPECTIONS,
  ) {
    this.slots = new PQueue({ concurrency })
  }

  /**
   * The chain of `file`, top first.
   * @throws QmpdError QEMU_IMG_FAILED or QEMU_NOT_FOUND (from qemu-img); the fs error when the file cannot be stat'ed.
   */
  async chain(file: string): Promise<ImageInfo[]> {
    const hit = this.entries.get(file)
    if (hit) {
      const now = await Promise.all(hit.files.map((f) => stampOf(f).catch(() => '')))
      if (now.every((s, i) => s === hit.stamps[i])) return hit.layers
      this.entries.delete(file)
    }
    const before = await stampOf(file) // a missing disk fails here, without a qemu-img
    const layers = await this.slots.add(async () => {
      this.inspections++
      return this.qemuImg.chain(file, { forceShare: true })
    })
    const files = layers.map((l) => l.filename)
    const stamps = await Promise.all(files.map((f) => stampOf(f).catch(() => '')))
    // Cached only when every layer is a plain file that did not change while qemu-img read it.
    if (files[0] === file && stamps[0] === before && stamps.every((s) => s !== '')) {
      if (this.entries.size >= MAX_ENTRIES) this.entries.clear()
      this.entries.set(file, { files, stamps, layers })
    }
    return layers
  }
}
