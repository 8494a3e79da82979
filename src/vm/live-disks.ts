// qmpd's own view of a running VM's block graph (the disks GET /v1/vms/{vm} shows), kept per QMP
// session and refreshed when the session's graph epoch moves; reads only, never changes QEMU.
import type { QmpClient } from '../qmp/index.ts'

/**
 * How long a view is trusted even when no command or event moved the graph: a guard against a
 * change qmpd cannot see (a guest growing a layer's actual-size, an event QEMU does not send).
 */
export const LIVE_VIEW_MAX_AGE_MS = 5_000

interface Entry<T> {
  epoch: number
  at: number
  value: T
}

/**
 * One cached value per QMP session, valid while QmpClient.graphEpoch holds (it moves with every
 * command qmpd sends that may change the block graph, a new session, DEVICE_DELETED and the end of
 * jobs qmpd did not start) and for at most LIVE_VIEW_MAX_AGE_MS. Concurrent misses share one read.
 */
export class LiveGraphCache<T> {
  private readonly entries = new WeakMap<QmpClient, Entry<T>>()
  private readonly inflight = new WeakMap<QmpClient, { epoch: number; p: Promise<T> }>()
  /** Reads of QEMU so far (tests: a warm GET runs none). */
  reads = 0

  constructor(private readonly maxAgeMs = LIVE_VIEW_MAX_AGE_MS) {}

  /**
   * The cached value for `qmp`, or `read()`'s (stored under the epoch seen before it ran, so a
   * change during the read makes the next call read again). The value is shared: callers must
   * not mutate it. Rejects with read()'s error, which is never cached.
   */
  async get(qmp: QmpClient, read: () => Promise<T>): Promise<T> {
    const epoch = qmp.graphEpoch
    const hit = this.entries.get(qmp)
    if (hit && hit.epoch === epoch && performance.now() - hit.at <= this.maxAgeMs) return hit.value
    const running = this.inflight.get(qmp)
    if (running && running.epoch === epoch) return running.p
    const at = performance.now()
    this.reads++
    const p = read().then((value) => {
      this.entries.set(qmp, { epoch, at, value })
      return value
    })
    this.inflight.set(qmp, { epoch, p })
    try {
      return await p
    } finally {
      if (this.inflight.get(qmp)?.p === p) this.inflight.delete(qmp)
    }
  }

  /** Forgets the value of `qmp` (a change qmpd knows of that the epoch does not show). */
  invalidate(qmp: QmpClient): void {
    this.entries.delete(qmp)
    this.inflight.delete(qmp)
  }
}
