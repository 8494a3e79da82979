// What QEMU says about a backup chain's dirty bitmaps, and the mode a backup can honestly run in;
// reads QEMU only, changes nothing.
import { liveChain } from '../images/graph.ts'
import type { QmpClient } from '../qmp/index.ts'
import type { MergePlan } from './merge.ts'
import type { BackupChain, BackupMode } from './model.ts'

/** One disk's bitmap as QEMU has it on the disk's active layer. */
export interface BitmapState {
  disk: string
  /** The active layer's node (where the bitmap lives and the backup reads from). */
  node: string
  /** The active layer's file. */
  file: string
  state: 'active' | 'inconsistent' | 'missing'
  /** Bytes marked dirty (written since the chain's last point), when the bitmap exists. */
  dirtyBytes?: number
}

/**
 * The state of bitmap `name` on each disk's active layer. A bitmap QEMU loaded from an image it
 * did not close cleanly is `inconsistent` (qcow2 in-use flag); one created by a QEMU that was
 * killed before it closed the image was never written and is `missing`, as is one left on a layer
 * below a newer one.
 */
export async function bitmapStates(qmp: QmpClient, disks: readonly string[], name: string): Promise<BitmapState[]> {
  const nodes = await qmp.execute('query-named-block-nodes', { flat: true })
  const out: BitmapState[] = []
  for (const disk of disks) {
    const top = (await liveChain(qmp, disk))[0]!
    const info = nodes.find((n) => n['node-name'] === top.node)?.['dirty-bitmaps']?.find((b) => b.name === name)
    if (!info) out.push({ disk, node: top.node, file: top.file, state: 'missing' })
    else out.push({ disk, node: top.node, file: top.file, state: info.inconsistent ? 'inconsistent' : 'active', dirtyBytes: info.count })
  }
  return out
}

/**
 * The mode a backup runs in: the requested one, or full with the reason when an incremental (or a
 * differential, which starts as one) cannot be trusted (no chain or point yet, the chain marked invalid, a bitmap missing or
 * inconsistent, the disk's active layer not the one of the last point and no bitmaps to merge from
 * the layers between, `merges` from planMerges). Never a silent full
 * backup: the reason goes into the point and the job result. A layer that came back (an external
 * snapshot committed back into it) is trusted: QEMU marks a layer's bitmap for every cluster a
 * commit writes into it.
 */
export function decideMode(requested: BackupMode, chain: BackupChain | undefined, states: readonly BitmapState[], merges?: MergePlan): { mode: BackupMode; reason?: string } {
  if (requested === 'full') return { mode: 'full' }
  if (!chain || chain.points.length === 0) return { mode: 'full', reason: 'no backup in this chain yet: the first backup of a chain is full' }
  if (chain.invalid) return { mode: 'full', reason: chain.invalid.reason }
  const last = chain.points.at(-1)!
  const moved = states.find((s) => last.disks.find((d) => d.id === s.disk)?.layer !== s.file && !(merges?.get(s.disk) && 'sources' in merges.get(s.disk)!))
  if (moved) {
    const why = merges?.get(moved.disk)
    if (why && 'reason' in why) return { mode: 'full', reason: why.reason }
    return {
      mode: 'full',
      reason: `disk ${moved.disk}'s active layer is ${moved.file}, not the ${last.disks.find((d) => d.id === moved.disk)?.layer} of the last backup (an external snapshot, copy or revert since): its bitmap does not cover the change`,
    }
  }
  const bad = states.find((s) => s.state === 'inconsistent')
  if (bad) return { mode: 'full', reason: `bitmap inconsistent after unclean exit (disk ${bad.disk}: QEMU did not close the image cleanly, so the bitmap may have missed writes)` }
  const gone = states.find((s) => s.state === 'missing')
  if (gone) {
    return {
      mode: 'full',
      reason: `bitmap missing on disk ${gone.disk}'s active layer (QEMU exited uncleanly before storing it, or the disk's active layer changed since the last backup)`,
    }
  }
  return { mode: requested }
}
