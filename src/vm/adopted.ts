// What qmpd may do to a QEMU it adopted (in place, never a new process) and the refusals that say
// why; no QMP, no store.
import { QmpdError } from '../errors.ts'
import type { DiskDefinition, StoredDefinition, VmDefinition, VmRuntime } from './definition.ts'
import { isAdopted } from './definition.ts'
import { isRunningState } from './states.ts'

/**
 * Refuses an operation on an adopted VM that needs a new QEMU process (a revert that re-opens the
 * disks or loads RAM into a fresh QEMU, a restore, a start): qmpd did not start that QEMU, does
 * not know its command line, and will not guess one.
 * @throws QmpdError ADOPTED_NEEDS_RELAUNCH, always.
 */
export function refuseRelaunch(vm: string, what: string, why: string): never {
  throw new QmpdError(
    'ADOPTED_NEEDS_RELAUNCH',
    `VM ${vm} was adopted: ${what} needs a new QEMU process (${why}), and qmpd does not relaunch a QEMU it did not start (it does not know its command line)`,
    { vm },
  )
}

/**
 * For adopted VMs only: refuses when the adopted QEMU is gone. qmpd works on an adopted VM's
 * disks only through that QEMU (the files are its owner's, often outside qmpd's roots), never
 * with qemu-img offline.
 * @throws QmpdError ADOPTED_NEEDS_RELAUNCH when the VM is adopted and no QEMU runs.
 */
export function requireAdoptedQemu(vm: string, def: StoredDefinition, rt: Pick<VmRuntime, 'state'>, what: string): void {
  if (isAdopted(def) && !isRunningState(rt.state)) {
    refuseRelaunch(vm, what, `the adopted QEMU is ${rt.state}, and qmpd touches an adopted VM's disks only through its QEMU`)
  }
}

/** What snapshot planning reads of a definition: the disks' read-only flags and the guest agent. */
export interface PlanDefinition {
  disks: ReadonlyArray<Pick<DiskDefinition, 'id' | 'readOnly'>>
  guestAgent: boolean
}

/**
 * The definition snapshot planning works from: a VM's own, or for an adopted VM its discovered
 * disks (read-only media were left out at discovery) and no guest agent (its socket, if any, is
 * not one qmpd knows, so quiesce is refused).
 */
export function planDefinition(def: StoredDefinition, rt: Pick<VmRuntime, 'disks'>): PlanDefinition {
  if (!isAdopted(def)) return def satisfies VmDefinition
  return { disks: rt.disks.map((d) => ({ id: d.id, readOnly: false })), guestAgent: false }
}

/**
 * Refuses a revert of an adopted VM unless it can happen inside the running QEMU: only an internal
 * checkpoint (snapshot-load of disks and RAM together) back to a running or paused guest can.
 * @throws QmpdError ADOPTED_NEEDS_RELAUNCH for every other revert.
 */
export function assertAdoptedRevert(vm: string, s: { name: string; kind: 'internal' | 'external'; memory: boolean }, target: string, rt: Pick<VmRuntime, 'state'>): void {
  const what = `reverting to ${s.kind} ${s.memory ? 'checkpoint' : 'disk snapshot'} ${s.name}`
  if (s.kind === 'external') {
    refuseRelaunch(vm, what, "QEMU must open the snapshot's images (and load its RAM) from the start, which only a new process does")
  }
  if (!s.memory) {
    refuseRelaunch(vm, what, 'QEMU has no command that rolls an open disk back to an internal snapshot without RAM: qmpd quits QEMU and applies the tag with qemu-img')
  }
  if (target === 'shutoff') refuseRelaunch(vm, `${what} with state shutoff`, 'qmpd would quit the QEMU and apply the tags offline; only a new process runs the guest again')
  requireAdoptedQemu(vm, { adopt: { qmpSocket: '' }, name: vm }, rt, what)
}
