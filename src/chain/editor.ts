// Backing-chain edits (commit, pull, copy) as steps on QEMU or qemu-img, with their image-graph
// updates; no HTTP, no job queueing.
import { blockdevProps } from '../vm/disk-options.ts'
import { existsSync, rmSync } from 'node:fs'
import type { Logger } from 'pino'
import { QmpdError } from '../errors.ts'
import { liveChain, pruneDetachedNodes } from '../images/graph.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import { commitJob, driveQemuJob, streamJob } from '../jobs/qemu-job.ts'
import type { QmpClient } from '../qmp/index.ts'
import type { ImageRow } from '../store/snapshots.ts'
import { ensureBaseImages, formatOf, imageRow, removeIfUnneeded, trackChain, type GraphDeps, type Layer } from './graph.ts'

/**
 * The one backing-chain editor: commit, stream and mirror, each live (a QEMU block job on the
 * running chain) or offline (qemu-img), and the image-graph updates that follow them (image rows,
 * the VM's active layer, snapshot records whose file moved). Snapshot delete and the block-job
 * routes both edit chains through these functions; they decide what to edit, this does it.
 */
export interface ChainDeps extends GraphDeps {
  qemuImg: QemuImg
}

/** How a live edit's QEMU job is driven (see driveQemuJob). */
export interface LiveJob {
  jobId: string
  log: Logger
  signal?: AbortSignal
  speed?: number
  onProgress?: (current: number, total: number) => void
  /** Active commit or mirror: whether to pivot once READY (default: yes). */
  onReady?: () => boolean
  onStatus?: (status: string) => void
}

// ---------- commit ----------

/**
 * Commits layers[top..base-1] into layers[base]. Live (`qmp`, layers with nodes, device
 * layers[0]): block-commit, which for the active layer (top 0) becomes READY and pivots to base
 * unless job.onReady says no; the nodes the chain dropped are deleted. Offline: qemu-img commit
 * (-d: top keeps its data); with `progress` it runs with -p and reports percent. Then the images
 * in `above.files` (what was layered on top, outside what QEMU rewrote itself) are rebased onto
 * base by header only: base now holds what top did.
 */
export async function commit(
  d: ChainDeps,
  req: {
    disk: string
    qmp?: QmpClient
    layers: Layer[]
    top: number
    base: number
    job: LiveJob
    progress?: (percent: number) => void
    above?: { files: string[]; backing?: { file: string; format: string } }
  },
): Promise<void> {
  const { layers, top, base } = req
  if (req.qmp) {
    const { job } = req
    await commitJob(
      req.qmp,
      { jobId: job.jobId, device: layers[0]!.node!, top: layers[top]!.node!, base: layers[base]!.node!, ...(job.speed ? { speed: job.speed } : {}) },
      {
        log: job.log,
        ...(job.signal ? { signal: job.signal } : {}),
        ...(job.onProgress ? { onProgress: job.onProgress } : {}),
        ...(job.onReady ? { onReady: job.onReady } : {}),
        ...(job.onStatus ? { onStatus: job.onStatus } : {}),
      },
    )
    await pruneDetachedNodes(req.qmp, req.disk)
  } else if (req.progress) {
    const p = req.progress
    await d.qemuImg.runWithProgress(['commit', '-p', '-d', '-f', layers[top]!.format, '-b', layers[base]!.file, layers[top]!.file], (x) => p(x))
  } else {
    await d.qemuImg.commit(layers[top]!.file, layers[base]!.file)
  }
  const backing = req.above?.backing ?? { file: layers[base]!.file, format: layers[base]!.format }
  for (const f of req.above?.files ?? []) await d.qemuImg.rebase(f, backing, { unsafe: true })
}

/**
 * Image graph after a commit of layers[top..base-1] into layers[base] (block-job commit): every
 * layer recorded, the image above top backed by base, the VM's active layer moved to base when
 * the commit pivoted. Then removes the merged layers nothing needs (none when `keep`, nor after
 * an active commit that did not pivot); returns the files removed.
 */
export function afterCommit(
  g: GraphDeps,
  vm: string,
  disk: string,
  layers: Layer[],
  top: number,
  base: number,
  opts: { activeMoved: boolean; keep: boolean },
  ctx: { log: Logger },
): string[] {
  const baseLayer = layers[base]!
  g.repo.tx(() => {
    ensureBaseImages(g, vm)
    trackChain(g, vm, disk, layers)
    if (top > 0) g.repo.putImage({ ...imageRow(g, vm, disk, layers[top - 1]!), backing: baseLayer.file })
    if (opts.activeMoved) {
      const rt = g.vms.record(vm).runtime
      g.vms.updateRuntime(vm, {
        disks: rt.disks.map((x) => (x.id === disk ? { ...x, file: baseLayer.file, format: baseLayer.format === 'raw' ? 'raw' : 'qcow2' } : x)),
      })
    }
  })
  if (opts.keep || (top === 0 && !opts.activeMoved)) return []
  return layers.slice(top, base).filter((l) => removeIfUnneeded(g, vm, l.file, ctx)).map((l) => l.file)
}

/**
 * Image graph after child C was committed into its backing F (snapshot delete): F now holds
 * exactly what C held, so every user of C (images layered on it, snapshot records, the VM's active
 * layer) uses F instead, and C's row and file go.
 */
export function mergedInto(g: GraphDeps, vm: string, C: string, F: string): void {
  g.repo.tx(() => {
    for (const gk of g.repo.images(vm).filter((i) => i.backing === C)) g.repo.putImage({ ...gk, backing: F })
    for (const snap of g.repo.list(vm)) {
      if (snap.disks.some((x) => x.file === C)) g.repo.put({ ...snap, disks: snap.disks.map((x) => (x.file === C ? { ...x, file: F } : x)) })
    }
    const rt = g.vms.record(vm).runtime
    if (rt.disks.some((x) => x.file === C)) {
      g.vms.updateRuntime(vm, { disks: rt.disks.map((x) => (x.file === C ? { ...x, file: F, format: formatOf(g.repo.images(vm), F) } : x)) })
    }
    g.repo.deleteImage(vm, C)
  })
  rmSync(C, { force: true })
}

// ---------- stream (pull) ----------

/**
 * Copies into `into` the data of every layer between it and `base` (all below it when base is
 * null), so that it no longer needs them; its backing becomes base. Live (`qmp`, layers with
 * nodes): block-stream, then the dropped nodes are deleted. Offline: qemu-img rebase in safe
 * mode; with `progress` it runs with -p and reports percent.
 */
export async function stream(
  d: ChainDeps,
  req: { disk: string; qmp?: QmpClient; into: Layer; base: Layer | null; job: LiveJob; progress?: (percent: number) => void },
): Promise<void> {
  const { into, base } = req
  if (req.qmp) {
    const { job } = req
    await streamJob(
      req.qmp,
      { jobId: job.jobId, device: into.node!, ...(base?.node ? { base: base.node } : {}), ...(job.speed ? { speed: job.speed } : {}) },
      {
        log: job.log,
        ...(job.signal ? { signal: job.signal } : {}),
        ...(job.onProgress ? { onProgress: job.onProgress } : {}),
        ...(job.onStatus ? { onStatus: job.onStatus } : {}),
      },
    )
    await pruneDetachedNodes(req.qmp, req.disk)
  } else if (req.progress) {
    const p = req.progress
    const args = ['rebase', '-p', '-f', into.format, '-b', base?.file ?? '']
    if (base) args.push('-F', base.format)
    await d.qemuImg.runWithProgress([...args, into.file], (x) => p(x))
  } else {
    await d.qemuImg.rebase(into.file, base ? { file: base.file, format: base.format } : null)
  }
}

/** Image graph after a pull into the active layer down to layers[base] (or everything); removes what nothing needs unless `keep`. */
export function afterPull(g: GraphDeps, vm: string, disk: string, layers: Layer[], base: number, keep: boolean, ctx: { log: Logger }): string[] {
  g.repo.tx(() => {
    ensureBaseImages(g, vm)
    trackChain(g, vm, disk, layers)
    g.repo.putImage({ ...imageRow(g, vm, disk, layers[0]!), backing: base < layers.length ? layers[base]!.file : null })
  })
  if (keep) return []
  return layers.slice(1, base).filter((l) => removeIfUnneeded(g, vm, l.file, ctx)).map((l) => l.file)
}

/**
 * Image graph after F was streamed into each of `kids` (snapshot delete of a branch point): they
 * are backed by F's backing now, and F leaves the graph; its file goes too when qmpd created it.
 */
export function streamedOut(g: GraphDeps, vm: string, F: string, img: ImageRow | undefined, kids: ImageRow[], backing: string | null): void {
  g.repo.tx(() => {
    for (const K of kids) g.repo.putImage({ ...K, backing })
  })
  if (img?.createdByQmpd) {
    rmSync(F, { force: true })
    g.repo.deleteImage(vm, F)
  } else if (img) {
    g.repo.deleteImage(vm, F)
  }
}

// ---------- mirror (copy) ----------

/** The node name of a copy's target (the suffix is unique per job). */
export function copyNode(disk: string, suffix: string): string {
  return `${disk}-copy${suffix}`
}

/**
 * Copies the disk's active layer (with everything below it, or only itself onto the same backing
 * when `shallow`) to the new file `dest`. Live: blockdev-mirror to a node added for dest; once
 * READY it pivots when `pivot`, else the job waits in ready (job.onReady decides); cancelled after
 * READY it keeps a point-in-time copy and the VM stays on its source. Offline: qemu-img convert.
 * `beforeJob` runs once the target exists, right before the job starts (job controls). Records
 * the result: the new active layer when pivoted, else dest among the VM's created files.
 */
export async function mirror(
  d: ChainDeps,
  req: {
    vm: string
    disk: string
    qmp?: QmpClient
    layers: Layer[]
    dest: string
    format: 'qcow2' | 'raw'
    shallow: boolean
    pivot: boolean
    /** Suffix of the target node's name (unique per job). */
    nodeSuffix: string
    job: LiveJob
    progress?: (percent: number) => void
    beforeJob?: () => void
    /** Live: right before the pivot READY leads to, with the copy's node. */
    beforePivot?: (node: string) => Promise<void>
  },
): Promise<{ pivoted: boolean }> {
  const { vm, disk, qmp, layers, dest, format, job } = req
  const backing = req.shallow && layers.length > 1 ? layers[1]! : undefined
  if (!qmp) {
    try {
      const args = ['convert', '-p', '-f', layers[0]!.format, '-O', format]
      if (backing) args.push('-B', backing.file, '-F', backing.format)
      await d.qemuImg.runWithProgress([...args, layers[0]!.file, dest], (p) => req.progress?.(p), job.signal)
    } catch (err) {
      rmSync(dest, { force: true })
      throw err
    }
    if (req.pivot) switchActive(d, vm, disk, dest, format, backing?.file ?? null)
    else d.vms.updateRuntime(vm, { createdFiles: [...d.vms.record(vm).runtime.createdFiles, dest] })
    return { pivoted: req.pivot }
  }
  let pivoted = false
  const size = (await qmp.execute('query-named-block-nodes', { flat: true })).find((n) => n['node-name'] === layers[0]!.node)?.image['virtual-size']
  if (!size) throw new QmpdError('INTERNAL', `cannot read the size of disk ${disk}`, { disk })
  // -u: the backing is open in QEMU; the size is given, so qemu-img need not open it.
  const create = ['create', '-q', '-f', format]
  if (backing) create.push('-u', '-b', backing.file, '-F', backing.format)
  await d.qemuImg.run([...create, dest, String(size)])
  const node = copyNode(disk, req.nodeSuffix)
  const jobId = job.jobId
  let added = false
  let readySeen = false
  try {
    // The copy takes the disk's place on a pivot: it gets the disk's cache/aio/discard options.
    const def = d.vms.record(vm).definition
    const props = blockdevProps('disks' in def ? def.disks.find((x) => x.id === disk) : undefined)
    await qmp.execute('blockdev-add', {
      driver: format,
      'node-name': node,
      ...props.format,
      file: { driver: 'file', filename: dest, ...props.file },
      ...(format === 'qcow2' ? { backing: backing ? backing.node! : null } : {}),
    } as never)
    added = true
    req.beforeJob?.()
    // READY = synchronized: job-complete pivots to the copy; job-cancel after READY keeps a
    // point-in-time copy and leaves the VM on its source.
    await driveQemuJob(
      qmp,
      jobId,
      () =>
        qmp.execute('blockdev-mirror', {
          'job-id': jobId,
          device: layers[0]!.node!,
          target: node,
          sync: backing ? 'top' : 'full',
          ...(job.speed ? { speed: job.speed } : {}),
          'auto-finalize': false,
          'auto-dismiss': false,
        }),
      {
        log: job.log,
        ...(job.signal ? { signal: job.signal } : {}),
        ...(job.onProgress ? { onProgress: job.onProgress } : {}),
        onReady: async () => {
          readySeen = true
          const go = job.onReady ? job.onReady() : true
          if (go) await req.beforePivot?.(node)
          return go
        },
        ...(job.onStatus ? { onStatus: job.onStatus } : {}),
      },
    )
    pivoted = (await liveChain(qmp, disk))[0]?.file === dest
    if (pivoted) await pruneDetachedNodes(qmp, disk)
  } catch (err) {
    const keptCopy = readySeen && err instanceof QmpdError && err.code === 'JOB_CANCELLED'
    if (!keptCopy) {
      if (added) await qmp.execute('blockdev-del', { 'node-name': node }).catch(() => {})
      rmSync(dest, { force: true })
      throw err
    }
  }
  if (pivoted) {
    switchActive(d, vm, disk, dest, format, backing?.file ?? null)
  } else {
    // Cancelled after READY: the copy is a consistent image of the moment of the cancel.
    await qmp.execute('blockdev-del', { 'node-name': node }).catch((err) => job.log.warn({ err }, 'blockdev-del of the copy failed'))
    d.vms.updateRuntime(vm, { createdFiles: [...d.vms.record(vm).runtime.createdFiles, dest] })
  }
  return { pivoted }
}

/** The disk now runs on `file`: record it as the active layer and in the image graph. */
export function switchActive(g: GraphDeps, vm: string, disk: string, file: string, format: 'qcow2' | 'raw', backing: string | null): void {
  g.repo.tx(() => {
    ensureBaseImages(g, vm)
    g.repo.putImage({ vm, disk, file, format, backing, createdByQmpd: true })
    const rt = g.vms.record(vm).runtime
    g.vms.updateRuntime(vm, {
      disks: rt.disks.map((x) => (x.id === disk ? { ...x, file, format, gen: x.gen + 1 } : x)),
      createdFiles: [...rt.createdFiles, file],
    })
  })
}

/** Images layered on `file` whose files exist, except `except` (rebased by QEMU itself). */
export function usersOf(g: GraphDeps, vm: string, file: string, except?: string): ImageRow[] {
  return g.repo.images(vm).filter((i) => i.backing === file && i.file !== except && existsSync(i.file))
}
