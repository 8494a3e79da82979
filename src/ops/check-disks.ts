// The check's disk findings (store against QEMU's chains and the image headers); changes nothing.
import { existsSync } from 'node:fs'
import { toQmpdError } from '../errors.ts'
import { deviceId } from '../images/graph.ts'
import type { ImageInfo } from '../qmp/commands.ts'
import { isAdopted } from '../vm/definition.ts'
import type { CheckRun } from './check-context.ts'

/** One layer of a disk's chain as QEMU or the image headers have it, top first. */
interface Layer {
  file: string
  format: string
}

/** Deeper than any chain qmpd builds; stops a loop of backing files. */
const MAX_CHAIN = 256

/**
 * Each disk of the store: its active file exists; QEMU's top file of the device (matched by the
 * -device id) is that file; and each layer below is the image graph's backing of the layer above
 * (where the graph has a row). With no live QEMU the chain comes from the image headers.
 */
export async function checkDisks(run: CheckRun): Promise<void> {
  await Promise.all(run.rec.runtime.disks.map((d) => checkDisk(run, d)))
}

async function checkDisk(run: CheckRun, d: { id: string; file: string; format: 'qcow2' | 'raw'; gen: number }): Promise<void> {
  run.counts.disks++
  const present = existsSync(d.file)
  if (!present) {
    run.add({
      code: 'DISK_FILE_MISSING',
      message: `disk ${d.id}: its active file ${d.file} does not exist`,
      store: d.file,
      repair: 'none automatic: flags the VM needs-repair (restore the file, or point the disk at an existing layer)',
    })
  }
  let chain: Layer[]
  if (run.live) {
    const dev = run.live.blocks.find((b) => deviceId(b) === d.id && b.inserted)
    if (!dev?.inserted) {
      run.add({
        code: 'DISK_NOT_IN_QEMU',
        message: `disk ${d.id}: QEMU has no device ${d.id} with a medium`,
        store: d.file,
        repair: 'none automatic: flags the VM needs-repair',
      })
      return
    }
    chain = []
    for (let img: ImageInfo | undefined = dev.inserted.image; img && chain.length < MAX_CHAIN; img = img['backing-image']) {
      chain.push({ file: img.filename, format: img.format })
    }
    const top = chain[0]
    if (top && top.file !== d.file) await topMismatch(run, d, chain)
  } else {
    if (!present || isAdopted(run.rec.definition)) return // no QEMU: nothing qmpd may read it through
    try {
      chain = await headerChain(run, d.file)
    } catch (err) {
      run.add({
        code: 'CHAIN_UNREADABLE',
        message: `disk ${d.id}: the backing chain of ${d.file} cannot be read: ${toQmpdError(err).message}`,
        store: d.file,
        repair: 'none automatic: flags the VM needs-repair (a layer is missing or damaged)',
      })
      return
    }
  }
  for (const l of chain) run.chainFiles.add(l.file)
  compareWithGraph(run, d.id, chain)
}

/** The chain below `file` from the image headers (qemu-img info -U of each layer). */
async function headerChain(run: CheckRun, file: string): Promise<Layer[]> {
  const chain: Layer[] = []
  for (let f: string | undefined = file; f && chain.length < MAX_CHAIN; ) {
    const info = await run.info(f)
    chain.push({ file: f, format: info.format })
    f = info['full-backing-filename']
  }
  return chain
}

/** Each layer's next one must be the graph's backing of it, where the graph knows the layer. */
function compareWithGraph(run: CheckRun, disk: string, chain: Layer[]): void {
  chain.forEach((layer, i) => {
    const row = run.graph.get(layer.file)
    if (!row) return
    const below = chain[i + 1]?.file ?? null
    // A user's base image is recorded as a root of the graph without reading its header.
    if (row.backing === null && !row.createdByQmpd) return
    if (row.backing !== below) {
      run.add({
        code: 'CHAIN_MISMATCH',
        message: `disk ${disk}: below ${layer.file} ${run.live ? 'QEMU has' : 'the image header names'} ${below ?? 'nothing'}, the image graph says ${row.backing ?? 'nothing'}`,
        store: row.backing,
        actual: below,
        repair: 'none automatic: flags the VM needs-repair',
      })
    }
  })
}

/**
 * QEMU runs the disk on another file than the store says. When that file is reachable from the
 * stored layer (in the image graph, the stored layer's backing, or a layer on top of it), it is
 * a pivot the daemon did not live to record (commit, copy, snapshot), and the store may follow.
 */
async function topMismatch(run: CheckRun, d: { id: string; file: string; gen: number }, chain: Layer[]): Promise<void> {
  const top = chain[0]!
  const stored = d.file
  let backingOfStored = run.graph.get(stored)?.backing ?? undefined
  if (backingOfStored === undefined && existsSync(stored)) {
    backingOfStored = (await run.info(stored).catch(() => undefined))?.['full-backing-filename']
  }
  const why = run.graph.has(top.file)
    ? 'it is in the image graph'
    : chain.slice(1).some((l) => l.file === stored)
      ? `it lies on top of ${stored}`
      : top.file === backingOfStored
        ? `it is the backing file of ${stored}`
        : undefined
  const format = top.format === 'qcow2' || top.format === 'raw' ? top.format : undefined
  const base = {
    code: 'DISK_TOP_MISMATCH' as const,
    message: `disk ${d.id}: QEMU runs on ${top.file}, the store says ${stored}`,
    store: stored,
    actual: top.file,
  }
  if (!why || !format) {
    run.add({ ...base, repair: `none automatic: flags the VM needs-repair (${top.file} is not reachable from ${stored}${format ? '' : `, or its format ${top.format} is not qcow2/raw`})` })
    return
  }
  // The next qmpd node name is <disk>-f<gen+1>: keep it clear of every such name QEMU has now.
  const used = (run.live?.nodes ?? [])
    .map((n) => n['node-name']?.match(new RegExp(`^${d.id}-f(\\d+)$`))?.[1])
    .filter((g): g is string => g !== undefined)
    .map(Number)
  const gen = Math.max(d.gen + 1, ...used)
  run.add({
    ...base,
    repair: `the store follows QEMU (${why}): disk ${d.id}'s active layer becomes ${top.file}, node generation ${gen}`,
    fix: { kind: 'follow-top', disk: d.id, file: top.file, format, backing: chain[1]?.file ?? null, recordImage: !run.graph.has(top.file), gen },
  })
}

/** Every image graph row: its file exists and its header names the row's backing file. */
export async function checkImages(run: CheckRun): Promise<void> {
  // An adopted VM's images are read only through its QEMU (the disks' live chains), never with
  // qemu-img: its own are its owner's, often outside qmpd's roots, and qmpd's overlays back onto them.
  if (isAdopted(run.rec.definition)) return
  await Promise.all(
    run.images.map(async (row) => {
      run.counts.images++
      if (!existsSync(row.file)) {
        run.add({
          code: 'IMAGE_FILE_MISSING',
          message: `image graph: ${row.file} (disk ${row.disk}) does not exist`,
          store: row.file,
          repair: 'none automatic: flags the VM needs-repair (restore the file, or delete the snapshots that need it)',
        })
        return
      }
      let backing: string | null
      try {
        backing = (await run.info(row.file))['full-backing-filename'] ?? null
      } catch (err) {
        run.add({
          code: 'CHAIN_UNREADABLE',
          message: `image graph: ${row.file} cannot be read: ${toQmpdError(err).message}`,
          store: row.file,
          repair: 'none automatic: flags the VM needs-repair',
        })
        return
      }
      if (row.backing === null && !row.createdByQmpd) return // a user's base image: see compareWithGraph
      if (backing !== row.backing) {
        run.add({
          code: 'IMAGE_BACKING_MISMATCH',
          message: `image graph: ${row.file} is backed by ${backing ?? 'nothing'}, the graph says ${row.backing ?? 'nothing'}`,
          store: row.backing,
          actual: backing,
          repair: 'none automatic: flags the VM needs-repair',
        })
      }
    }),
  )
}
