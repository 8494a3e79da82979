// Plans a snapshot creation from the VM and the request, refusing what cannot work; pure, touches
// nothing.
import { QmpdError } from '../errors.ts'
import type { VmDefinition, VmRuntime, VmState } from '../vm/definition.ts'
import type { PlanDefinition } from '../vm/adopted.ts'
import { assertState, isRunningState } from '../vm/states.ts'
import type { CreateSnapshotInput, Snapshot, SnapshotDisk } from './model.ts'

/** The plan of a snapshot creation, recorded in the journal before anything is touched. */
export interface CreatePlan {
  snapshot: Snapshot
  /** external: per disk, the overlay to create on top of the current active file. */
  overlays: Array<{ id: string; file: string; format: 'qcow2' | 'raw'; overlay: string }>
}

/** Everything planning reads about the VM and the host; the caller gathers it (no QEMU, no store). */
export interface PlanFacts {
  vm: string
  state: VmState
  /** The disks' read-only flags and the guest agent (planDefinition(): a VM's own, or an adopted VM's discovered disks). */
  definition: PlanDefinition
  /** The VM's stored definition, recorded in the snapshot (absent for adopted VMs: qmpd never relaunches them). */
  recorded?: VmDefinition
  runtime: Pick<VmRuntime, 'disks' | 'currentSnapshot'>
  /** The VM's snapshots now. */
  existing: readonly Snapshot[]
  /** The VM's directory: relative overlay and RAM state paths are taken under it. */
  vmDir: string
  /** PathPolicy.resolve: confines a user path (throws on a path outside the allowed roots). */
  resolve: (input: string, baseDir: string, field: string) => string
  /** Whether a file exists now. */
  exists: (file: string) => boolean
  /** The creation time to record (default: now). */
  now?: () => Date
}

/** Works out exactly what a creation will do; every refusal happens here, and nothing is changed. */
export function planCreate(f: PlanFacts, body: CreateSnapshotInput): CreatePlan {
  const { vm, state, definition: def, runtime } = f
  const live = isRunningState(state)
  assertState(vm, state, 'snapshot-create')
  const memory = body.memory ?? live
  if (memory) assertState(vm, state, 'snapshot-create-memory')
  if (body.live && !(body.kind === 'external' && memory)) {
    throw new QmpdError('INVALID_INPUT', 'live applies only to external snapshots with memory', {})
  }
  if (body.quiesce) {
    if (!def.guestAgent) throw new QmpdError('INVALID_STATE', `VM ${vm} has no guest agent (guestAgent: true): cannot quiesce`, { vm })
    assertState(vm, state, 'snapshot-create-quiesce')
    if (memory) throw new QmpdError('INVALID_INPUT', 'quiesce applies to disk-only snapshots (a checkpoint keeps RAM consistent by itself)', {})
  }
  if (body.vmstateFile && !(body.kind === 'external' && memory)) {
    throw new QmpdError('INVALID_INPUT', 'vmstateFile applies only to external snapshots with memory', {})
  }
  const dir = f.vmDir
  const disks: SnapshotDisk[] = []
  const overlays: CreatePlan['overlays'] = []
  for (const active of runtime.disks) {
    const spec = body.disks?.[active.id]
    const ro = def.disks.find((d) => d.id === active.id)?.readOnly
    if (spec?.exclude || ro) {
      if (spec?.file) throw new QmpdError('INVALID_INPUT', `disk ${active.id}: file and exclude cannot go together`, { disk: active.id })
      disks.push({ id: active.id, mode: 'excluded', file: active.file, format: active.format })
      continue
    }
    if (!live && !f.exists(active.file)) {
      throw new QmpdError('INVALID_STATE', `disk ${active.id}: ${active.file} does not exist yet (qmpd creates it at the first start)`, { disk: active.id })
    }
    if (body.kind === 'internal') {
      if (active.format !== 'qcow2') {
        throw new QmpdError('INVALID_STATE', `disk ${active.id} is ${active.format}: internal snapshots need qcow2 (exclude it, or take an external snapshot)`, {
          disk: active.id,
        })
      }
      if (spec?.file) throw new QmpdError('INVALID_INPUT', `disk ${active.id}: file applies only to external snapshots`, { disk: active.id })
      disks.push({ id: active.id, mode: 'internal', file: active.file, format: active.format })
    } else {
      const overlay = f.resolve(spec?.file ?? `${active.id}-${body.name}.qcow2`, dir, `disks.${active.id}.file`)
      if (f.exists(overlay)) throw new QmpdError('FILE_EXISTS', `${overlay} exists; qmpd never overwrites a file`, { file: overlay })
      if (overlays.some((o) => o.overlay === overlay)) throw new QmpdError('INVALID_INPUT', `two disks cannot share the overlay ${overlay}`, { file: overlay })
      disks.push({ id: active.id, mode: 'external', file: active.file, format: active.format, overlay })
      overlays.push({ id: active.id, file: active.file, format: active.format, overlay })
    }
  }
  const captured = disks.filter((d) => d.mode !== 'excluded')
  if (captured.length === 0 && !(memory && body.kind === 'external')) {
    throw new QmpdError('INVALID_INPUT', 'every disk is excluded: nothing to snapshot (a memory-only checkpoint is external with memory)', {})
  }
  if (body.kind === 'internal' && memory && captured.length === 0) {
    throw new QmpdError('INVALID_INPUT', 'an internal checkpoint needs at least one qcow2 disk to hold the RAM state', {})
  }
  let vmstateFile: string | undefined
  if (memory && body.kind === 'external') {
    vmstateFile = f.resolve(body.vmstateFile ?? `${body.name}.vmstate`, dir, 'vmstateFile')
    if (f.exists(vmstateFile)) throw new QmpdError('FILE_EXISTS', `${vmstateFile} exists; qmpd never overwrites a file`, { file: vmstateFile })
  }
  const snapshot: Snapshot = {
    vm,
    name: body.name,
    ...(body.description !== undefined ? { description: body.description } : {}),
    kind: body.kind,
    memory,
    ...(runtime.currentSnapshot ? { parent: runtime.currentSnapshot } : {}),
    createdAt: (f.now?.() ?? new Date()).toISOString(),
    vmState: state === 'running' ? 'running' : state === 'paused' ? 'paused' : 'shutoff',
    disks,
    ...(vmstateFile ? { vmstateFile } : {}),
    ...(body.kind === 'internal' && memory ? { vmstateDisk: captured[0]!.id } : {}),
    ...(body.live !== undefined && memory ? { live: body.live } : {}),
    ...(body.quiesce ? { quiesced: true } : {}),
    ...(f.recorded ? { definition: f.recorded } : {}),
    ...(body.expiresAt !== undefined ? { expiresAt: new Date(body.expiresAt).toISOString() } : {}),
    ...(body.schedule !== undefined ? { schedule: body.schedule } : {}),
  }
  return { snapshot, overlays }
}
