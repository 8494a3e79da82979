// The in-process event bus (jobs, VM states, QEMU events) that GET /v1/events reads; listeners must
// not block.
import { EventEmitter } from 'node:events'
import type { Job } from '../jobs/model.ts'
import type { VmState } from '../vm/definition.ts'

/** Everything the daemon announces: job changes, VM state changes, QEMU's own events, the scheduler's. */
export type BusEvent =
  | { type: 'job'; vm: string; job: Job }
  | { type: 'vm'; vm: string; state: VmState; reason?: string }
  | { type: 'qmp'; vm: string; event: string; data: unknown; timestamp?: { seconds: number; microseconds: number } }
  | ScheduleEvent

/**
 * What the scheduler announces: a slot fired (its job queued), a slot skipped (why), a snapshot
 * whose expiresAt passed handed to the delete queue (or refused: `reason`). See src/sched/.
 */
export interface ScheduleEvent {
  type: 'schedule'
  vm: string
  event: 'schedule.fired' | 'schedule.skipped' | 'snapshot.expired'
  schedule?: string
  slot?: string
  job?: string
  snapshot?: string
  reason?: string
}

/**
 * The in-process event bus. Emitting never blocks: listeners must hand work off rather than wait.
 * Feeds logs today and the SSE stream (/v1/events) and metrics.
 */
export class EventBus {
  private readonly emitter = new EventEmitter()

  constructor() {
    // Each SSE client and each waiting request is a listener; there is no meaningful small cap.
    this.emitter.setMaxListeners(0)
  }

  emit(ev: BusEvent): void {
    this.emitter.emit('event', ev)
  }

  /** Subscribes; returns the function that unsubscribes. */
  subscribe(listener: (ev: BusEvent) => void): () => void {
    this.emitter.on('event', listener)
    return () => this.emitter.off('event', listener)
  }
}
