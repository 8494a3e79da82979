// The table of which VM states each operation accepts and leaves; the one place such refusals are
// made.
import { QmpdError } from '../errors.ts'
import type { VmState } from './definition.ts'

/** What one operation needs of the VM's state, and the state it leaves the VM in when it succeeds. */
export interface StateRule {
  /** The states in which the operation may run; any other is refused with INVALID_STATE. */
  accepts: readonly VmState[]
  /** The state the VM is in once the operation succeeded (absent: it depends on the request, or is unchanged). */
  leaves?: VmState
  /** Advice appended to the refusal in one state (what the caller should do first). */
  hints?: Partial<Record<VmState, (vm: string) => string>>
}

const LIVE: readonly VmState[] = ['running', 'paused']
/** No QEMU starting or stopping, and qmpd knows what runs (and no managed save holds the VM). */
const SETTLED: readonly VmState[] = ['running', 'paused', 'shutoff', 'crashed']

/**
 * The legal VM states of every operation, read by every service (CONVENTIONS 17). Where two
 * places checked the same operation differently, each keeps its own row (restore at submit time
 * versus the launch it runs; snapshot delete versus revert and create).
 */
export const VM_STATES = {
  /** Start, also the launch inside revert and restore (VmManager.launchInJob). */
  start: { accepts: ['shutoff', 'crashed', 'saved'], leaves: 'running' },
  stop: { accepts: ['running', 'paused', 'unknown'], leaves: 'shutoff' },
  pause: { accepts: ['running'], leaves: 'paused' },
  resume: { accepts: ['paused'], leaves: 'running' },
  save: { accepts: LIVE, leaves: 'shutoff' },
  managedsave: { accepts: LIVE, leaves: 'saved' },
  /** Checked at submit time (when the queue is idle); the job itself launches QEMU under `start`, which also accepts saved. */
  restore: { accepts: ['shutoff', 'crashed'], leaves: 'running' },
  /** Any snapshot creation; with memory or quiesce the rows below apply as well. */
  'snapshot-create': { accepts: SETTLED },
  /** A snapshot with RAM needs a QEMU to take it from. */
  'snapshot-create-memory': { accepts: LIVE },
  'snapshot-create-quiesce': {
    accepts: ['running'],
    hints: { paused: () => 'a stopped guest agent cannot freeze anything' },
  },
  'snapshot-revert': {
    accepts: SETTLED,
    hints: { saved: (vm) => `start it or discard the save (DELETE /v1/vms/${vm}/managedsave) before reverting` },
  },
  'snapshot-delete': { accepts: [...SETTLED, 'saved'] },
  /** Reads a snapshot's frozen data into a new file; the VM may run (src/snapshot/export.ts). */
  'snapshot-export': { accepts: [...SETTLED, 'saved'] },
  commit: { accepts: SETTLED },
  pull: { accepts: SETTLED },
  copy: { accepts: SETTLED },
  /** POST /v1/vms/{vm}/backups: push-mode backup jobs need the VM's QEMU (src/backup). */
  backup: { accepts: LIVE },
  /** DELETE /v1/vms/{vm} of a VM qmpd defines (an adopted VM may be forgotten in any state): no QEMU may run. */
  'vm-delete': {
    accepts: ['shutoff', 'crashed', 'saved', 'starting'],
    hints: { running: () => 'stop it first', paused: () => 'stop it first', unknown: () => 'stop it first' },
  },
  /**
   * PATCH /v1/vms/{vm}: no QEMU, and no managed save (its device state belongs to the definition
   * it was taken with; libvirt refuses the same).
   */
  'vm-patch': {
    accepts: ['shutoff', 'crashed'],
    hints: {
      running: () => 'stop it first',
      paused: () => 'stop it first',
      saved: (vm) => `start it or discard the save (DELETE /v1/vms/${vm}/managedsave) first`,
    },
  },
  /** POST /v1/vms/{vm}/exports: a pull-mode NBD export needs a QEMU to serve it. */
  export: { accepts: LIVE },
  /** DELETE /v1/vms/{vm}/managedsave. */
  'managedsave-discard': { accepts: ['saved'], leaves: 'shutoff' },
} as const satisfies Record<string, StateRule>

/** An operation of the state table. */
export type VmOperation = keyof typeof VM_STATES

/** Whether `op` may run while the VM is in `state`. */
export function stateAccepts(op: VmOperation, state: VmState): boolean {
  return (VM_STATES[op].accepts as readonly VmState[]).includes(state)
}

/**
 * Refuses `op` on VM `vm` in `state` when the table does not list that state for it: throws
 * INVALID_STATE naming the operation, the state and the states it needs.
 * @throws QmpdError INVALID_STATE when the table does not allow `op` in `state`.
 */
export function assertState(vm: string, state: VmState, op: VmOperation): void {
  if (stateAccepts(op, state)) return
  const rule: StateRule = VM_STATES[op]
  const hint = rule.hints?.[state]?.(vm)
  throw new QmpdError('INVALID_STATE', `cannot ${op} VM ${vm} while it is ${state} (needs ${rule.accepts.join(' or ')})${hint ? `: ${hint}` : ''}`, { vm, state, op })
}

/** True for states in which a QEMU process exists. */
export function isRunningState(s: VmState): boolean {
  return s === 'running' || s === 'paused' || s === 'stopping' || s === 'unknown'
}
