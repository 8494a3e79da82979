// A bounded, numbered history of bus events so an SSE client can resume with Last-Event-ID; it
// keeps events in memory only and never blocks the bus.
import type { BusEvent, EventBus } from './bus.ts'

/** An event with the id the SSE stream sends it under. */
export interface NumberedEvent {
  id: number
  ev: BusEvent
}

/** How many recent events a reconnecting client can get back (older ones are gone). */
export const REPLAY_EVENTS = 2048

/**
 * Numbers every bus event (1, 2, …, per app) and keeps the last `size` of them. Ids are the SSE
 * `id:` lines, shared by every client, so a client that reconnects with Last-Event-ID gets what it
 * missed, as long as it is still kept.
 */
export class EventReplay {
  private readonly ring: NumberedEvent[] = []
  private seq = 0
  private readonly listeners = new Set<(e: NumberedEvent) => void>()
  private readonly unsubscribe: () => void

  constructor(bus: EventBus, private readonly size = REPLAY_EVENTS) {
    this.unsubscribe = bus.subscribe((ev) => {
      const e = { id: ++this.seq, ev }
      this.ring.push(e)
      if (this.ring.length > this.size) this.ring.shift()
      for (const l of this.listeners) l(e)
    })
  }

  /**
   * The kept events with an id above `after`, oldest first. `complete` is false when some were
   * already dropped, or when `after` is beyond the last id (an id of a previous daemon: ids restart
   * with the daemon).
   */
  since(after: number): { events: NumberedEvent[]; complete: boolean } {
    const events = this.ring.filter((e) => e.id > after)
    const oldest = this.ring[0]?.id ?? this.seq + 1
    return { events, complete: after <= this.seq && after >= oldest - 1 }
  }

  /** Subscribes to numbered events; returns the function that unsubscribes. */
  subscribe(listener: (e: NumberedEvent) => void): () => void {
    this.listeners.add(listener)
    return () => this.listeners.delete(listener)
  }

  /** Stops recording. */
  close(): void {
    this.unsubscribe()
    this.listeners.clear()
  }
}
