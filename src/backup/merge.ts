// Which lower layers' bitmaps a backup must merge into the active layer's when external snapshots
// were taken since the chain's last point; reads QEMU only, changes nothing.
import { liveChain } from '../images/graph.ts'
import type { QmpClient } from '../qmp/index.ts'
import type { BackupPoint } from './model.ts'

/** A layer whose bitmap holds writes the active layer's bitmap does not. */
export interface MergeSource {
  node: string
  file: string
}

/** Per disk: the layers to merge (none when the active layer is the last point's) or why it cannot. */
export type MergePlan = Map<string, { sources: MergeSource[] } | { reason: string }>

/**
 * For each disk whose active layer is not the last point's layer: when that layer is still in the
 * disk's backing chain and it and every layer between carry bitmap `name` (not inconsistent),
 * those layers are the merge sources (the last point's layer holds the writes from the point to
 * the snapshot, each later one the writes while it was active). A layer without the bitmap (an
 * overlay made by something else than qmpd) or a last layer no longer in the chain gives a reason.
 * Each layer below the active one is merged once: the point taken after the merge records the
 * active layer as its layer, so the next plan starts above the merged ones. A disk whose active
 * layer is the file `carried` names (a copy that got the bitmap before its pivot) merges nothing.
 */
export async function planMerges(qmp: QmpClient, disks: readonly string[], name: string, last: BackupPoint | undefined, carried?: Readonly<Record<string, string>>): Promise<MergePlan> {
  const out: MergePlan = new Map()
  if (!last) return out
  const nodes = await qmp.execute('query-named-block-nodes', { flat: true })
  for (const disk of disks) {
    const lastLayer = last.disks.find((d) => d.id === disk)?.layer
    const chain = await liveChain(qmp, disk)
    // A copy the bitmap was carried into (copy-bitmaps.ts) covers every write since the point.
    if (!lastLayer || chain[0]!.file === lastLayer || carried?.[disk] === chain[0]!.file) {
      out.set(disk, { sources: [] })
      continue
    }
    const k = chain.findIndex((l) => l.file === lastLayer)
    if (k < 0) {
      out.set(disk, { reason: `disk ${disk}'s last backed-up layer ${lastLayer} is no longer in its backing chain (a commit, copy or revert since)` })
      continue
    }
    const below = chain.slice(1, k + 1)
    const lacking = below.find((l) => {
      const b = nodes.find((n) => n['node-name'] === l.node)?.['dirty-bitmaps']?.find((x) => x.name === name)
      return !b || b.inconsistent
    })
    if (lacking) {
      out.set(disk, { reason: `layer ${lacking.file} of disk ${disk} lacks a usable bitmap ${name} (an overlay made outside qmpd, or an unclean exit): its writes since the last backup are not recorded` })
      continue
    }
    out.set(disk, { sources: below.map((l) => ({ node: l.node, file: l.file })) })
  }
  return out
}
