// A revert's return to the definition its snapshot recorded: what the VM's definition and runtime
// disks become, and the store write that makes it so; no QEMU, no files.
import { isDeepStrictEqual } from 'node:util'
import { isAdopted, type StoredDefinition, type VmDefinition, type VmRuntime } from '../vm/definition.ts'
import { NVRAM_DISK_ID } from '../vm/firmware.ts'
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
  const recorded = s.definition
  if (!recorded || isAdopted(recorded) || isAdopted(current) || isDeepStrictEqual(machineOf(recorded), machineOf(current))) return undefined
  // Labels are the VM's tags for whoever manages it (a scheduler's), not its machine: they stay.
  const old: VmDefinition = { ...machineOf(recorded), ...(current.labels ? { labels: current.labels } : {}) }
  const uefi = (d: VmDefinition): boolean => d.firmware === 'uefi'
  const same = (id: string): boolean => {
    // The NVRAM is no disk of the definition: it is the same while the VM stays UEFI.
    if (id === NVRAM_DISK_ID) return uefi(current) && uefi(old)
    const a = current.disks.find((x) => x.id === id)
    const b = old.disks.find((x) => x.id === id)
    return !!a && !!b && a.file === b.file && a.format === b.format
  }
  const ids = [...old.disks.map((d) => ({ id: d.id, file: d.file, format: d.format })), ...(uefi(old) ? [{ id: NVRAM_DISK_ID, file: undefined, format: 'qcow2' as const }] : [])]
  const disks = ids.flatMap((d) => {
    const cur = active.find((x) => x.id === d.id)
    if (cur && same(d.id)) return [cur]
    const captured = s.disks.find((x) => x.id === d.id)
    const file = captured?.file ?? d.file
    // A UEFI snapshot without its NVRAM (taken before qmpd kept one): the VM's current one stays.
    if (!file) return cur ? [cur] : []
    return [{ id: d.id, file, format: captured?.format ?? d.format, gen: (cur?.gen ?? -1) + 1 }]
  })
  return { definition: old, disks, leftBehind: active.filter((d) => !same(d.id) && !disks.includes(d)).map((d) => d.id) }
}

/** A definition without what is not the machine (labels): two definitions that differ only there need no relaunch. */
function machineOf(d: VmDefinition): Omit<VmDefinition, 'labels'> {
  const { labels: _labels, ...machine } = d
  return machine
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
