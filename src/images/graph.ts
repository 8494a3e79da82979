import { QmpdError } from '../errors.ts'
import type { QmpClient } from '../qmp/index.ts'

/** One layer of a disk's live chain, top first: its node name in QEMU and its file. */
export interface LiveLayer {
  node: string
  file: string
  format: string
}

const FORMAT_DRIVERS = new Set(['qcow2', 'raw', 'qed', 'vmdk', 'vpc', 'vdi'])

/**
 * The disk's backing chain as QEMU has it now, top first, with the node name of every layer.
 * Always read afresh: block jobs and snapshots insert and remove nodes, and layers QEMU opened
 * from a backing-file header get generated names (#blockNNN).
 */
export async function liveChain(qmp: QmpClient, diskId: string): Promise<LiveLayer[]> {
  const [blocks, nodes] = await Promise.all([qmp.execute('query-block'), qmp.execute('query-named-block-nodes', { flat: true })])
  const dev = blocks.find((b) => deviceId(b) === diskId)
  if (!dev?.inserted) throw new QmpdError('DISK_NOT_FOUND', `QEMU has no disk ${diskId}`, { disk: diskId })
  const byFile = new Map<string, { node: string; format: string }>()
  for (const n of nodes) {
    if (n['node-name'] && FORMAT_DRIVERS.has(n.drv) && !byFile.has(n.file)) byFile.set(n.file, { node: n['node-name'], format: n.drv })
  }
  const layers: LiveLayer[] = []
  for (let img: { filename: string; format: string; 'backing-image'?: unknown } | undefined = dev.inserted.image; img; img = img['backing-image'] as typeof img) {
    const n = byFile.get(img.filename)
    if (!n) throw new QmpdError('INTERNAL', `no QEMU node for ${img.filename} of disk ${diskId}`, { disk: diskId })
    layers.push({ node: n.node, file: img.filename, format: n.format })
  }
  return layers
}

/** The qmpd disk id of a query-block entry: the -device id, read from the qdev path. */
export function deviceId(b: { device?: string; qdev?: string }): string {
  return b.qdev?.match(/\/peripheral\/([^/]+)/)?.[1] ?? b.qdev ?? b.device ?? ''
}

/** Internal snapshot tags per image file, as QEMU sees them (query-named-block-nodes). */
export async function liveInternalSnapshots(qmp: QmpClient): Promise<Map<string, Array<{ name: string; vmStateSize: number }>>> {
  const out = new Map<string, Array<{ name: string; vmStateSize: number }>>()
  for (const n of await qmp.execute('query-named-block-nodes', { flat: true })) {
    if (!FORMAT_DRIVERS.has(n.drv)) continue
    const snaps = (n.image as { snapshots?: Array<{ name: string; 'vm-state-size': number }> }).snapshots ?? []
    out.set(n.file, snaps.map((s) => ({ name: s.name, vmStateSize: s['vm-state-size'] })))
  }
  return out
}
