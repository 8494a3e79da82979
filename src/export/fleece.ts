// The QEMU side of a pull-mode export (image fleecing, docs/interop/bitmaps.rst): NBD server,
// scratch node, the sync=none backup job and the NBD export, and taking them down again; knows
// nothing of the store, HTTP or the journal.
import { QmpCommandError } from '../errors.ts'
import type { QmpClient } from '../qmp/index.ts'
import { sleep } from '../util.ts'
import type { ExportDisk } from './model.ts'

/**
 * Starts the VM's NBD server on a unix socket (`path` as QEMU opens it: relative to its cwd, the
 * VM directory, for QEMUs qmpd launched). Returns false when a server already runs (one per QEMU,
 * and qmpd starts it for its first export).
 * @throws QmpdError QMP_COMMAND_FAILED for any other refusal.
 */
export async function startNbdServer(qmp: QmpClient, path: string): Promise<boolean> {
  try {
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path } } })
    return true
  } catch (err) {
    if (err instanceof QmpCommandError && /already running/i.test(err.desc)) return false
    throw err
  }
}

/** Stops the NBD server when no export is left on it (no-op when none runs). */
export async function stopNbdServerIfIdle(qmp: QmpClient): Promise<void> {
  if ((await qmp.execute('query-block-exports')).some((e) => e.type === 'nbd')) return
  try {
    await qmp.execute('nbd-server-stop')
  } catch (err) {
    // "NBD server not running": nothing to stop.
    if (!(err instanceof QmpCommandError)) throw err
  }
}

/**
 * Opens the scratch image (created empty, same size as the disk) as a qcow2 node whose backing is
 * the disk's top node: reads of clusters the backup job has not copied fall through to the disk.
 * @throws QmpdError QMP_COMMAND_FAILED when QEMU refuses.
 */
export async function addScratchNode(qmp: QmpClient, d: ExportDisk): Promise<void> {
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': d.node, file: { driver: 'file', filename: d.scratch }, backing: d.source })
}

/**
 * The point in time, for all disks at once (one transaction): per disk a disabled copy of the
 * bitmap on the scratch node (so it says what was dirty at this instant, not later) and a
 * blockdev-backup sync=none from the disk into the scratch (the fleecing job; it runs until
 * cancelled and never completes by itself).
 * @throws QmpdError QMP_COMMAND_FAILED when QEMU refuses (it then changed nothing).
 */
export async function beginFleecing(qmp: QmpClient, disks: ExportDisk[], granularity: ReadonlyMap<string, number>): Promise<void> {
  await qmp.execute('transaction', {
    actions: disks.flatMap((d) => [
      ...(d.bitmap
        ? [
            { type: 'block-dirty-bitmap-add' as const, data: { node: d.node, name: d.bitmap, disabled: true, ...(granularity.has(d.disk) ? { granularity: granularity.get(d.disk)! } : {}) } },
            { type: 'block-dirty-bitmap-merge' as const, data: { node: d.node, target: d.bitmap, bitmaps: [{ node: d.source, name: d.bitmap }] } },
          ]
        : []),
      { type: 'blockdev-backup' as const, data: { 'job-id': d.job, device: d.source, target: d.node, sync: 'none' as const, 'auto-finalize': false, 'auto-dismiss': false } },
    ]),
  })
}

/**
 * Exports the scratch node read-only under the disk's id, with its frozen bitmap (QEMU looks the
 * name up on the node first, so the copy on the scratch shadows the live one below it).
 * @throws QmpdError QMP_COMMAND_FAILED when QEMU refuses.
 */
export async function addNbdExport(qmp: QmpClient, d: ExportDisk): Promise<void> {
  await qmp.execute('block-export-add', { type: 'nbd', id: d.exportId, 'node-name': d.node, name: d.disk, writable: false, ...(d.bitmap ? { bitmaps: [d.bitmap] } : {}) })
}

/** Waits until `gone` says so, polling QEMU (export deletion and job cancel finish asynchronously). */
async function until(gone: () => Promise<boolean>, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!(await gone())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(50)
  }
}

/**
 * Takes one exported disk down in QEMU, from whatever step it reached: the export (clients are
 * dropped), the backup job (cancelled, then dismissed), the scratch node. Idempotent: each object
 * is looked up first, so it is safe after a crash at any step. The scratch file is the caller's.
 * @throws QmpdError QMP_COMMAND_FAILED when QEMU refuses a removal; Error on a timeout.
 */
export async function teardownDisk(qmp: QmpClient, d: ExportDisk): Promise<void> {
  if ((await qmp.execute('query-block-exports')).some((e) => e.id === d.exportId)) {
    await qmp.execute('block-export-del', { id: d.exportId, mode: 'hard' })
  }
  await until(async () => !(await qmp.execute('query-block-exports')).some((e) => e.id === d.exportId), `export ${d.exportId} to go`)
  const job = (await qmp.execute('query-jobs')).find((j) => j.id === d.job)
  if (job) {
    if (job.status !== 'concluded') await qmp.execute('job-cancel', { id: d.job })
    await until(async () => (await qmp.execute('query-jobs')).find((j) => j.id === d.job)?.status === 'concluded', `job ${d.job} to conclude`)
    await qmp.execute('job-dismiss', { id: d.job })
  }
  if ((await qmp.execute('query-named-block-nodes', { flat: true })).some((n) => n['node-name'] === d.node)) {
    await qmp.execute('blockdev-del', { 'node-name': d.node })
  }
}
