// A disk's live chain and nodes as QEMU has them now (query-block, query-named-block-nodes); never
// trusts stored node names.
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
 * @throws QmpdError DISK_NOT_FOUND when QEMU has no such disk; INTERNAL when a layer has no node; the QMP errors of execute().
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

/**
 * The qmpd disk id of a query-block entry: the -device id, read from the qdev path; for a device
 * without an id (an adopted QEMU's `-drive if=virtio,id=x`), the BlockBackend name. The pflash
 * devices of a UEFI VM are machine properties, not -devices: pflash1 is its NVRAM, which qmpd
 * treats as the disk `nvram` (src/vm/firmware.ts), pflash0 the read-only firmware code `fw-code`.
 */
export function deviceId(b: { device?: string; qdev?: string }): string {
  if (b.qdev === '/machine/system.flash1') return 'nvram'
  if (b.qdev === '/machine/system.flash0') return 'fw-code'
  return b.qdev?.match(/\/peripheral\/([^/]+)/)?.[1] ?? (b.device || b.qdev) ?? ''
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

/**
 * Deletes the disk's nodes that qmpd added (<disk>-f<gen>, <disk>-copy…) and that a commit,
 * stream or mirror pivot has dropped from the chain. Nodes made with -blockdev or blockdev-add
 * belong to the monitor and outlive their use; left there, they keep their backing nodes parented,
 * and the next block job fails with "Need a root block node". Repeats so that a dropped chain of
 * several such nodes goes top first; nodes still in use are left alone.
 */
export async function pruneDetachedNodes(qmp: QmpClient, diskId: string): Promise<string[]> {
  const pattern = new RegExp(`^${diskId}-(f\\d+|copy\\w+)$`)
  const removed: string[] = []
  for (let pass = 0; pass < 4; pass++) {
    const inChain = new Set((await liveChain(qmp, diskId)).map((l) => l.node))
    const orphans = (await qmp.execute('query-named-block-nodes', { flat: true }))
      .map((n) => n['node-name'])
      .filter((n): n is string => !!n && pattern.test(n) && !inChain.has(n))
    let progress = false
    for (const node of orphans) {
      try {
        await qmp.execute('blockdev-del', { 'node-name': node })
        removed.push(node)
        progress = true
      } catch {
        // in use by another orphan (deleted in a later pass) or not owned by the monitor
      }
    }
    if (!progress) break
  }
  return removed
}

/** Per QMP session: which node each device is attached to, and the graph epoch it was read at. */
const topCache = new WeakMap<QmpClient, { epoch: number; nodes: ReadonlyMap<string, string> }>()

/**
 * The current top node of each disk: the node QEMU's device is attached to right now. Read with
 * one query-block (no query-named-block-nodes, which grows quadratically with the chain) and kept
 * until the client sends a command that may change the graph (QmpClient.graphEpoch), so a
 * series of snapshots costs no query at all.
 * @throws QmpdError DISK_NOT_FOUND when QEMU has no such disk; the QMP errors of execute().
 */
export async function topNodes(qmp: QmpClient, diskIds: string[]): Promise<Map<string, string>> {
  let known = topCache.get(qmp)
  if (!known || known.epoch !== qmp.graphEpoch || !diskIds.every((id) => known!.nodes.has(id))) {
    const epoch = qmp.graphEpoch
    const nodes = new Map<string, string>()
    for (const b of await qmp.execute('query-block')) {
      const node = b.inserted?.['node-name']
      if (node) nodes.set(deviceId(b), node)
    }
    known = { epoch, nodes }
    topCache.set(qmp, known)
  }
  const out = new Map<string, string>()
  for (const id of diskIds) {
    const node = known.nodes.get(id)
    if (!node) throw new QmpdError('DISK_NOT_FOUND', `QEMU has no disk ${id}`, { disk: id })
    out.set(id, node)
  }
  return out
}

/**
 * Records the top nodes a command qmpd just sent has set (a snapshot transaction), so the next
 * topNodes() needs no query. `epochBefore` is qmp.graphEpoch read just before that command: when
 * anything else changed the graph in between, nothing is recorded.
 */
export function noteTopNodes(qmp: QmpClient, epochBefore: number, changed: ReadonlyMap<string, string>): void {
  const known = topCache.get(qmp)
  if (!known || known.epoch !== epochBefore || qmp.graphEpoch !== epochBefore + 1) return
  topCache.set(qmp, { epoch: qmp.graphEpoch, nodes: new Map([...known.nodes, ...changed]) })
}
