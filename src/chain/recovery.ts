// Crash recovery of block jobs (commit, pull, copy; decision table: docs/architecture.md, "Crash
// recovery"). The re-attach has already ended the QEMU job a dead daemon left (cancelled when
// still running); what QEMU's graph or the image headers show decides: the edit happened, so
// the records follow (forward), or it did not, and nothing the user can see changed (back).
import { existsSync } from 'node:fs'
import { rm } from 'node:fs/promises'
import type { Logger } from 'pino'
import { z } from 'zod'
import { liveChain, pruneDetachedNodes } from '../images/graph.ts'
import { endQemuImgOn } from '../images/orphan-jobs.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import type { Recovery, RecoveryOutcome } from '../ops/recovery.ts'
import type { JournalEntry } from '../store/journal.ts'
import type { VmManager } from '../vm/manager.ts'
import { isRunningState } from '../vm/states.ts'
import { afterCommit, afterPull, switchActive, type ChainDeps } from './editor.ts'

/** What a block job's journal entry holds: the chain it started from (top first) and its target. */
export interface ChainJournal {
  job: 'commit' | 'pull' | 'copy'
  disk: string
  layers: Array<{ file: string; format: string }>
  /** commit: the top layer and the base it merges into; pull: base = where streaming stops (length: all). */
  top: number
  base: number
  /** Whether QEMU ran the job (else qemu-img did). */
  live: boolean
  keepMerged: boolean
  /** copy: the new file and its format. */
  dest?: string
  format?: 'qcow2' | 'raw'
}

/** ChainJournal as read back from the journal. */
export const ChainJournal = z.strictObject({
  job: z.enum(['commit', 'pull', 'copy']),
  disk: z.string(),
  layers: z.array(z.strictObject({ file: z.string(), format: z.string() })),
  top: z.number().int(),
  base: z.number().int(),
  live: z.boolean(),
  keepMerged: z.boolean(),
  dest: z.string().optional(),
  format: z.enum(['qcow2', 'raw']).optional(),
}) satisfies z.ZodType<ChainJournal>

/** What the rules use. */
type RecoveryDeps = ChainDeps & { vms: VmManager; qemuImg: QemuImg; vmDir: (vm: string) => string }

/** Registers the rules of commit, pull and copy. */
export function registerChainRecovery(recovery: Recovery, d: RecoveryDeps): void {
  for (const op of ['commit', 'pull', 'copy'] as const) recovery.register(op, (e, log) => recoverChain(d, e, ChainJournal.parse(e.body), log))
}

async function recoverChain(d: RecoveryDeps, e: JournalEntry, j: ChainJournal, log: Logger): Promise<RecoveryOutcome> {
  const vm = e.vm
  const files = [...j.layers.map((l) => l.file), ...(j.dest ? [j.dest] : [])]
  // An offline edit's qemu-img outlives the daemon that started it: end it before looking.
  const ended = await endQemuImgOn(files)
  if (ended.length) log.warn({ pids: ended }, 'ended qemu-img processes a dead daemon left')
  const qmp = isRunningState(d.vms.record(vm).runtime.state) ? d.vms.qmp(vm) : undefined
  const now = qmp ? (await liveChain(qmp, j.disk)).map((l) => l.file) : await headerChain(d, d.vms.record(vm).runtime.disks.find((x) => x.id === j.disk)?.file)
  const layers = j.layers
  const ctx = { log }
  if (j.job === 'commit') {
    const topFile = layers[j.top]!.file
    const baseFile = layers[j.base]!.file
    const done = j.top === 0 ? now[0] === baseFile && qmp !== undefined : !now.includes(topFile) && now.includes(baseFile)
    if (done) {
      const removed = afterCommit(d, vm, j.disk, layers, j.top, j.base, { activeMoved: j.top === 0, keep: j.keepMerged }, ctx)
      return { action: 'forward', detail: `the commit into ${baseFile} had happened: recorded`, result: { top: topFile, base: baseFile, pivoted: j.top === 0, removed } }
    }
    if (qmp) await pruneDetachedNodes(qmp, j.disk)
    return { action: 'back', detail: `the commit of ${topFile} had not finished: the chain is as it was` }
  }
  if (j.job === 'pull') {
    const want = j.base < layers.length ? layers[j.base]!.file : undefined
    const done = now[0] === layers[0]!.file && now[1] === want
    if (done) {
      const removed = afterPull(d, vm, j.disk, layers, j.base, j.keepMerged, ctx)
      return { action: 'forward', detail: `the pull into ${layers[0]!.file} had happened: recorded`, result: { into: layers[0]!.file, base: want ?? null, removed } }
    }
    if (qmp) await pruneDetachedNodes(qmp, j.disk)
    return { action: 'back', detail: 'the pull had not finished: the chain is as it was' }
  }
  const dest = j.dest!
  const rt = d.vms.record(vm).runtime
  if (rt.disks.some((x) => x.id === j.disk && x.file === dest)) return { action: 'forward', detail: `the copy ${dest} was recorded`, result: { dest, pivoted: true } }
  if (qmp && now[0] === dest) {
    const backing = j.base < layers.length ? layers[j.base]!.file : null
    switchActive(d, vm, j.disk, dest, j.format ?? 'qcow2', backing)
    return { action: 'forward', detail: `QEMU had pivoted to ${dest}: recorded`, result: { dest, pivoted: true } }
  }
  if (qmp) await pruneDetachedNodes(qmp, j.disk)
  if (!rt.createdFiles.includes(dest) && existsSync(dest)) await rm(dest, { force: true })
  return { action: 'back', detail: `the copy to ${dest} had not finished: removed it` }
}

/** The backing chain as the image headers have it (the VM is off), top first. */
async function headerChain(d: ChainDeps, file: string | undefined): Promise<string[]> {
  if (!file) return []
  const info = await d.qemuImg.chain(file, { forceShare: true }).catch(() => [])
  return info.map((l) => l.filename)
}
