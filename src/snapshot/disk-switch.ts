// The disk step of a snapshot: QMP transaction, optionally with guest filesystems frozen; no
// journal writes.
import { join } from 'node:path'
import { QmpdError } from '../errors.ts'
import type { JobContext } from '../jobs/manager.ts'
import type { QmpClient, TransactionAction } from '../qmp/index.ts'
import { QgaClient, withFrozenFilesystems } from '../qga/client.ts'
import { VM_FILES } from '../vm/argv.ts'
import type { SnapshotDeps } from './deps.ts'
import type { Snapshot } from './model.ts'

/**
 * The disk switch of a disk-only snapshot: in one of the host-wide slots (config
 * parallelDiskSnapshots), so that a burst on many VMs creates overlays a few at a time. A
 * quiesced snapshot takes no slot: its guest must not wait frozen for one, and a slow freeze
 * must not hold one.
 */
export function diskSwitch(d: SnapshotDeps, vm: string, s: Snapshot, ctx: JobContext, transaction: () => Promise<void>): Promise<void> {
  if (s.quiesced) return quiesced(d, vm, s, ctx, transaction)
  return d.diskSwitches.add(transaction)
}

/** Runs the disk step with guest filesystems frozen when the snapshot asks for quiesce. */
async function quiesced<T>(d: SnapshotDeps, vm: string, s: Snapshot, ctx: JobContext, fn: () => Promise<T>): Promise<T> {
  if (!s.quiesced) return fn()
  const sock = join(d.paths.vmDir(vm), VM_FILES.qgaSocket)
  let qga: QgaClient
  try {
    qga = await QgaClient.connect(sock, { timeoutMs: 10_000, logger: ctx.log })
  } catch (err) {
    throw new QmpdError('QGA_UNAVAILABLE', `cannot quiesce VM ${vm}: the guest agent does not answer (${(err as Error).message})`, { vm }, { cause: err })
  }
  try {
    return await withFrozenFilesystems(qga, fn, ctx.log)
  } finally {
    await qga.close()
  }
}

/** Sends a snapshot's disk transaction (after the test hook, which may add actions). */
export async function transaction(d: SnapshotDeps, qmp: QmpClient, actions: TransactionAction[]): Promise<void> {
  const all = [...actions]
  await d.hooks?.transaction?.(all)
  await qmp.execute('transaction', { actions: all })
}
