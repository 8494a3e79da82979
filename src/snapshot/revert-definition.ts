// A revert's return to the definition its snapshot recorded: what the VM's definition and runtime
// disks become, and the store write that makes it so; no QEMU, no files.
import { isDeepStrictEqual } from 'node:util'
import { isAdopted, type StoredDefinition, type VmDefinition, type VmRuntime } from '../vm/definition.ts'
import type { SnapshotDeps } from './deps.ts'
import type { Snapshot } from './model.ts'

/** The record a revert gives the VM when its snapshot was taken under another definition. */
export interface DefinitionRestore {
  definition: VmDefinition
  /** Runtime disks under that definition, before the revert's own changes (overlays) to them. */
  disks: VmRuntime['disks']
  /**
   * Disks of the VM now whose active layers the revert leaves behind because the definition no
   * longer names them (or names another file): never cleaned up by the revert, their files stay.
   */
  leftBehind: string[]
}

/**
 * What reverting to `s` does to the definition of a VM that has `current` and the active layers
 * `active` now; undefined when nothing changes (same definition, or a snapshot written before
 * qmpd recorded definitions, or an adopted VM). A disk that keeps its id and file in both
 * definitions keeps its active layer (the revert moves it as before); any other disk of the
 * snapshot's definition starts from the file the snapshot captured.
 */
export function definitionRestore(current: StoredDefinition, active: VmRuntime['disks'], s: Snapshot): DefinitionRestore | undefined {
  const old = s.definition
  if (!old || isAdopted(old) || isAdopted(current) || isDeepStrictEqual(old, current)) return undefined
  const same = (id: string): boolean => {
    const a = current.disks.find((x) => x.id === id)
    const b = old.disks.find((x) => x.id === id)
    return !!a && !!b && a.file === b.file && a.format === b.format
  }
  const disks = old.disks.map((d) => {
    const cur = active.find((x) => x.id === d.id)
    if (cur && same(d.id)) return cur
    const captured = s.disks.find((x) => x.id === d.id)
    return { id: d.id, file: captured?.file ?? d.file, format: captured?.format ?? d.format, gen: (cur?.gen ?? -1) + 1 }
  })
  return { definition: old, disks, leftBehind: active.filter((d) => !same(d.id)).map((d) => d.id) }
}

/**
 * Records a revert's metadata: `runtime` (computed from the disks the VM will have, see
 * definitionRestore) and, when the snapshot recorded another definition, that definition, in one
 * row write. Safe to repeat: a second call finds the definition already restored.
 */
export function recordRevert(deps: SnapshotDeps, vm: string, s: Snapshot, runtime: (disks: VmRuntime['disks']) => Partial<VmRuntime>): void {
  const rec = deps.vms.record(vm)
  const restore = definitionRestore(rec.definition, rec.runtime.disks, s)
  if (!restore) {
    deps.vms.updateRuntime(vm, runtime(rec.runtime.disks))
    return
  }
  deps.vms.setDefinition(vm, restore.definition, { disks: restore.disks, ...runtime(restore.disks) })
}
