// ExportService: pull-mode NBD exports of a point-in-time view of a VM's disks (POST/GET/DELETE
// /v1/vms/{vm}/exports): validates, runs setup and teardown through the VM's queue as journaled
// operations, keeps the open exports' records; holds no SQL and builds no QMP message itself.
import { randomBytes } from 'node:crypto'
import { chmodSync, closeSync, existsSync, fsyncSync, openSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import type { Logger } from 'pino'
import { z } from 'zod'
import { type ErrorCode, QmpdError } from '../errors.ts'
import type { EventBus } from '../events/bus.ts'
import type { PathPolicy } from '../images/paths.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import type { JobManager } from '../jobs/manager.ts'
import { withReverter } from '../jobs/reverter.ts'
import type { Journal } from '../ops/journal.ts'
import type { QmpClient } from '../qmp/index.ts'
import { isAdopted } from '../vm/definition.ts'
import type { VmManager } from '../vm/manager.ts'
import { assertState, isRunningState } from '../vm/states.ts'
import { addNbdExport, addScratchNode, beginFleecing, startNbdServer, stopNbdServerIfIdle, teardownDisk } from './fleece.ts'
import { openTcpForward, type TcpForward } from './tcp-forward.ts'
import { type CreateExportBody, EXPORT_ADD_OP, EXPORT_FILES, EXPORT_REMOVE_OP, type ExportDisk, ExportRecord, type ExportView, exportNames, scratchName, viewOf } from './model.ts'

/** unix socket paths QEMU can bind (sun_path is 108 bytes with the NUL). */
const MAX_SOCKET_PATH = 100

/** What the service uses. */
export interface ExportDeps {
  vms: VmManager
  jobs: JobManager
  journal: Journal
  paths: PathPolicy
  qemuImg: QemuImg
  bus: EventBus
  /** Refuses work on a VM whose disks a block job is busy with. */
  busy: (vm: string, what: string) => void
  log: Logger
}

/**
 * Open exports per VM. An export lives until DELETE, until its QEMU ends (stop, crash, save), or
 * until the daemon restarts: a new daemon takes every export it finds down (docs/architecture.md,
 * "Pull-mode exports").
 */
export class ExportService {
  private readonly open = new Map<string, ExportRecord[]>()
  /** Loopback TCP forwarders by export id (they end with the export, its QEMU or the daemon). */
  private readonly forwards = new Map<string, TcpForward>()

  constructor(private readonly deps: ExportDeps) {
    // A QEMU that ended took its exports along: only the scratch files and records are left.
    deps.bus.subscribe((ev) => {
      // A listener must not throw into the emitter (the listeners after it would not run).
      try {
        if (ev.type === 'vm' && !isRunningState(ev.state) && ev.state !== 'starting' && this.recordsOf(ev.vm).length > 0) this.forgetEnded(ev.vm)
      } catch (err) {
        deps.log.error({ err, vm: ev.type === 'vm' ? ev.vm : undefined }, 'exports: could not forget the exports of an ended QEMU')
      }
    })
  }

  private recordFile(vm: string): string {
    return join(this.deps.paths.vmDir(vm), EXPORT_FILES.records)
  }

  /** The VM's open exports, read from its directory once. */
  private recordsOf(vm: string): ExportRecord[] {
    let list = this.open.get(vm)
    if (!list) {
      const file = this.recordFile(vm)
      list = existsSync(file) ? z.array(ExportRecord).parse(JSON.parse(readFileSync(file, 'utf8'))) : []
      this.open.set(vm, list)
    }
    return list
  }

  /** Writes the VM's open exports durably (write, fsync, rename, fsync the directory). */
  private saveRecords(vm: string, list: ExportRecord[]): void {
    this.open.set(vm, list)
    const file = this.recordFile(vm)
    if (list.length === 0) {
      rmSync(file, { force: true })
      return
    }
    const tmp = `${file}.tmp`
    writeFileSync(tmp, JSON.stringify(list), { mode: 0o600 })
    const fd = openSync(tmp, 'r')
    fsyncSync(fd)
    closeSync(fd)
    renameSync(tmp, file)
    const dir = openSync(this.deps.paths.vmDir(vm), 'r')
    fsyncSync(dir)
    closeSync(dir)
  }

  /** GET /v1/vms/{vm}/exports. @throws QmpdError VM_NOT_FOUND. */
  list(vm: string): ExportView[] {
    this.deps.vms.record(vm)
    return this.recordsOf(vm).map(viewOf)
  }

  /** Whether the VM has an open export (the consistency check and repair treat it as busy). */
  hasOpen(vm: string): boolean {
    return this.recordsOf(vm).length > 0
  }

  /**
   * Refuses an operation that would change the graph under an open export (snapshots, block
   * jobs, save): 409 EXPORT_ACTIVE.
   * @throws QmpdError EXPORT_ACTIVE while the VM has an export.
   */
  assertNone(vm: string, what: string): void {
    const open = this.recordsOf(vm)
    if (open.length > 0) throw new QmpdError('EXPORT_ACTIVE', `cannot ${what}: VM ${vm} has an open NBD export (${open.map((e) => e.id).join(', ')}); DELETE /v1/vms/${vm}/exports/{id} first`, { vm, exports: open.map((e) => e.id) })
  }

  /**
   * POST /v1/vms/{vm}/exports: validates (unknown disk, missing bitmap, stopped VM: nothing is
   * touched), then sets the export up through the VM's queue and answers once it is open.
   * @throws QmpdError VM_NOT_FOUND, INVALID_STATE, DISK_NOT_FOUND, BITMAP_NOT_FOUND, EXPORT_ACTIVE, BUSY, NOT_SUPPORTED before any change; the setup's QMP/qemu-img errors (everything undone).
   */
  async create(vm: string, body: CreateExportBody): Promise<ExportView> {
    await this.precheck(vm, body)
    // Bound before the job, so a taken port changes nothing; closed again when the setup fails.
    const forward = body.tcp ? await openTcpForward(body.tcp, () => this.reachableSocket(vm), (err) => this.deps.log.warn({ vm, err }, 'NBD TCP forwarder error')) : undefined
    let gaveUp = false
    const job = this.deps.jobs.submit({
      vm,
      op: 'export',
      params: body,
      run: async (ctx) => {
        // The request waited 10 minutes in the queue and answered an error: open nothing now.
        if (gaveUp) throw new QmpdError('TIMEOUT', 'the export request timed out while queued; nothing was exported', { vm })
        const record = await this.setUp(vm, body, ctx.id, forward?.address)
        if (forward) this.forwards.set(record.id, forward)
        return viewOf(record)
      },
    })
    const done = await this.deps.jobs.wait(job.id, 10 * 60_000)
    if (done.state !== 'succeeded') {
      gaveUp = true
      if (forward && !this.forwards.has((done.result as ExportView | undefined)?.id ?? '')) await forward.close()
      const e = done.error ?? { code: 'INTERNAL', message: `export job ${done.state}` }
      throw new QmpdError(e.code as ErrorCode, e.message, { ...e.details, job: done.id })
    }
    return done.result as ExportView
  }

  /** The checks of create, before and again inside the job; returns the disks with their top nodes. */
  private async precheck(vm: string, body: CreateExportBody): Promise<Array<{ disk: string; source: string; granularity?: number }>> {
    const rec = this.deps.vms.record(vm)
    assertState(vm, rec.runtime.state, 'export')
    const known = rec.runtime.disks.map((d) => d.id).filter((id) => id !== 'nvram')
    const wanted = body.disks ?? known
    if (new Set(wanted).size !== wanted.length) throw new QmpdError('INVALID_INPUT', 'a disk is named twice', { disks: wanted })
    for (const d of wanted) if (!known.includes(d)) throw new QmpdError('DISK_NOT_FOUND', `VM ${vm} has no disk ${d}`, { vm, disk: d })
    if (wanted.length === 0) throw new QmpdError('INVALID_INPUT', `VM ${vm} has no disk to export`, { vm })
    for (const e of this.recordsOf(vm)) {
      const both = e.disks.filter((d) => wanted.includes(d.disk)).map((d) => d.disk)
      if (both.length) throw new QmpdError('EXPORT_ACTIVE', `disk ${both.join(', ')} of VM ${vm} is already exported (export ${e.id})`, { vm, export: e.id })
    }
    this.deps.busy(vm, 'export disks')
    if (isAdopted(rec.definition) && Buffer.byteLength(this.socketPath(vm)) > MAX_SOCKET_PATH) {
      throw new QmpdError('NOT_SUPPORTED', `the NBD socket path ${this.socketPath(vm)} is too long for a unix socket of an adopted QEMU`, { vm })
    }
    const qmp = this.deps.vms.qmp(vm)
    const [blocks, nodes] = await Promise.all([qmp.execute('query-block'), qmp.execute('query-named-block-nodes', { flat: true })])
    const out: Array<{ disk: string; source: string; granularity?: number }> = []
    for (const disk of wanted) {
      const source = blocks.find((b) => b.qdev?.match(/\/peripheral\/([^/]+)/)?.[1] === disk || b.device === disk)?.inserted?.['node-name']
      if (!source) throw new QmpdError('DISK_NOT_FOUND', `QEMU has no disk ${disk}`, { vm, disk })
      if (body.bitmap === undefined) {
        out.push({ disk, source })
        continue
      }
      const bm = nodes.find((n) => n['node-name'] === source)?.['dirty-bitmaps']?.find((b) => b.name === body.bitmap)
      if (!bm) throw new QmpdError('BITMAP_NOT_FOUND', `disk ${disk} of VM ${vm} has no dirty bitmap ${body.bitmap}`, { vm, disk, bitmap: body.bitmap })
      if (bm.inconsistent) throw new QmpdError('INVALID_STATE', `dirty bitmap ${body.bitmap} of disk ${disk} is inconsistent (QEMU did not close it cleanly); it cannot be exported`, { vm, disk, bitmap: body.bitmap })
      out.push({ disk, source, granularity: bm.granularity })
    }
    return out
  }

  /** The NBD socket as QEMU opens it (relative to its cwd for a QEMU qmpd launched) and as clients reach it. */
  private socketPath(vm: string): string {
    return join(this.deps.paths.vmDir(vm), EXPORT_FILES.socket)
  }

  /**
   * The NBD socket as qmpd itself connects to it: its absolute path, or, when that is too long for
   * sun_path, the same file through the QEMU's working directory (/proc/PID/cwd is the VM directory
   * of a QEMU qmpd launched).
   */
  private reachableSocket(vm: string): string {
    const path = this.socketPath(vm)
    const pid = this.deps.vms.record(vm).runtime.pid
    return Buffer.byteLength(path) <= MAX_SOCKET_PATH || !pid ? path : `/proc/${pid}/cwd/${EXPORT_FILES.socket}`
  }

  /** The export's setup: a journaled step program (recovery: src/export/recovery.ts). */
  private async setUp(vm: string, body: CreateExportBody, job: string, tcp?: { host: string; port: number }): Promise<ExportRecord> {
    const found = await this.precheck(vm, body)
    const rec = this.deps.vms.record(vm)
    const qmp = this.deps.vms.qmp(vm)
    const id = randomBytes(4).toString('hex')
    const vmDir = this.deps.paths.vmDir(vm)
    const disks: ExportDisk[] = found.map((f) => ({
      disk: f.disk,
      source: f.source,
      scratch: this.deps.paths.confine(join(vmDir, scratchName(id, f.disk)), 'scratch'),
      ...exportNames(id, f.disk),
      ...(body.bitmap ? { bitmap: body.bitmap } : {}),
    }))
    const record: ExportRecord = { id, vm, socket: this.socketPath(vm), ...(rec.runtime.pid ? { pid: rec.runtime.pid } : {}), disks, ...(tcp ? { tcp } : {}), createdAt: new Date().toISOString() }
    const granularity = new Map(found.flatMap((f) => (f.granularity ? [[f.disk, f.granularity] as const] : [])))
    return this.deps.journal.run({ vm, op: EXPORT_ADD_OP, job, body: record, qemuPid: () => this.deps.vms.record(vm).runtime.pid }, (o) =>
      withReverter(this.deps.log, async (r) => {
        r.add('take the export down', () => takeDown(qmp, record, this.recordsOf(vm).length === 0))
        await o.step('server', async () => {
          await startNbdServer(qmp, isAdopted(rec.definition) ? record.socket : EXPORT_FILES.socket)
          chmodSync(record.socket, 0o600)
        })
        for (const d of disks) {
          const size = (await qmp.execute('query-named-block-nodes', { flat: true })).find((n) => n['node-name'] === d.source)?.image['virtual-size']
          if (size === undefined) throw new QmpdError('DISK_NOT_FOUND', `QEMU has no node ${d.source} for disk ${d.disk}`, { vm, disk: d.disk })
          await o.step(`scratch-${d.disk}`, () => this.deps.qemuImg.create(d.scratch, 'qcow2', { sizeBytes: size }))
          await o.step(`scratch-node-${d.disk}`, () => addScratchNode(qmp, d))
        }
        await o.step('fleece', () => beginFleecing(qmp, disks, granularity))
        for (const d of disks) await o.step(`export-${d.disk}`, () => addNbdExport(qmp, d))
        await o.step('record', () => {
          this.saveRecords(vm, [...this.recordsOf(vm), record])
          o.end()
        })
        return record
      }),
    )
  }

  /**
   * DELETE /v1/vms/{vm}/exports/{id}: ends the export (its NBD clients are dropped), cancels the
   * fleecing job, removes the scratch node and file; through the VM's queue.
   * @throws QmpdError VM_NOT_FOUND, EXPORT_NOT_FOUND; the QMP errors of the teardown (the record stays, DELETE again).
   */
  async remove(vm: string, id: string): Promise<void> {
    this.deps.vms.record(vm)
    if (!this.recordsOf(vm).some((e) => e.id === id)) throw new QmpdError('EXPORT_NOT_FOUND', `VM ${vm} has no export ${id}`, { vm, export: id })
    const job = this.deps.jobs.submit({
      vm,
      op: 'export-delete',
      params: { export: id },
      run: async (ctx) => {
        const record = this.recordsOf(vm).find((e) => e.id === id)
        if (!record) return { export: id }
        await this.deps.journal.run({ vm, op: EXPORT_REMOVE_OP, job: ctx.id, body: record }, async (o) => {
          const rt = this.deps.vms.record(vm).runtime
          const qmp = isRunningState(rt.state) && rt.pid === record.pid ? this.deps.vms.qmp(vm) : undefined
          await this.closeForward(id)
          await o.step('teardown', () => takeDown(qmp, record, this.recordsOf(vm).length === 1))
          await o.step('record', () => {
            this.saveRecords(vm, this.recordsOf(vm).filter((e) => e.id !== id))
            o.end()
          })
        })
        return { export: id }
      },
    })
    const done = await this.deps.jobs.wait(job.id, 10 * 60_000)
    if (done.state !== 'succeeded') {
      const e = done.error ?? { code: 'INTERNAL', message: `export delete job ${done.state}` }
      throw new QmpdError(e.code as ErrorCode, e.message, { ...e.details, job: done.id })
    }
  }

  /** After a QEMU ended: its exports went with it; the scratch files and records go too. */
  private forgetEnded(vm: string): void {
    for (const e of this.recordsOf(vm)) void this.closeForward(e.id)
    for (const e of this.recordsOf(vm)) for (const d of e.disks) rmSync(d.scratch, { force: true })
    rmSync(this.socketPath(vm), { force: true })
    this.saveRecords(vm, [])
    this.deps.log.info({ vm }, 'QEMU ended: its NBD exports are gone')
  }

  /** Stops the export's TCP forwarder, if it has one (its clients are dropped). */
  private async closeForward(id: string): Promise<void> {
    const f = this.forwards.get(id)
    this.forwards.delete(id)
    await f?.close()
  }

  /** Stops every TCP forwarder (daemon close). */
  async closeAll(): Promise<void> {
    await Promise.all([...this.forwards.keys()].map((id) => this.closeForward(id)))
  }

  /**
   * Crash recovery of an export operation (src/export/recovery.ts): whatever step it reached, the
   * export is taken down and its record dropped. Returns what was done.
   */
  async undoAfterCrash(record: ExportRecord): Promise<string> {
    const rt = this.deps.vms.record(record.vm).runtime
    const qmp = isRunningState(rt.state) && rt.pid === record.pid ? this.deps.vms.qmp(record.vm) : undefined
    const others = this.recordsOf(record.vm).filter((e) => e.id !== record.id)
    await takeDown(qmp, record, others.length === 0)
    this.saveRecords(record.vm, others)
    return `export ${record.id} taken down${qmp ? '' : ' (its QEMU was gone)'}, scratch files removed`
  }

  /**
   * At start, after crash recovery: a new daemon ends every export a previous one left open (its
   * clients are dropped, the graph is restored, scratch files removed).
   */
  async init(vms: string[]): Promise<void> {
    for (const vm of vms) {
      let list: ExportRecord[]
      try {
        list = this.recordsOf(vm)
      } catch (err) {
        this.deps.log.error({ vm, err }, 'unreadable exports record; left in place')
        continue
      }
      if (list.length === 0) continue
      const rt = this.deps.vms.record(vm).runtime
      for (const e of list) {
        const qmp = isRunningState(rt.state) && rt.pid === e.pid ? this.deps.vms.qmp(vm) : undefined
        try {
          await takeDown(qmp, e, true)
        } catch (err) {
          this.deps.log.error({ vm, export: e.id, err }, 'could not take a stale export down')
        }
      }
      this.saveRecords(vm, [])
      this.deps.log.warn({ vm, exports: list.map((e) => e.id) }, 'exports left by the previous daemon ended')
    }
  }
}

/**
 * Takes an export down from any step it reached: each disk's QEMU objects (when a QEMU is given),
 * the scratch files, and the NBD server when `last` and no export is left on it.
 * @throws QmpdError the QMP errors of the teardown.
 */
export async function takeDown(qmp: QmpClient | undefined, record: ExportRecord, last: boolean): Promise<void> {
  if (qmp) for (const d of record.disks) await teardownDisk(qmp, d)
  for (const d of record.disks) rmSync(d.scratch, { force: true })
  if (qmp && last) {
    await stopNbdServerIfIdle(qmp)
    if ((await qmp.execute('query-block-exports')).length === 0) rmSync(record.socket, { force: true })
  }
}
