// Long-poll for a VM to reach a run state (GET /v1/vms/{vm}/wait), on the event bus; changes nothing.
import type { EventBus } from '../events/bus.ts'
import type { VmRuntime, VmState } from './definition.ts'
import type { VmManager } from './manager.ts'

/** The states a client may wait for. */
export const WAITABLE_STATES = ['shutoff', 'crashed', 'running', 'paused', 'saved'] as const
export type WaitableState = (typeof WAITABLE_STATES)[number]

/** The answer of a wait: the VM's state when it answered and, once QEMU has exited, how. */
export interface WaitResult {
  state: VmState
  reason?: string
  exit: NonNullable<VmRuntime['exit']> | null
  /** True when the time ran out before the VM reached the state (the answer is still 200). */
  timedOut: boolean
}

/**
 * Resolves once VM `name` is in one of `states` (at once when it already is), or after timeoutMs
 * with timedOut true, or when `signal` aborts (the client went away). Subscribes to the bus before
 * reading the state, so a change between the two is not missed.
 * @throws QmpdError VM_NOT_FOUND (from VmManager.record), also when the VM is deleted while waited for.
 */
export async function waitForState(vms: VmManager, bus: EventBus, name: string, states: readonly VmState[], timeoutMs: number, signal?: AbortSignal): Promise<WaitResult> {
  const answer = (timedOut: boolean): WaitResult => {
    const rt = vms.record(name).runtime
    return { state: rt.state, ...(rt.reason ? { reason: rt.reason } : {}), exit: rt.exit ?? null, timedOut }
  }
  let unsubscribe = (): void => {}
  const reached = new Promise<{ state: VmState; reason?: string }>((resolve) => {
    unsubscribe = bus.subscribe((ev) => {
      if (ev.type === 'vm' && ev.vm === name && states.includes(ev.state)) resolve(ev)
    })
  })
  try {
    if (states.includes(vms.record(name).runtime.state)) return answer(false)
    let timer: NodeJS.Timeout | undefined
    const outcome = await Promise.race([
      reached,
      new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), timeoutMs))),
      new Promise<undefined>((resolve) => signal?.addEventListener('abort', () => resolve(undefined), { once: true })),
    ])
    clearTimeout(timer)
    if (!outcome) return answer(true)
    // The event is emitted after the runtime (the exit record with it) was set; the state may have
    // moved on since (a quick restart): answer the state that was reached, as the event said it.
    const { reason: _r, ...rest } = answer(false)
    return { ...rest, state: outcome.state, ...(outcome.reason ? { reason: outcome.reason } : {}) }
  } finally {
    unsubscribe()
  }
}
