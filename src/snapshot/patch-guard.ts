// What PATCH /v1/vms/{vm} may not do to a VM with snapshots: put a disk back on an image the
// snapshots hold, or change the firmware under them; reads the snapshot store, changes nothing.
import { QmpdError } from '../errors.ts'
import type { SnapshotRepo } from '../store/snapshots.ts'
import type { VmDefinition, VmRuntime } from '../vm/definition.ts'

/**
 * Refuses the runtime disks a patch would start (`fresh`: new disks, or disks whose file changed)
 * when one of them is a frozen image of the VM's snapshot graph: the backing image of an overlay,
 * or an image an external snapshot froze. The guest would write into what the snapshots read. A firmware change is refused while snapshots
 * exist: the NVRAM is part of each of them.
 * @throws QmpdError INVALID_STATE naming the disk and the image.
 */
export function assertPatchKeepsSnapshots(repo: SnapshotRepo, vm: string, before: VmDefinition, after: VmDefinition, fresh: VmRuntime['disks']): void {
  const snapshots = repo.list(vm)
  if (snapshots.length === 0) return
  if ((before.firmware ?? 'bios') !== (after.firmware ?? 'bios')) {
    throw new QmpdError('INVALID_STATE', `VM ${vm} has ${snapshots.length} snapshot(s), whose NVRAM or lack of one belongs to firmware ${before.firmware ?? 'bios'}: delete them before changing the firmware`, { vm })
  }
  const images = repo.images(vm)
  const frozen = new Set(images.flatMap((i) => (i.backing ? [i.backing] : [])))
  // An external snapshot's captured disks are its frozen images (an excluded disk's file is the
  // live one); an internal one's tags live in images the guest may go on writing (the tags stay).
  for (const s of snapshots) if (s.kind === 'external') for (const d of s.disks) if (d.mode === 'external') frozen.add(d.file)
  for (const d of fresh) {
    if (frozen.has(d.file)) {
      throw new QmpdError('INVALID_STATE', `disk ${d.id} would run on ${d.file}, an image that snapshots of VM ${vm} hold (the guest would write into them): give it another file`, { vm, disk: d.id, file: d.file })
    }
  }
}
