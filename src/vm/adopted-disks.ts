// Finds the disks of a QEMU qmpd adopted from its block graph (query-block); reads QEMU, writes nothing.
import { isAbsolute } from 'node:path'
import { deviceId } from '../images/graph.ts'
import type { QmpClient } from '../qmp/index.ts'
import type { VmRuntime } from './definition.ts'

/** One disk of a VM's runtime record: its id, active file, format and node generation. */
export type RuntimeDisk = VmRuntime['disks'][number]

/** A block device of the adopted QEMU that qmpd leaves alone, and why. */
export interface SkippedDisk {
  id: string
  reason: string
}

/** What discovery found: the disks qmpd snapshots, and the devices it leaves out. */
export interface AdoptedDisks {
  disks: RuntimeDisk[]
  skipped: SkippedDisk[]
}

/** Disk ids qmpd can use in node and file names (`<id>-f<N>`, `<id>-<snapshot>.qcow2`) and in a RegExp as they are. */
const SAFE_ID = /^[A-Za-z][A-Za-z0-9_-]{0,31}$/

/**
 * The adopted QEMU's disks as its block graph has them now: per guest device (the -device id,
 * or the BlockBackend name of a -drive without one) the file and format of its active layer.
 * Left out: empty drives, read-only and removable media (CD-ROMs, floppies: never snapshotted),
 * formats other than qcow2 and raw, and layers QEMU opened by a relative name or a json:/protocol
 * name (qmpd matches layers by absolute file name, and an overlay's backing must open from any cwd).
 * Node names are never stored: `liveChain()` and `topNodes()` read them before each operation, so
 * `-drive`'s generated names (`#block123`) work like -blockdev's. The node generation starts above
 * any `<id>-f<N>` node QEMU already has (overlays qmpd added before a daemon restart) and never
 * goes below the one `previous` recorded, so a new overlay's node name is never taken.
 */
export async function discoverAdoptedDisks(qmp: QmpClient, previous: readonly RuntimeDisk[] = []): Promise<AdoptedDisks> {
  const [blocks, nodes] = await Promise.all([qmp.execute('query-block'), qmp.execute('query-named-block-nodes', { flat: true })])
  const names = nodes.map((n) => n['node-name']).filter((n): n is string => !!n)
  const disks: RuntimeDisk[] = []
  const skipped: SkippedDisk[] = []
  for (const b of blocks) {
    const id = deviceId(b)
    const ins = b.inserted
    if (!SAFE_ID.test(id)) {
      skipped.push({ id, reason: 'the device has neither an id nor a drive name qmpd can name files after' })
      continue
    }
    if (!ins) {
      skipped.push({ id, reason: 'empty drive (no medium)' })
      continue
    }
    if (ins.ro || b.removable) {
      skipped.push({ id, reason: ins.ro ? 'read-only' : 'removable medium' })
      continue
    }
    const file = ins.image.filename
    const format = ins.drv
    if (format !== 'qcow2' && format !== 'raw') {
      skipped.push({ id, reason: `format ${format}: qmpd snapshots qcow2 and raw` })
      continue
    }
    if (!isAbsolute(file)) {
      skipped.push({ id, reason: `QEMU opened ${file} by a relative or protocol name; give QEMU absolute paths to have it snapshotted` })
      continue
    }
    const re = new RegExp(`^${id}-f(\\d+)$`)
    const inGraph = Math.max(0, ...names.map((n) => Number(re.exec(n)?.[1] ?? 0)))
    const before = previous.find((d) => d.id === id)?.gen ?? 0
    disks.push({ id, file, format, gen: Math.max(inGraph, before) })
  }
  return { disks, skipped }
}

/**
 * The runtime disks of an adopted VM after a re-attach: disks the store knows keep their recorded
 * active file (recovery of an interrupted operation and then reconcile compare it with QEMU, as
 * for VMs qmpd launched), with the generation raised past QEMU's nodes; devices the store does not
 * know yet are added, and devices QEMU no longer has are dropped.
 */
export function mergeAdoptedDisks(stored: readonly RuntimeDisk[], found: readonly RuntimeDisk[]): RuntimeDisk[] {
  return found.map((f) => {
    const s = stored.find((d) => d.id === f.id)
    return s ? { ...s, gen: Math.max(s.gen, f.gen) } : f
  })
}
