// Snapshots as the API shows them (tree place, sizes); reads only.
import { liveInternalSnapshots } from '../images/graph.ts'
import { isRunningState } from '../vm/states.ts'
import { mustSnapshot, type SnapshotDeps } from './deps.ts'
import { externalBytes } from './files.ts'
import type { Snapshot } from './model.ts'

/** A snapshot as the API shows it: the stored record plus its place in the tree and its size. */
export interface SnapshotView extends Snapshot {
  children: string[]
  current: boolean
  /** Bytes on disk of what only this snapshot holds (frozen images, RAM state). */
  sizeBytes: number
}

/** All snapshots of a VM, oldest first, with children, current flag and size. */
export async function listViews(d: SnapshotDeps, vm: string): Promise<SnapshotView[]> {
  const rec = d.vms.record(vm)
  const all = d.repo.list(vm)
  const internal = await internalSizes(d, vm, all)
  return Promise.all(all.map((s) => view(s, all, rec.runtime.currentSnapshot, internal)))
}

/** One snapshot (404 when unknown). `externalSize`: its size, when the caller has it on the way. */
export async function getView(d: SnapshotDeps, vm: string, name: string, externalSize?: Promise<number>): Promise<SnapshotView> {
  const s = mustSnapshot(d, vm, name)
  const all = d.repo.list(vm)
  const internal = await internalSizes(d, vm, [s])
  return view(s, all, d.vms.record(vm).runtime.currentSnapshot, internal, externalSize)
}

async function view(s: Snapshot, all: Snapshot[], current: string | undefined, internal: Map<string, number>, externalSize?: Promise<number>): Promise<SnapshotView> {
  let size = 0
  if (s.kind === 'external') {
    size = await (externalSize ?? externalBytes(s))
  } else {
    size = internal.get(s.name) ?? 0
  }
  return { ...s, children: all.filter((c) => c.parent === s.name).map((c) => c.name), current: current === s.name, sizeBytes: size }
}

/** RAM state size of internal checkpoints, from QEMU when it runs, else from qemu-img. */
async function internalSizes(d: SnapshotDeps, vm: string, snaps: Snapshot[]): Promise<Map<string, number>> {
  const out = new Map<string, number>()
  const wanted = snaps.filter((s) => s.kind === 'internal' && s.memory && s.vmstateDisk)
  if (wanted.length === 0) return out
  let byFile: Map<string, Array<{ name: string; vmStateSize: number }>>
  const rt = d.vms.record(vm).runtime
  if (isRunningState(rt.state)) {
    byFile = await liveInternalSnapshots(d.vms.qmp(vm)).catch(() => new Map())
  } else {
    byFile = new Map()
    for (const disk of rt.disks) {
      const info = await d.qemuImg.chain(disk.file, { forceShare: true }).catch(() => [])
      for (const l of info) byFile.set(l.filename, (l.snapshots ?? []).map((x) => ({ name: x.name, vmStateSize: x['vm-state-size'] })))
    }
    // With external snapshots too, a checkpoint's tag may be in an image off the active chains.
    for (const s of wanted) {
      const file = s.disks.find((x) => x.id === s.vmstateDisk)?.file
      if (!file || byFile.has(file)) continue
      const info = await d.qemuImg.info(file, { forceShare: true }).catch(() => undefined)
      if (info) byFile.set(file, (info.snapshots ?? []).map((x) => ({ name: x.name, vmStateSize: x['vm-state-size'] })))
    }
  }
  for (const s of wanted) {
    const file = s.disks.find((x) => x.id === s.vmstateDisk)?.file
    const tag = file ? byFile.get(file)?.find((t) => t.name === s.name) : undefined
    if (tag) out.set(s.name, tag.vmStateSize)
  }
  return out
}
