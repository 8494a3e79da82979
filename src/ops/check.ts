// VmChecker: GET /v1/vms/{vm}/check, the store against QEMU and the files; reports, never repairs.
import { toQmpdError } from '../errors.ts'
import type { PathPolicy } from '../images/paths.ts'
import type { QemuImg } from '../images/qemu-img.ts'
import type { QmpClient } from '../qmp/index.ts'
import type { SnapshotRepo } from '../store/snapshots.ts'
import type { VmManager } from '../vm/manager.ts'
import { CheckRun, type LiveFacts } from './check-context.ts'
import { checkDisks, checkImages } from './check-disks.ts'
import { checkFiles, checkJournal, checkManagedSave, checkProcess, checkQemuJobs } from './check-host.ts'
import type { CheckReport, Finding } from './check-model.ts'
import { checkSnapshots } from './check-snapshots.ts'

/** What the check reads. Functions rather than services where another module owns the answer. */
export interface CheckDeps {
  vms: VmManager
  snapshots: SnapshotRepo
  qemuImg: QemuImg
  paths: PathPolicy
  /** True while the VM has a job queued or running: its own queue or a block job on a disk. */
  busy: (vm: string) => boolean
  /** The VM's journal rows that recovery has not finished. */
  pendingJournal: (vm: string) => Array<{ id: string; op: string }>
}

/** A check's public report and its findings, with what reconcile may fix. */
export interface Inspection {
  report: CheckReport
  findings: Finding[]
}

/**
 * Compares, for one VM, what the store says with what QEMU and the files say (GET
 * /v1/vms/{vm}/check). Read-only: it changes nothing, takes no queue slot, and may run at any
 * time; while the VM is busy, what an operation in flight upsets is left out (report.busy).
 */
export class VmChecker {
  constructor(private readonly deps: CheckDeps) {}

  /** The check's report; throws VM_NOT_FOUND for an unknown VM. */
  async check(vm: string): Promise<CheckReport> {
    return (await this.inspect(vm)).report
  }

  /**
   * The check with its findings. `withFlag: false` leaves out the VM's own needs-repair flag, so
   * reconcile can tell whether anything else is still wrong. `idle`: the caller runs as the VM's
   * only job (repair), so the VM counts as idle although its queue is not empty.
   */
  async inspect(vm: string, opts: { withFlag?: boolean; idle?: boolean } = {}): Promise<Inspection> {
    const rec = this.deps.vms.record(vm)
    const busy = !opts.idle && this.deps.busy(vm)
    const qmp = this.liveQmp(vm)
    let live: LiveFacts | undefined
    let qmpError: string | undefined
    if (qmp) {
      try {
        live = await readLive(qmp)
      } catch (err) {
        qmpError = toQmpdError(err).message
      }
    }
    const run = new CheckRun(rec, this.deps.paths.vmDir(vm), this.deps.snapshots.images(vm), this.deps.snapshots.list(vm), busy, live, this.deps.qemuImg)
    checkProcess(run, live !== undefined)
    if (qmpError !== undefined && !run.findings.some((f) => f.code === 'QMP_DISCONNECTED')) {
      run.add({
        code: 'QMP_DISCONNECTED',
        message: `QEMU did not answer the check's queries: ${qmpError}`,
        repair: 'none automatic: flags the VM needs-repair (a daemon restart reconnects)',
      })
    }
    await Promise.all([checkDisks(run), checkImages(run), checkSnapshots(run)])
    checkManagedSave(run)
    checkJournal(run, this.deps.pendingJournal(vm))
    checkQemuJobs(run)
    checkFiles(run)
    const flag = rec.runtime.repair
    if (flag && opts.withFlag !== false) {
      run.add({
        code: 'NEEDS_REPAIR',
        message: `the VM was flagged needs-repair at ${flag.at}: ${flag.reason}`,
        store: flag,
        repair: 'clears the flag once no other problem is left',
      })
    }
    const findings = run.findings
    return {
      findings,
      report: {
        vm,
        ok: findings.length === 0,
        state: rec.runtime.state,
        busy,
        ...(flag ? { needsRepair: flag } : {}),
        problems: findings.map(({ fix: _fix, ...p }) => p),
        checked: run.counts,
      },
    }
  }

  /** The VM's QMP session when it has a live one. */
  private liveQmp(vm: string): QmpClient | undefined {
    try {
      const qmp = this.deps.vms.qmp(vm)
      return qmp.state === 'running' ? qmp : undefined
    } catch {
      return undefined
    }
  }
}

/** QEMU's block graph, jobs and migration, in one round of queries. */
async function readLive(qmp: QmpClient): Promise<LiveFacts> {
  const [blocks, nodes, jobs, migration] = await Promise.all([
    qmp.execute('query-block'),
    qmp.execute('query-named-block-nodes', { flat: true }),
    qmp.execute('query-jobs'),
    qmp.execute('query-migrate'),
  ])
  return { blocks, nodes, jobs, migration }
}
