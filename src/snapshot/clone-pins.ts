// Keeps the source snapshots' `clones` pins (src/snapshot/clone.ts) true to the VMs that exist:
// a deleted clone is unpinned, start-up prunes names of VMs that are gone. Never touches an image.
import type { SnapshotRepo } from '../store/snapshots.ts'

/** One snapshot whose pin list changed. */
export interface Unpinned {
  vm: string
  snapshot: string
  removed: string[]
}

/**
 * Removes from every snapshot of `vms` the clone names `keep` refuses, so that a later VM reusing
 * a deleted clone's name pins nothing. Returns what changed.
 */
export function unpinClones(repo: SnapshotRepo, vms: readonly string[], keep: (clone: string) => boolean): Unpinned[] {
  const out: Unpinned[] = []
  for (const vm of vms) {
    for (const s of repo.list(vm)) {
      if (!s.clones?.length) continue
      const kept = s.clones.filter(keep)
      if (kept.length === s.clones.length) continue
      const { clones: _c, ...rest } = s
      repo.put(kept.length ? { ...rest, clones: kept } : rest)
      out.push({ vm, snapshot: s.name, removed: s.clones.filter((c) => !kept.includes(c)) })
    }
  }
  return out
}
