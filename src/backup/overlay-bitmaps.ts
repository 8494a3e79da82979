// Gives the new overlays of an external snapshot the persistent bitmaps of the VM's backup chains
// (live: actions for the snapshot's transaction; offline: qemu-img bitmap --add); never merges.
import type { QemuImg } from '../images/qemu-img.ts'
import type { TransactionAction } from '../qmp/commands.ts'
import { readManifest } from './manifest.ts'

/**
 * The bitmap names of the chains that cover `disk` (none for a VM without backups, and none when
 * its manifest does not parse: a broken backups.json must not block snapshots; the next backup
 * then finds a layer without the bitmap and runs full, saying why).
 */
function chainBitmaps(vmDir: string, disk: string): string[] {
  try {
    return readManifest(vmDir)
      .chains.filter((c) => c.disks.includes(disk))
      .map((c) => c.bitmap)
  } catch {
    return []
  }
}

/**
 * block-dirty-bitmap-add actions that give each new overlay node the persistent bitmap of every
 * backup chain of its disk, in the same transaction as the overlays: no guest write falls between.
 */
export function overlayBitmapActions(vmDir: string, overlays: ReadonlyArray<{ disk: string; node: string }>): TransactionAction[] {
  return overlays.flatMap((o) =>
    chainBitmaps(vmDir, o.disk).map((name): TransactionAction => ({ type: 'block-dirty-bitmap-add', data: { node: o.node, name, persistent: true } })),
  )
}

/**
 * Adds the chains' bitmaps of `disk` to a new offline overlay (qemu-img bitmap --add; empty: no
 * write happened on the overlay yet).
 * @throws QmpdError QEMU_IMG_FAILED, QEMU_NOT_FOUND.
 */
export async function addOfflineOverlayBitmaps(qemuImg: QemuImg, vmDir: string, disk: string, file: string): Promise<void> {
  for (const name of chainBitmaps(vmDir, disk)) await qemuImg.run(['bitmap', '--add', '-f', 'qcow2', file, name])
}
