// BackupService: validates backup requests, queues them as jobs, lists chains with QEMU's bitmap
// state, restores a point to a new file; holds no SQL and builds no QMP transaction (run.ts does).
import { defineFromBackup, type FromBackupDefinition } from './new-vm.ts'
import { reserveFile } from '../snapshot/files.ts'
import { statSync } from 'node:fs'
import { rm } from 'node:fs/promises'
import type { Logger } from 'pino'
import { QmpdError } from '../errors.ts'
import { assertCreatable, fileKind } from '../images/files.ts'
import type { PathPolicy } from '../images/paths.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import type { JobManager } from '../jobs/manager.ts'
import type { Job } from '../jobs/model.ts'
import type { Journal } from '../ops/journal.ts'
import { requireAdoptedQemu } from '../vm/adopted.ts'
import type { VmManager, VmView } from '../vm/manager.ts'
import { assertState, isRunningState } from '../vm/states.ts'
import { bitmapStates, type BitmapState } from './bitmaps.ts'
import { readManifest } from './manifest.ts'
import type { BackupChain, CreateBackupBody, RestoreBackupBody } from './model.ts'
import { runBackup } from './run.ts'

/** A chain as GET /v1/vms/{vm}/backups shows it. */
export interface ChainView extends BackupChain {
  /** Per disk, what QEMU holds now (null when the VM's QEMU is not running). */
  bitmaps: Array<Omit<BitmapState, 'node' | 'file'>> | null
  /** Sum of the chain's files on the host. */
  sizeBytes: number
}

/**
 * Push-mode backups: full and incremental points of a running VM's disks into qcow2 chains, one
 * persistent dirty bitmap per disk and chain; restore of a point into a standalone qcow2.
 */
export class BackupService {
  /** Refuses work on a VM whose disks a block job is busy with (set by the daemon). */
  busyCheck: (vm: string, what: string) => void = () => {}

  constructor(
    private readonly deps: { vms: VmManager; jobs: JobManager; paths: PathPolicy; qemuImg: QemuImg; journal: Journal; log: Logger },
  ) {}

  /**
   * POST /v1/vms {name, from: {backup}}: a new VM whose disks are the point's (src/backup/new-vm.ts).
   * @throws QmpdError as defineFromBackup.
   */
  fromBackup(input: FromBackupDefinition): Promise<VmView & { restoredFrom: unknown }> {
    return defineFromBackup(this.deps, input)
  }

  /**
   * A chain's directory as given (relative: under the VM's directory), resolved and confined.
   * @throws QmpdError INVALID_PATH when it is outside the roots or not an existing directory.
   */
  checkDir(vm: string, given: string): string {
    const dir = this.deps.paths.resolve(given, this.deps.paths.vmDir(vm), 'dir')
    if (fileKind(dir, 'dir') !== 'directory') throw new QmpdError('INVALID_PATH', `dir ${dir} is not an existing directory`, { dir })
    return dir
  }

  /**
   * Validates a backup request and queues it on the VM's queue.
   * @throws QmpdError VM_NOT_FOUND, INVALID_STATE (not running or paused), ADOPTED_NEEDS_RELAUNCH, BUSY, INVALID_PATH (dir not an
   * existing directory inside the roots), DISK_NOT_FOUND, NOT_SUPPORTED (a raw disk: persistent bitmaps live in qcow2) or
   * INVALID_INPUT (disks other than the chain's), before any job is made.
   */
  create(vm: string, body: CreateBackupBody): Job {
    const rec = this.deps.vms.record(vm)
    requireAdoptedQemu(vm, rec.definition, rec.runtime, 'a backup')
    assertState(vm, rec.runtime.state, 'backup')
    this.busyCheck(vm, 'back up')
    const dir = this.checkDir(vm, body.dir)
    const all = rec.runtime.disks
    const disks = body.disks ?? all.map((d) => d.id)
    for (const id of disks) {
      const d = all.find((x) => x.id === id)
      if (!d) throw new QmpdError('DISK_NOT_FOUND', `VM ${vm} has no disk ${id}`, { vm, disk: id })
      if (d.format !== 'qcow2') throw new QmpdError('NOT_SUPPORTED', `disk ${id} is ${d.format}: backups need qcow2 disks (the dirty bitmap is stored in the image)`, { disk: id })
    }
    if (new Set(disks).size !== disks.length) throw new QmpdError('INVALID_INPUT', 'disks lists a disk twice', { disks })
    const chain = readManifest(this.deps.paths.vmDir(vm)).chains.find((c) => c.dir === dir)
    if (chain && body.disks && [...chain.disks].sort().join() !== [...disks].sort().join()) {
      throw new QmpdError('INVALID_INPUT', `the chain in ${dir} covers disks ${chain.disks.join(', ')}; use another dir for other disks`, { chain: chain.id })
    }
    const plan = { vm, requested: body.mode, dir, disks: chain?.disks ?? disks }
    return this.deps.jobs.submit({
      vm,
      op: 'backup',
      params: { ...body, dir },
      cancellableWhileRunning: true,
      run: async (ctx) => {
        const now = this.deps.vms.record(vm)
        assertState(vm, now.runtime.state, 'backup')
        // Where it is used: a directory on the way may have become a symlink since the submit.
        this.deps.paths.confine(dir, 'dir')
        return runBackup(
          { qemuImg: this.deps.qemuImg, journal: this.deps.journal, vmDir: (v) => this.deps.paths.vmDir(v), qemuPid: (v) => this.deps.vms.record(v).runtime.pid },
          this.deps.vms.qmp(vm),
          plan,
          ctx,
        )
      },
    })
  }

  /**
   * The VM's backup chains with their points, the size of their files and, when QEMU runs, the
   * state of each disk's bitmap.
   * @throws QmpdError VM_NOT_FOUND, STORE_ROW_INVALID (an unreadable manifest).
   */
  async list(vm: string): Promise<ChainView[]> {
    const rec = this.deps.vms.record(vm)
    const chains = readManifest(this.deps.paths.vmDir(vm)).chains
    const live = isRunningState(rec.runtime.state) && rec.runtime.state !== 'unknown'
    const out: ChainView[] = []
    for (const c of chains) {
      let bitmaps: ChainView['bitmaps'] = null
      if (live) {
        bitmaps = await bitmapStates(this.deps.vms.qmp(vm), c.disks, c.bitmap).then(
          (s) => s.map(({ node: _node, file: _file, ...rest }) => rest),
          () => null,
        )
      }
      const sizeBytes = c.points.flatMap((p) => p.disks).reduce((n, d) => n + sizeOf(d.file), 0)
      out.push({ ...c, bitmaps, sizeBytes })
    }
    return out
  }

  /**
   * Queues the restore of backup point `id` (one disk of it) into a new standalone qcow2 file:
   * qemu-img convert of the point's file with its backing chain (the earlier points).
   * @throws QmpdError VM_NOT_FOUND, BACKUP_NOT_FOUND, INVALID_INPUT (disk missing or unknown), INVALID_PATH, FILE_EXISTS, before any job is made.
   */
  restore(vm: string, id: string, body: RestoreBackupBody): Job {
    this.deps.vms.record(vm)
    const point = readManifest(this.deps.paths.vmDir(vm))
      .chains.flatMap((c) => c.points)
      .find((p) => p.id === id)
    if (!point) throw new QmpdError('BACKUP_NOT_FOUND', `VM ${vm} has no backup ${id}`, { vm, id })
    if (!body.disk && point.disks.length > 1) throw new QmpdError('INVALID_INPUT', `backup ${id} holds disks ${point.disks.map((d) => d.id).join(', ')}: name one in disk`, { id })
    const src = body.disk ? point.disks.find((d) => d.id === body.disk) : point.disks[0]
    if (!src) throw new QmpdError('INVALID_INPUT', `backup ${id} has no disk ${body.disk}`, { id, disk: body.disk })
    const file = this.deps.paths.resolve(body.file, this.deps.paths.vmDir(vm), 'file')
    assertCreatable(file, 'file')
    if (fileKind(file, 'file') !== 'missing') throw new QmpdError('FILE_EXISTS', `${file} exists; qmpd never overwrites a file`, { file })
    return this.deps.jobs.submit({
      vm,
      op: 'backup-restore',
      params: { id, disk: src.id, file },
      run: async (ctx) => {
        this.deps.paths.confine(file, 'file')
        assertCreatable(file, 'file')
        const t0 = performance.now()
        return this.deps.journal.run({ vm, op: 'backup-restore', job: ctx.id, body: { file } }, (o) =>
          o.step('convert', async () => {
            // The chain is checked layer by layer from the headers before qemu-img opens it.
            await this.deps.qemuImg.guard(src.file, 'qcow2', 'backup')
            // O_EXCL: a file that appeared since the request (another restore) is never overwritten.
            await reserveFile(file)
            try {
              await this.deps.qemuImg.runWithProgress(['convert', '-p', '-f', 'qcow2', '-O', 'qcow2', src.file, file], (p) => ctx.setProgress(p, 100), ctx.signal)
            } catch (err) {
              await rm(file, { force: true })
              throw err
            }
            return { backup: id, disk: src.id, file, sizeBytes: sizeOf(file), ms: Math.round(performance.now() - t0) }
          }),
        )
      },
    })
  }
}

function sizeOf(file: string): number {
  try {
    return statSync(file).size
  } catch {
    return 0
  }
}
