// Carries the backup chains' bitmaps of a disk into its copy before the copy's pivot (blockdev-
// mirror): the copy's node gets each chain's bitmap holding every write since the chain's last
// point, and the chain records the copy's file as carried; never clears or removes a bitmap.
import type { Logger } from 'pino'
import { liveChain } from '../images/graph.ts'
import type { QmpClient } from '../qmp/index.ts'
import { readManifest, updateChain } from './manifest.ts'
import { planMerges } from './merge.ts'

/**
 * Right before the pivot to `target` (node) / `file`: for every chain that covers `disk` and has a
 * point, when the layers from the point's layer up to the active one carry the chain's bitmap
 * (planMerges), adds the bitmap (persistent) to the copy and ORs those layers' bitmaps into it, then
 * records `carried[disk] = file` in the chain. Writes between this and the pivot reach the copy's
 * node too (the mirror writes them there), so its bitmap misses none. A chain whose layers cannot
 * be vouched for is left alone: its next backup runs full and says why. Errors are logged, never
 * thrown: a copy must not fail because of a backup chain.
 */
export async function carryBitmapsToCopy(qmp: QmpClient, vmDir: string, disk: string, target: string, file: string, log: Logger): Promise<void> {
  let chains
  try {
    chains = readManifest(vmDir).chains.filter((c) => c.disks.includes(disk) && c.points.length > 0)
  } catch (err) {
    log.warn({ err, disk }, 'backups manifest unreadable: the copy gets no backup bitmaps (the next backup runs full)')
    return
  }
  if (chains.length === 0) return
  let top
  try {
    top = (await liveChain(qmp, disk))[0]!
  } catch (err) {
    log.warn({ err, disk }, 'backup bitmaps not carried into the copy: its chain could not be read (the next backup runs full)')
    return
  }
  for (const c of chains) {
    try {
      const plan = (await planMerges(qmp, [disk], c.bitmap, c.points.at(-1), c.carried)).get(disk)
      if (!plan || !('sources' in plan)) continue
      await qmp.execute('block-dirty-bitmap-add', { node: target, name: c.bitmap, persistent: true })
      const from = [{ node: top.node, name: c.bitmap }, ...plan.sources.map((s) => ({ node: s.node, name: c.bitmap }))]
      await qmp.execute('block-dirty-bitmap-merge', { node: target, target: c.bitmap, bitmaps: from })
      updateChain(vmDir, c.id, (x) => ({ ...x, carried: { ...x.carried, [disk]: file } }))
      log.info({ disk, chain: c.id, file }, 'backup bitmap carried into the copy')
    } catch (err) {
      log.warn({ err, disk, chain: c.id }, 'backup bitmap not carried into the copy: the next backup of this chain runs full')
    }
  }
}
