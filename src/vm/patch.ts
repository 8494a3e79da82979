// What PATCH /v1/vms/{vm} changes: the merged definition and the runtime disks that follow from
// it; pure, touches neither the store nor files (VmManager.patch does, after PathPolicy checks).
import { QmpdError } from '../errors.ts'
import { VmDefinition, type VmRuntime } from './definition.ts'
import { mergePatch } from './merge-patch.ts'

/**
 * The stored definition `current` with the JSON merge patch `patch` applied (RFC 7386), parsed by
 * the very schema POST /v1/vms uses: fields other code adds to VmDefinition patch the same way.
 * Paths are not resolved here.
 * @throws QmpdError INVALID_INPUT when the patch is not an object, renames the VM, or the result
 *   fails the schema.
 */
export function patchedDefinition(current: VmDefinition, patch: unknown): VmDefinition {
  if (typeof patch !== 'object' || patch === null || Array.isArray(patch)) {
    throw new QmpdError('INVALID_INPUT', 'a merge patch of a VM definition must be a JSON object', {})
  }
  if ('name' in patch && patch.name !== current.name) {
    throw new QmpdError('INVALID_INPUT', `name cannot change (${current.name}): define a new VM instead`, { vm: current.name })
  }
  const merged = mergePatch(current, patch) as Record<string, unknown>
  // vnc is one of two shapes ({unix} or {port}): a patch names the new one whole, not a merge of both.
  if ('vnc' in patch && patch.vnc !== null) merged['vnc'] = patch.vnc
  const r = VmDefinition.safeParse(merged)
  if (!r.success) {
    const where = r.error.issues.map((i) => `/${i.path.map(String).join('/')} ${i.message}`).join('; ')
    throw new QmpdError('INVALID_INPUT', `the patched definition is invalid: ${where}`, { issues: r.error.issues })
  }
  return keepMacs(current, r.data)
}

/**
 * A merge patch replaces `nics` whole: a NIC it names again by id without a MAC keeps the MAC
 * it had (generated at define, stable from then on); only new NICs get a new one at resolve time.
 */
function keepMacs(before: VmDefinition, after: VmDefinition): VmDefinition {
  if (!after.nics) return after
  const taken = new Set(after.nics.flatMap((n) => (n.mac ? [n.mac] : [])))
  const nics = after.nics.map((n) => {
    if (n.mac) return n
    const mac = before.nics?.find((o) => o.id === n.id)?.mac
    if (!mac || taken.has(mac)) return n
    taken.add(mac)
    return { ...n, mac }
  })
  return { ...after, nics }
}

/**
 * The runtime disks of a VM whose definition goes from `before` to `after`: a disk that keeps its
 * id and file keeps its active layer (external snapshots may have moved it above the file); a new
 * disk, or one whose file changed, starts at that file; a removed disk is dropped (its files stay).
 */
export function disksAfterPatch(before: VmDefinition, after: VmDefinition, active: VmRuntime['disks']): VmRuntime['disks'] {
  return after.disks.map((d) => {
    const was = before.disks.find((x) => x.id === d.id)
    const cur = active.find((x) => x.id === d.id)
    if (was && cur && was.file === d.file && was.format === d.format) return cur
    return { id: d.id, file: d.file, format: d.format, gen: (cur?.gen ?? -1) + 1 }
  })
}
