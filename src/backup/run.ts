// Runs one push-mode backup point on a running VM as a journaled step program (bitmaps, merge,
// target files, target nodes, one grouped transaction, finalize, detach, rebase, record); never
// plans or validates the request (service.ts does).
import { randomBytes } from 'node:crypto'
import { existsSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { QmpdError } from '../errors.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import type { JobContext } from '../jobs/manager.ts'
import type { Journal } from '../ops/journal.ts'
import type { QmpClient } from '../qmp/index.ts'
import type { TransactionAction } from '../qmp/commands.ts'
import { bitmapStates, decideMode } from './bitmaps.ts'
import { readManifest, updateChain, writeManifest } from './manifest.ts'
import { planMerges } from './merge.ts'
import type { BackupChain, BackupJournal, BackupMode, BackupPoint, PointDisk } from './model.ts'

/** What a backup run uses. */
export interface RunDeps {
  qemuImg: QemuImg
  journal: Journal
  vmDir: (vm: string) => string
  qemuPid: (vm: string) => number | undefined
}

/** A backup request after validation: the chain directory (resolved, confined) and its disks. */
export interface BackupPlan {
  vm: string
  requested: BackupMode
  dir: string
  disks: string[]
}

/** The job result of a backup. */
export interface BackupResult {
  chain: string
  point: BackupPoint
}

/** A new id: a letter and 8 hex digits. */
export function newId(prefix: 'b' | 'c'): string {
  return `${prefix}${randomBytes(4).toString('hex')}`
}

/**
 * Takes one backup point of every disk in `plan`, all from one instant: the blockdev-backup jobs
 * start in one transaction with completion-mode grouped (one fails, all fail). Full: sync=full
 * with the chain's bitmap in bitmap-mode on-success, so the bitmap restarts at that instant only if
 * every job succeeds; incremental: sync=incremental into a qcow2 backed by the disk's previous
 * point. A failure leaves the bitmaps as they were and removes what the run made.
 * @throws QmpdError QMP_COMMAND_FAILED (QEMU refused or a job failed), QEMU_IMG_FAILED, JOB_CANCELLED, FILE_EXISTS.
 */
export async function runBackup(d: RunDeps, qmp: QmpClient, plan: BackupPlan, ctx: JobContext): Promise<BackupResult> {
  const vmDir = d.vmDir(plan.vm)
  const manifest = readManifest(vmDir)
  const existing = manifest.chains.find((c) => c.dir === plan.dir)
  const chain: BackupChain = existing ?? { id: newId('c'), dir: plan.dir, bitmap: '', disks: plan.disks, points: [] }
  if (!existing) chain.bitmap = `qmpd-${chain.id}`
  const states = await bitmapStates(qmp, chain.disks, chain.bitmap)
  const merges = existing && plan.requested !== 'full' ? await planMerges(qmp, chain.disks, chain.bitmap, existing.points.at(-1), existing.carried) : undefined
  const { mode, reason } = decideMode(plan.requested, existing, states, merges)
  const sourcesOf = (disk: string): Array<{ node: string; file: string }> => {
    const m = mode !== 'full' ? merges?.get(disk) : undefined
    return m && 'sources' in m ? m.sources : []
  }
  if (reason) ctx.log.warn({ requested: plan.requested, reason }, 'backup runs full')
  const last = chain.points.at(-1)
  // A differential is an incremental into a file backed by the last point, rebased onto the last full.
  const base = mode === 'differential' ? [...chain.points].reverse().find((p) => p.mode === 'full') : undefined
  if (mode === 'differential' && !base) throw new QmpdError('INTERNAL', `chain ${chain.id} has points but no full one`, { chain: chain.id })
  const backingOf = (disk: string): string | null => {
    if (mode === 'full') return null
    return (mode === 'differential' ? base! : last!).disks.find((x) => x.id === disk)!.file
  }
  const pointId = newId('b')
  const targets = chain.disks.map((disk) => ({
    disk,
    file: join(chain.dir, `${plan.vm}-${disk}-${pointId}.qcow2`),
    node: `bk-${pointId}-${disk}`,
    jobId: `qmpd-backup-${pointId}-${disk}`,
  }))
  for (const t of targets) if (existsSync(t.file)) throw new QmpdError('FILE_EXISTS', `${t.file} exists; qmpd never overwrites a file`, { file: t.file })
  const body: BackupJournal = { chain: chain.id, point: pointId, targets }
  const t0 = performance.now()
  const made = { files: [] as string[], nodes: [] as string[] }
  // Until `record` clears it: a chain whose bitmaps this run re-creates, or that QEMU restarts at
  // finalize, must not be trusted by the next backup if this one does not end recorded.
  const distrust = (reason: string): void => {
    if (existing) updateChain(vmDir, chain.id, (c) => ({ ...c, invalid: { reason, at: new Date().toISOString() } }))
  }
  return d.journal.run({ vm: plan.vm, op: 'backup', job: ctx.id, body, qemuPid: () => d.qemuPid(plan.vm) }, async (o) => {
    try {
      await o.step('bitmaps', async () => {
        if (mode !== 'full') return
        if (states.some((s) => s.state !== 'active')) distrust(`a full backup that re-created the bitmaps (${reason ?? 'they were not usable'}) did not finish: the next backup is full`)
        for (const s of states) {
          // An inconsistent bitmap cannot be cleared, only removed (qapi block-dirty-bitmap-clear).
          if (s.state === 'inconsistent') await qmp.execute('block-dirty-bitmap-remove', { node: s.node, name: chain.bitmap })
          if (s.state !== 'active') await qmp.execute('block-dirty-bitmap-add', { node: s.node, name: chain.bitmap, persistent: true })
        }
      })
      await o.step('merge', async () => {
        // Only adds bits to the active layer's bitmap: a crash or failure after it costs a larger
        // incremental, never a missed write. The new point records the active layer, so each
        // merged layer is merged once.
        for (const s of states) {
          const src = sourcesOf(s.disk)
          if (src.length > 0) await qmp.execute('block-dirty-bitmap-merge', { node: s.node, target: chain.bitmap, bitmaps: src.map((x) => ({ node: x.node, name: chain.bitmap })) })
        }
      })
      const nodes = await qmp.execute('query-named-block-nodes', { flat: true })
      await o.step('targets', async () => {
        for (const t of targets) {
          const src = states.find((s) => s.disk === t.disk)!
          const size = nodes.find((n) => n['node-name'] === src.node)?.image['virtual-size']
          if (!size) throw new QmpdError('INTERNAL', `cannot read the size of disk ${t.disk}`, { disk: t.disk })
          const prev = mode === 'full' ? undefined : last!.disks.find((x) => x.id === t.disk)!.file
          made.files.push(t.file)
          await d.qemuImg.create(t.file, 'qcow2', { sizeBytes: size, ...(prev ? { backing: { file: prev, format: 'qcow2' } } : {}) })
        }
      })
      await o.step('attach', async () => {
        for (const t of targets) {
          // No `backing` key: QEMU opens the previous point from the header, so zero writes into an
          // incremental file are recorded as zero clusters and never fall through to stale data.
          await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': t.node, file: { driver: 'file', filename: t.file } })
          made.nodes.push(t.node)
        }
      })
      const actions: TransactionAction[] = targets.map((t) => ({
        type: 'blockdev-backup',
        data: {
          'job-id': t.jobId,
          device: states.find((s) => s.disk === t.disk)!.node,
          target: t.node,
          sync: mode === 'full' ? 'full' : 'incremental',
          bitmap: chain.bitmap,
          'bitmap-mode': 'on-success',
          'auto-finalize': false,
          'auto-dismiss': false,
        },
      }))
      const at = new Date().toISOString()
      const copied = await o.step('transaction', () => runGroup(qmp, targets.map((t) => t.jobId), () => qmp.execute('transaction', { actions, properties: { 'completion-mode': 'grouped' } }), ctx, () => o.step('finalize', () => distrust('a backup was finalized in QEMU (the bitmaps restarted at its instant) but not recorded: the next backup is full'))))
      await o.step('detach', async () => {
        for (const node of made.nodes.splice(0)) await qmp.execute('blockdev-del', { 'node-name': node })
      })
      if (base && base.id !== last!.id) {
        // Safe-mode rebase: qemu-img copies into each file every cluster where its old chain (the
        // points since the full) differs from the full, so the file needs only the full. QEMU may
        // have restarted the bitmaps already: a crash here invalidates the chain (recovery.ts).
        await o.step('rebase', async () => {
          for (const t of targets) await d.qemuImg.rebase(t.file, { file: backingOf(t.disk)!, format: 'qcow2' })
        })
      }
      const point: BackupPoint = {
        id: pointId,
        mode,
        requested: plan.requested,
        ...(reason ? { reason } : {}),
        ...(base ? { basedOn: base.id } : {}),
        at,
        ms: Math.round(performance.now() - t0),
        disks: targets.map(
          (t): PointDisk => ({
            id: t.disk,
            file: t.file,
            backing: backingOf(t.disk),
            layer: states.find((s) => s.disk === t.disk)!.file,
            copiedBytes: copied.get(t.jobId) ?? 0,
            ...(sourcesOf(t.disk).length ? { merged: sourcesOf(t.disk).map((x) => x.file) } : {}),
          }),
        ),
      }
      await o.step('record', () => {
        const m = readManifest(vmDir)
        const next: BackupChain = { ...chain, points: [...chain.points, point] }
        delete next.invalid
        // The point's layer is the active one now: a carried copy needs no vouching any more.
        delete next.carried
        const i = m.chains.findIndex((c) => c.id === chain.id)
        if (i < 0) m.chains.push(next)
        else m.chains[i] = next
        writeManifest(vmDir, m)
      })
      return { chain: chain.id, point }
    } catch (err) {
      for (const node of made.nodes) await qmp.execute('blockdev-del', { 'node-name': node }).catch((e) => ctx.log.warn({ err: e, node }, 'blockdev-del of a backup target failed'))
      for (const f of made.files) rmSync(f, { force: true })
      throw err
    }
  })
}

/**
 * Drives a group of QEMU jobs started together (completion-mode grouped) to their end: waits until
 * all are pending (or one ended), calls `beforeFinalize` (the journal step: from here on a crash
 * may have let QEMU clear the bitmaps), finalizes, reads every error from query-jobs, dismisses all.
 * Returns each job's final progress (bytes copied). Aborting the signal cancels the group.
 */
async function runGroup(qmp: QmpClient, ids: string[], issue: () => Promise<unknown>, ctx: JobContext, beforeFinalize: () => Promise<unknown>): Promise<Map<string, number>> {
  const status = new Map<string, string>()
  const events = qmp.events({ names: ['JOB_STATUS_CHANGE'], filter: (e) => ids.includes(e.data.id) })
  let cancelled = false
  const onAbort = (): void => {
    cancelled = true
    // One cancel ends the whole group (grouped completion).
    qmp.execute('job-cancel', { id: ids[0]! }).catch((err) => ctx.log.warn({ err }, 'job-cancel failed'))
  }
  try {
    await issue()
    ctx.signal.addEventListener('abort', onAbort, { once: true })
    if (ctx.signal.aborted) onAbort()
    let finalized = false
    for await (const ev of events) {
      status.set(ev.data.id, ev.data.status)
      const all = (s: string): boolean => ids.every((id) => status.get(id) === s)
      if (all('concluded')) break
      if (!finalized && all('pending')) {
        finalized = true
        await beforeFinalize()
        for (const id of ids) await qmp.execute('job-finalize', { id }).catch(() => {})
      }
    }
    const jobs = await qmp.execute('query-jobs')
    const out = new Map<string, number>()
    const errors: string[] = []
    for (const id of ids) {
      const j = jobs.find((x) => x.id === id)
      if (j?.error) errors.push(`${id}: ${j.error}`)
      out.set(id, j?.['current-progress'] ?? 0)
      await qmp.execute('job-dismiss', { id }).catch((err) => ctx.log.warn({ err, id }, 'job-dismiss failed'))
    }
    if (cancelled) throw new QmpdError('JOB_CANCELLED', 'backup cancelled', {})
    if (errors.length) throw new QmpdError('QMP_COMMAND_FAILED', `backup failed: ${errors.join('; ')}`, { desc: errors.join('; ') })
    return out
  } finally {
    ctx.signal.removeEventListener('abort', onAbort)
    await events.return?.()
  }
}
