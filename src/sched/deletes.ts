// The deletes the scheduler asks for (retention and expiry): each goes through the normal snapshot
// delete job; a refused or failed one is reported and not asked for again. Decides nothing about
// which snapshot goes (prune.ts, scheduler.ts do).
import type { Logger } from 'pino'
import type { EventBus } from '../events/bus.ts'
import type { Job } from '../jobs/model.ts'
import type { SnapshotService } from '../snapshot/service.ts'
import { toQmpdError } from '../errors.ts'
import type { PendingDelete } from './model.ts'

interface Entry extends PendingDelete {
  vm: string
  /** The schedule that took the snapshot, if one did: its view lists the delete. */
  schedule: string | undefined
}

/**
 * Deletes asked for by the scheduler, by VM and snapshot, while their job is queued or running,
 * and after a refusal (in memory: a daemon restart asks once more). One entry per snapshot: a
 * snapshot is never handed to the delete queue twice while one delete of it is pending.
 */
export class SchedDeletes {
  private readonly entries = new Map<string, Entry>()

  constructor(private readonly deps: { snapshots: SnapshotService; bus: EventBus; log: Logger }) {}

  /** Whether a delete of the snapshot is pending or was refused. */
  has(vm: string, snapshot: string): boolean {
    return this.entries.has(key(vm, snapshot))
  }

  /**
   * Queues the normal delete of a snapshot (its children move up to its parent) unless one is
   * pending or was refused. Returns the entry; a refusal at submit (busy disks, a state that
   * allows no delete) is kept in it as `refused`.
   */
  request(vm: string, snapshot: string, why: PendingDelete['why'], schedule: string | undefined): Entry {
    const k = key(vm, snapshot)
    const old = this.entries.get(k)
    if (old) return old
    const entry: Entry = { vm, snapshot, why, schedule }
    try {
      entry.job = this.deps.snapshots.delete(vm, snapshot, {}).id
    } catch (err) {
      entry.refused = toQmpdError(err).message
      this.deps.log.warn({ vm, snapshot, why, err }, 'scheduled delete refused; not asked for again')
    }
    this.entries.set(k, entry)
    return entry
  }

  /** A job became final: a delete of ours that succeeded is forgotten, one that failed is kept as refused. */
  onJobFinal(job: Job): void {
    if (job.op !== 'snapshot-delete') return
    for (const [k, e] of this.entries) {
      if (e.job !== job.id) continue
      if (job.state === 'succeeded') this.entries.delete(k)
      else {
        e.refused = job.error?.message ?? `delete job ${job.state}`
        this.deps.log.warn({ vm: e.vm, snapshot: e.snapshot, job: job.id }, 'scheduled delete failed; not asked for again')
      }
    }
  }

  /** The pending and refused deletes of the snapshots a schedule took (entries whose snapshot is gone are dropped). */
  of(vm: string, schedule: string): PendingDelete[] {
    const out: PendingDelete[] = []
    for (const [k, e] of this.entries) {
      if (e.vm !== vm || e.schedule !== schedule) continue
      if (e.refused !== undefined && !this.deps.snapshots.repo.get(vm, e.snapshot)) {
        this.entries.delete(k)
        continue
      }
      out.push({ snapshot: e.snapshot, why: e.why, ...(e.job ? { job: e.job } : {}), ...(e.refused ? { refused: e.refused } : {}) })
    }
    return out
  }

  /** Forgets a deleted VM's entries. */
  forgetVm(vm: string): void {
    for (const [k, e] of this.entries) if (e.vm === vm) this.entries.delete(k)
  }
}

function key(vm: string, snapshot: string): string {
  return `${vm}\0${snapshot}`
}
