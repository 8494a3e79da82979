// Snapshot deletion as a journaled step program (merge external images, drop tags, forget); no
// HTTP.
import { existsSync, rmSync } from 'node:fs'
import { z } from 'zod'
import { commit, mergedInto, stream, streamedOut, usersOf } from '../chain/editor.ts'
import { ensureBaseImages, formatOf } from '../chain/graph.ts'
import { QmpdError, toQmpdError } from '../errors.ts'
import { liveChain, liveInternalSnapshots, topNodes, type LiveLayer } from '../images/graph.ts'
import type { JobContext } from '../jobs/manager.ts'
import type { Job } from '../jobs/model.ts'
import type { Operation } from '../ops/journal.ts'
import { driveQemuJob } from '../jobs/qemu-job.ts'
import type { QmpClient } from '../qmp/index.ts'
import type { ImageRow } from '../store/snapshots.ts'
import { requireAdoptedQemu } from '../vm/adopted.ts'
import { assertState, isRunningState } from '../vm/states.ts'
import { assertNoLinkedClones } from './clone.ts'
import { mustSnapshot, type SnapshotDeps } from './deps.ts'
import { qemuGone } from './files.ts'
import { sleep } from '../util.ts'
import type { Snapshot, SnapshotDisk } from './model.ts'
import { assertDeleteKeepsTags, assertTagsDeletableLive } from './mixed.ts'

/** What a delete does: children: the whole subtree; metadataOnly: forget, touch no file. */
export type DeleteOptions = { children?: boolean; metadataOnly?: boolean }

/** Validates and queues a delete (children: the whole subtree; metadataOnly: forget, touch no file). */
export function submitDelete(deps: SnapshotDeps, busyCheck: (vm: string, what: string) => void, vm: string, name: string, opts: DeleteOptions): Job {
  mustSnapshot(deps, vm, name)
  assertNoLinkedClones(deps, vm, name)
  busyCheck(vm, `delete snapshot ${name}`)
  const rec = deps.vms.record(vm)
  const st = rec.runtime.state
  assertState(vm, st, 'snapshot-delete')
  // Offline, a delete runs qemu-img on the files; an adopted VM's are its owner's (metadataOnly touches none).
  if (!opts.metadataOnly) {
    requireAdoptedQemu(vm, rec.definition, rec.runtime, `deleting snapshot ${name}`)
    // Mixed kinds: refused at once (409) when a tag would be lost or cannot be reached live.
    for (const n of opts.children ? subtreePostOrder(deps, vm, name) : [name]) {
      const s = mustSnapshot(deps, vm, n)
      assertDeleteKeepsTags(deps, vm, s)
      if (isRunningState(st)) assertTagsDeletableLive(deps, vm, s)
    }
  }
  return deps.jobs.submit({ vm, op: DELETE_OP, params: { snapshot: name, ...opts }, run: (ctx) => doDelete(deps, vm, name, opts, ctx) })
}

/** Journal name of a snapshot delete. */
export const DELETE_OP = 'snapshot-delete'

/** What a delete's journal entry holds: its request, and the files its current step may remove. */
export interface DeleteJournal extends DeleteOptions {
  snapshot: string
  remove?: string[]
}

/** DeleteJournal as read back from the journal. */
export const DeleteJournal = z.strictObject({
  snapshot: z.string(),
  remove: z.array(z.string()).optional(),
  children: z.boolean().optional(),
  metadataOnly: z.boolean().optional(),
}) satisfies z.ZodType<DeleteJournal>

/** Queues a delete again (crash recovery: a delete that began has merged data; it is finished). */
export function rerunDelete(deps: SnapshotDeps, vm: string, j: DeleteJournal): Job {
  const opts: DeleteOptions = { ...(j.children ? { children: true } : {}), ...(j.metadataOnly ? { metadataOnly: true } : {}) }
  return deps.jobs.submit({ vm, op: DELETE_OP, params: { snapshot: j.snapshot, ...opts, recovery: true }, run: (ctx) => doDelete(deps, vm, j.snapshot, opts, ctx) })
}

async function doDelete(deps: SnapshotDeps, vm: string, name: string, opts: DeleteOptions, ctx: JobContext): Promise<unknown> {
  mustSnapshot(deps, vm, name)
  const rec = deps.vms.record(vm)
  if (!opts.metadataOnly) requireAdoptedQemu(vm, rec.definition, rec.runtime, `deleting snapshot ${name}`)
  const j: DeleteJournal = { snapshot: name, ...opts }
  const o = deps.journal.begin({ vm, op: DELETE_OP, job: ctx.id, body: j, qemuPid: () => deps.vms.record(vm).runtime.pid })
  try {
    const out = await deleteSteps(deps, vm, name, opts, ctx, o, j)
    o.end()
    return out
  } catch (err) {
    if (o.begun.length === 0) {
      o.end()
      throw err
    }
    // Part of the data is merged already (a commit into a frozen image cannot be undone): the
    // delete is finished, never left half-done. Typically QEMU died under it; the rest is then
    // done offline. Should that fail too, the entry stays for recovery at the next start (and
    // the check reports it).
    ctx.log.warn({ err }, 'snapshot delete failed part-way; finishing it')
    await settleQemu(deps, vm)
    const out = await deleteSteps(deps, vm, name, opts, ctx, o, j)
    o.end()
    return { ...(out as object), finishedAfter: toQmpdError(err).message }
  }
}

/** Waits (bounded) until a QEMU that died is recorded as gone, so the next steps work offline. */
async function settleQemu(deps: SnapshotDeps, vm: string): Promise<void> {
  for (let i = 0; i < 200 && isRunningState(deps.vms.record(vm).runtime.state) && qemuGone(deps, vm); i++) await sleep(50)
}

async function deleteSteps(deps: SnapshotDeps, vm: string, name: string, opts: DeleteOptions, ctx: JobContext, o: Operation, j: DeleteJournal): Promise<unknown> {
  const order = opts.children ? subtreePostOrder(deps, vm, name) : [name]
  const results: unknown[] = []
  for (const n of order) {
    const s = mustSnapshot(deps, vm, n)
    const merges = opts.metadataOnly ? [] : await deleteData(deps, vm, s, ctx, o, j)
    await o.step('forget', () => deps.repo.tx(() => {
      for (const c of deps.repo.list(vm).filter((x) => x.parent === s.name)) {
        const { parent: _drop, ...rest } = c
        deps.repo.put(s.parent ? { ...rest, parent: s.parent } : rest)
      }
      deps.repo.delete(vm, s.name)
      if (deps.vms.record(vm).runtime.currentSnapshot === s.name) {
        const rt = deps.vms.record(vm).runtime
        const { currentSnapshot: _c, ...rest } = rt
        deps.vms.updateRuntime(vm, s.parent ? { ...rest, currentSnapshot: s.parent } : { ...rest, currentSnapshot: undefined })
      }
    }))
    results.push({ snapshot: n, merges })
    ctx.log.info({ snapshot: n, merges, metadataOnly: !!opts.metadataOnly }, 'snapshot deleted')
  }
  return { deleted: order, details: results }
}

function subtreePostOrder(deps: SnapshotDeps, vm: string, name: string): string[] {
  const all = deps.repo.list(vm)
  const out: string[] = []
  const walk = (n: string): void => {
    for (const c of all.filter((s) => s.parent === n)) walk(c.name)
    out.push(n)
  }
  walk(name)
  return out
}

/** Removes a snapshot's data: internal tags, or its images merged out of every chain that uses them. */
async function deleteData(deps: SnapshotDeps, vm: string, s: Snapshot, ctx: JobContext, o: Operation, j: DeleteJournal): Promise<string[]> {
  const st = deps.vms.record(vm).runtime.state
  const qmp = isRunningState(st) ? deps.vms.qmp(vm) : undefined
  const done: string[] = []
  if (s.kind === 'internal') {
    const captured = s.disks.filter((d) => d.mode === 'internal')
    if (qmp) {
      const tags = await liveInternalSnapshots(qmp)
      // A tag in an image QEMU does not have open (one an external snapshot's revert left
      // behind, on a VM with both kinds) is deleted with qemu-img, as offline.
      const open = new Set<string>()
      for (const d of captured) for (const l of await liveChain(qmp, d.id)) open.add(l.file)
      for (const d of captured.filter((x) => !open.has(x.file))) {
        await o.step('tags-offline', async () => {
          const info = await deps.qemuImg.chain(d.file)
          if (!info[0]?.snapshots?.some((t) => t.name === s.name)) return
          await deps.qemuImg.snapshot('delete', d.file, s.name)
          done.push(`deleted tag ${s.name} in ${d.file}`)
        })
      }
      const present = captured.filter((d) => open.has(d.file) && tags.get(d.file)?.some((t) => t.name === s.name))
      if (present.length === 0) return done
      const nodes = await topNodes(qmp, present.map((d) => d.id))
      // Verified above: snapshot-delete of a missing tag would "succeed" silently.
      const jobId = `qmpd-del-${ctx.id.slice(0, 8)}`
      await o.step('tags', () =>
        driveQemuJob(qmp, jobId, () => qmp.execute('snapshot-delete', { 'job-id': jobId, tag: s.name, devices: present.map((d) => nodes.get(d.id)!) }), {
          log: ctx.log,
          manualFinalize: false,
        }),
      )
      done.push(...present.map((d) => `deleted tag ${s.name} in ${d.file}`))
    } else {
      await o.step('tags', async () => {
        for (const d of captured) {
          const info = await deps.qemuImg.chain(d.file)
          if (!info[0]?.snapshots?.some((t) => t.name === s.name)) continue
          await deps.qemuImg.snapshot('delete', d.file, s.name)
          done.push(`deleted tag ${s.name} in ${d.file}`)
        }
      })
    }
    return done
  }
  ensureBaseImages(deps, vm)
  for (const d of s.disks.filter((x) => x.mode === 'external')) done.push(...(await mergeOut(deps, vm, s, d, qmp, ctx, o, j)))
  if (s.vmstateFile) {
    await o.step('remove-ram', () => rmSync(s.vmstateFile!, { force: true }))
    done.push(`removed ${s.vmstateFile}`)
  }
  return done
}

/**
 * Takes image F (the snapshot's frozen image of one disk) out of every chain without changing
 * what any chain reads: no child: remove it; one child C: commit C into F (cheap: C holds only
 * what changed since), then C's users use F; several children (branches): stream F into each.
 * The edits themselves are the chain editor's (src/chain/editor.ts).
 */
async function mergeOut(deps: SnapshotDeps, vm: string, s: Snapshot, d: SnapshotDisk, qmp: QmpClient | undefined, ctx: JobContext, o: Operation, j: DeleteJournal): Promise<string[]> {
  const F = d.file
  const images = deps.repo.images(vm).filter((i) => i.disk === d.id)
  const img = images.find((i) => i.file === F)
  const kids = images.filter((i) => i.backing === F && existsSync(i.file))
  const live = qmp ? await liveChain(qmp, d.id) : []
  const otherUsers = deps.repo.list(vm).filter((x) => x.name !== s.name && x.disks.some((y) => y.file === F && y.mode !== 'excluded'))
  if (otherUsers.length > 0) return [`${F} is still the image of snapshot ${otherUsers[0]!.name}; kept`]
  if (kids.length === 0) {
    // A delete run again after a crash may meet F as the layer a commit already merged into: it
    // is the active layer (or in use by QEMU) then, and stays.
    const inUse = live.some((l) => l.file === F) || deps.vms.record(vm).runtime.disks.some((x) => x.file === F)
    if (img?.createdByQmpd && !inUse) {
      await o.step('remove', () => {
        rmSync(F, { force: true })
        deps.repo.deleteImage(vm, F)
      }, { body: { ...j, remove: [F] } })
      return [`removed ${F}`]
    }
    return []
  }
  if (kids.length === 1) {
    const C = kids[0]!
    await o.step('commit', () => commitInto(deps, vm, d.id, C, F, live, qmp, ctx), { body: { ...j, remove: [C.file] } })
    return [`committed ${C.file} into ${F}`]
  }
  const backing = img?.backing ?? null
  const backingFormat = images.find((i) => i.file === backing)?.format ?? 'qcow2'
  await o.step('stream', async () => {
    for (const K of kids) await pullInto(deps, d.id, K, F, backing ? { file: backing, format: backingFormat } : null, live, qmp, ctx)
    streamedOut(deps, vm, F, img, kids, backing)
  }, { body: { ...j, ...(img?.createdByQmpd ? { remove: [F] } : {}) } })
  return [`streamed ${F} into ${kids.map((k) => k.file).join(', ')}${img?.createdByQmpd ? ` and removed it` : ' (your original image is left in place)'}`]
}

/** Commits child C into F; afterwards every user of C uses F, and C is removed. */
async function commitInto(deps: SnapshotDeps, vm: string, disk: string, C: ImageRow, F: string, live: LiveLayer[], qmp: QmpClient | undefined, ctx: JobContext): Promise<void> {
  const ci = live.findIndex((l) => l.file === C.file)
  const fi = live.findIndex((l) => l.file === F)
  if (qmp && ci < 0 && fi >= 0) {
    // F is in the running chain and its only child C is not: QEMU already committed C into F
    // (a delete run again after a crash). Only the records and the other branches' headers are left.
    const aboveF = fi > 0 ? live[fi - 1]!.file : undefined
    for (const u of usersOf(deps, vm, C.file, aboveF)) await deps.qemuImg.rebase(u.file, { file: F, format: formatOf(deps.repo.images(vm), F) }, { unsafe: true })
    mergedInto(deps, vm, C.file, F)
    return
  }
  const inRunningChain = !!qmp && ci >= 0 && fi === ci + 1
  if (!inRunningChain && ci >= 0) throw new QmpdError('INTERNAL', `${C.file} is in the running chain but ${F} is not right below it`, { disk })
  // F now holds exactly what C held: only the headers of C's children need to change. QEMU
  // rewrote the one in its running chain itself; every other branch is rebased here.
  const fFormat = formatOf(deps.repo.images(vm), F)
  const rewrittenByQemu = qmp && ci > 0 ? live[ci - 1]!.file : undefined
  const above = { files: usersOf(deps, vm, C.file, rewrittenByQemu).map((i) => i.file), backing: { file: F, format: fFormat } }
  const job = { jobId: `qmpd-commit-${disk}-${ctx.id.slice(0, 8)}`, log: ctx.log, onProgress: (c: number, t: number) => ctx.setProgress(c, t) }
  if (inRunningChain) {
    await commit(deps, { disk, qmp: qmp, layers: live, top: ci, base: fi, job, above })
  } else {
    // Offline (or a branch QEMU does not run): C's image row and F stand for the chain.
    await commit(deps, { disk, layers: [{ file: C.file, format: C.format }, { file: F, format: fFormat }], top: 0, base: 1, job, above })
  }
  mergedInto(deps, vm, C.file, F)
}

/** Streams F's data into child K so that K no longer needs F (K's backing becomes F's backing). */
async function pullInto(
  deps: SnapshotDeps,
  disk: string,
  K: ImageRow,
  _F: string,
  newBacking: { file: string; format: string } | null,
  live: LiveLayer[],
  qmp: QmpClient | undefined,
  ctx: JobContext,
): Promise<void> {
  const ki = live.findIndex((l) => l.file === K.file)
  const job = { jobId: `qmpd-stream-${disk}-${ctx.id.slice(0, 8)}`, log: ctx.log, onProgress: (c: number, t: number) => ctx.setProgress(c, t) }
  if (qmp && ki >= 0) {
    const base = newBacking ? live.find((l) => l.file === newBacking.file) : undefined
    await stream(deps, { disk, qmp, into: live[ki]!, base: base ?? null, job })
  } else {
    await stream(deps, { disk, into: { file: K.file, format: K.format }, base: newBacking, job })
  }
}
