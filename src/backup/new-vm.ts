// A new VM from a backup point (POST /v1/vms {name, from: {backup: {vm, id}}}): every disk of the
// point restored into a standalone qcow2 in the new VM's directory, then the VM defined with the
// source's definition (new MACs), as a journaled job in the source VM's queue. Never writes a
// backup file or an image of the source VM.
import { existsSync, mkdirSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import type { Logger } from 'pino'
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import type { PathPolicy } from '../images/paths.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import type { JobManager } from '../jobs/manager.ts'
import type { Journal } from '../ops/journal.ts'
import type { Recovery, RecoveryOutcome } from '../ops/recovery.ts'
import { reserveFiles } from '../snapshot/files.ts'
import { isAdopted, Name, type VmDefinition } from '../vm/definition.ts'
import { Labels } from '../vm/labels.ts'
import type { VmManager, VmView } from '../vm/manager.ts'
import { readManifest } from './manifest.ts'
import type { BackupPoint } from './model.ts'

/** Body of POST /v1/vms that makes a VM from a backup point. */
export const FromBackupDefinition = z.strictObject({
  name: Name,
  from: z.strictObject({
    backup: z.strictObject({
      vm: Name.describe('the VM that was backed up'),
      id: z.string().regex(/^b[0-9a-f]{8}$/, 'a backup point id').describe('the point (any mode: its chain up to it is flattened)'),
    }),
  }),
  labels: Labels.optional(),
})
export type FromBackupDefinition = z.output<typeof FromBackupDefinition>

/** Journal name of a VM made from a backup point. */
export const FROM_BACKUP_OP = 'vm-from-backup'

const FromBackupJournal = z.strictObject({ source: z.string(), id: z.string(), name: z.string(), files: z.array(z.string()) })
type FromBackupJournal = z.output<typeof FromBackupJournal>

/** What making the VM uses. */
export interface FromBackupDeps {
  vms: VmManager
  jobs: JobManager
  paths: PathPolicy
  qemuImg: QemuImg
  journal: Journal
  log: Logger
}

/**
 * Validates, queues the restore of every disk of the point in the source VM's queue, defines the
 * new VM and resolves with its view.
 * @throws QmpdError VM_NOT_FOUND (source), BACKUP_NOT_FOUND, VM_EXISTS, NOT_SUPPORTED (an adopted or UEFI source, a disk
 *   the point does not hold) before any job; the job's error (nothing of the new VM stays) when a restore or define fails.
 */
export async function defineFromBackup(d: FromBackupDeps, input: FromBackupDefinition): Promise<VmView & { restoredFrom: unknown }> {
  const { vm: source, id } = input.from.backup
  const rec = d.vms.record(source)
  const point = findPoint(d, source, id)
  if (d.vms.has(input.name)) throw new QmpdError('VM_EXISTS', `a VM named ${input.name} already exists`, { vm: input.name })
  const def = rec.definition
  if (isAdopted(def)) throw new QmpdError('NOT_SUPPORTED', `VM ${source} is adopted: qmpd does not know its QEMU command line, so it cannot define a VM like it`, { vm: source })
  if (def.firmware === 'uefi') throw new QmpdError('NOT_SUPPORTED', `VM ${source} boots UEFI: its NVRAM is not in backups yet`, { vm: source })
  const dir = d.paths.vmDir(input.name)
  const disks = def.disks.map((spec) => {
    const from = point.disks.find((x) => x.id === spec.id)
    if (!from) throw new QmpdError('NOT_SUPPORTED', `backup ${id} does not hold disk ${spec.id} of VM ${source}: a new VM needs every disk`, { id, disk: spec.id })
    return { spec, from: from.file, file: join(dir, `${spec.id}.qcow2`) }
  })
  const j: FromBackupJournal = { source, id, name: input.name, files: disks.map((x) => x.file) }
  // Files left by an earlier VM of that name (deleted without its storage) are never touched.
  for (const f of j.files) if (existsSync(f)) throw new QmpdError('FILE_EXISTS', `${f} exists (left by an earlier VM named ${input.name}?); qmpd never overwrites a file`, { file: f })
  const job = d.jobs.submit({
    vm: source,
    op: FROM_BACKUP_OP,
    params: { backup: id, name: input.name },
    run: async (ctx) => {
      const o = d.journal.begin({ vm: source, op: FROM_BACKUP_OP, job: ctx.id, body: j })
      // Removals of the files this run reserved (reserveFiles registers one per file it made).
      const undo: Array<() => unknown> = []
      try {
        await o.step('files', async () => {
          mkdirSync(dir, { recursive: true })
          await reserveFiles(j.files.map((f) => d.paths.confine(f, 'disk')), { add: (_what, fn) => undo.push(fn) })
          for (const [i, x] of disks.entries()) {
            // The point's chain is checked layer by layer from the headers before qemu-img opens it.
            await d.qemuImg.guard(x.from, 'qcow2', `backup ${id} disk ${x.spec.id}`)
            await d.qemuImg.runWithProgress(['convert', '-p', '-f', 'qcow2', '-O', 'qcow2', x.from, x.file], (pct) => ctx.setProgress(i * 100 + pct, disks.length * 100), ctx.signal)
          }
        })
        const made: VmDefinition = {
          ...def,
          name: input.name,
          disks: disks.map((x) => {
            const { sizeMiB: _s, ...spec } = x.spec
            return { ...spec, file: x.file, format: 'qcow2' as const }
          }),
          // New MACs: define assigns one to every NIC without.
          ...(def.nics ? { nics: def.nics.map(({ mac: _m, ...n }) => n) } : {}),
        }
        delete made.labels
        if (input.labels) made.labels = input.labels
        await o.step('define', async () => {
          await d.vms.define(made)
          d.vms.updateRuntime(input.name, { createdFiles: [...d.vms.record(input.name).runtime.createdFiles, ...j.files] })
        })
        o.end()
      } catch (err) {
        if (!d.vms.has(input.name)) for (const u of undo) u()
        o.end()
        throw err
      }
      ctx.log.info({ vm: input.name, backup: id, source }, 'vm defined from a backup point')
      return { vm: input.name, backup: id, source, mode: point.mode, at: point.at, files: j.files }
    },
  })
  const done = await d.jobs.wait(job.id, 24 * 3600_000)
  if (done.state !== 'succeeded') {
    const e = done.error ?? { code: 'INTERNAL', message: `job ${job.id} ended ${done.state}` }
    throw new QmpdError(e.code as QmpdError['code'], e.message, { ...e.details, job: job.id })
  }
  return { ...(await d.vms.view(input.name)), restoredFrom: done.result }
}

function findPoint(d: FromBackupDeps, vm: string, id: string): BackupPoint {
  const point = readManifest(d.paths.vmDir(vm))
    .chains.flatMap((c) => c.points)
    .find((p) => p.id === id)
  if (!point) throw new QmpdError('BACKUP_NOT_FOUND', `VM ${vm} has no backup ${id}`, { vm, id })
  return point
}

function removeFiles(j: FromBackupJournal): void {
  for (const f of j.files) rmSync(f, { force: true })
}

/**
 * Registers the recovery of an interrupted VM-from-backup: a VM that was defined is kept; otherwise
 * the files the restore made are removed.
 */
export function registerFromBackupRecovery(recovery: Recovery, vms: Pick<VmManager, 'has'>): void {
  recovery.register(FROM_BACKUP_OP, async (e): Promise<RecoveryOutcome> => {
    const j = FromBackupJournal.parse(e.body)
    if (vms.has(j.name)) return { action: 'forward', detail: `VM ${j.name} was defined from backup ${j.id}`, result: { vm: j.name } }
    removeFiles(j)
    return { action: 'back', detail: `VM ${j.name} from backup ${j.id} was not defined: its restored files are removed` }
  })
}
