// The check's process and migration findings (store against /proc and QEMU); changes nothing.
import { existsSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { OWN_JOB_PREFIX } from '../qmp/index.ts'
import type { MigrationStatus } from '../qmp/commands.ts'
import { VM_FILES } from '../vm/argv.ts'
import { isAdopted, type VmDefinition } from '../vm/definition.ts'
import { isAlive, qemuPidsWithCwd } from '../vm/proc.ts'
import type { CheckRun } from './check-context.ts'
import { orphanKind } from './orphans.ts'

/** States in which the store expects a QEMU process. */
const PROCESS_STATES = new Set(['running', 'paused', 'stopping', 'unknown', 'starting'])

/** Outgoing migration states in which QEMU is still sending (qapi/migration.json MigrationStatus). */
const MIGRATING: ReadonlySet<MigrationStatus> = new Set([
  'setup',
  'active',
  'cancelling',
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover',
  'postcopy-recover-setup',
  'pre-switchover',
  'device',
  'wait-unplug',
])

/**
 * The QEMU process against the store: with a process state its PID lives with the recorded start
 * time and QMP is connected; in every other state no qemu-system runs with the VM directory as
 * cwd (nor, running, a second one besides the recorded PID).
 */
export function checkProcess(run: CheckRun, qmpConnected: boolean): void {
  const rt = run.rec.runtime
  const adopted = isAdopted(run.rec.definition)
  if (PROCESS_STATES.has(rt.state)) {
    // A start in flight has no PID yet: its job decides.
    if (rt.state === 'starting' && run.busy) return
    run.counts.processes++
    if (rt.pid === undefined ? !adopted : !isAlive(rt.pid, rt.pidStartTime)) {
      run.add({
        code: 'PROCESS_GONE',
        message: `the store says ${rt.state} with QEMU pid ${rt.pid ?? '(none)'}, but that process is not alive`,
        store: { state: rt.state, pid: rt.pid, pidStartTime: rt.pidStartTime },
        repair: 'none automatic: flags the VM needs-repair (a daemon restart re-derives the state from /proc)',
      })
    } else if (!qmpConnected) {
      run.add({
        code: 'QMP_DISCONNECTED',
        message: `QEMU pid ${rt.pid ?? '(unknown)'} runs but qmpd has no QMP session with it`,
        store: { state: rt.state, qmpSocket: rt.qmpSocket },
        repair: 'none automatic: flags the VM needs-repair (a daemon restart reconnects)',
      })
    }
  }
  if (adopted) return // an adopted QEMU runs wherever its owner started it
  const strays = qemuPidsWithCwd(run.dir).filter((pid) => !(PROCESS_STATES.has(rt.state) && pid === rt.pid))
  run.counts.processes += strays.length
  if (strays.length > 0) {
    run.add({
      code: 'PROCESS_UNRECORDED',
      message: `qemu-system ${strays.length > 1 ? 'processes' : 'process'} ${strays.join(', ')} ${strays.length > 1 ? 'run' : 'runs'} in the VM directory, which the store does not know of (state ${rt.state})`,
      store: { state: rt.state, pid: rt.pid },
      actual: strays,
      repair: 'none automatic: flags the VM needs-repair (kill the stray QEMU, or adopt it)',
    })
  }
}

/** State 'saved' if and only if <vmdir>/managed.save exists. */
export function checkManagedSave(run: CheckRun): void {
  if (isAdopted(run.rec.definition) || run.busy) return // a save or restore in flight moves the file
  const file = join(run.dir, VM_FILES.managedSave)
  const exists = existsSync(file)
  const { state } = run.rec.runtime
  if (state === 'saved' && !exists) {
    run.add({
      code: 'MANAGED_SAVE_MISSING',
      message: `the store says saved, but ${file} does not exist`,
      store: state,
      repair: 'the store follows the files: the VM becomes shutoff (the next start boots afresh)',
      fix: { kind: 'mark-shutoff' },
    })
  } else if (state !== 'saved' && exists) {
    run.add({
      code: 'MANAGED_SAVE_UNRECORDED',
      message: `${file} exists, but the store says ${state}`,
      store: state,
      actual: file,
      ...(state === 'shutoff'
        ? { repair: 'the store follows the files: the VM becomes saved (the next start restores it)', fix: { kind: 'mark-saved' as const } }
        : { repair: 'none automatic: flags the VM needs-repair (discard the file, or stop the VM and repair)' }),
    })
  }
}

/** Journal rows of the VM: an operation interrupted by a crash that recovery has not finished. */
export function checkJournal(run: CheckRun, pending: Array<{ id: string; op: string }>): void {
  run.counts.journal += pending.length
  for (const e of pending) {
    run.add({
      code: 'JOURNAL_PENDING',
      message: `journal entry ${e.id} (${e.op}) was not recovered`,
      store: e,
      repair: 'none automatic: flags the VM needs-repair (recovery retries it at the next daemon start)',
    })
  }
}

/** No QEMU job of qmpd's and no outgoing migration unless a job of this VM runs now. */
export function checkQemuJobs(run: CheckRun): void {
  if (!run.live) return
  run.counts.qemuJobs += run.live.jobs.length
  if (run.busy) return
  for (const j of run.live.jobs.filter((x) => x.id.startsWith(OWN_JOB_PREFIX))) {
    run.add({
      code: 'QEMU_JOB_ORPHANED',
      message: `QEMU runs job ${j.id} (${j.type}, ${j.status}) but no qmpd job of this VM runs`,
      actual: { id: j.id, type: j.type, status: j.status },
      repair: `none automatic: flags the VM needs-repair (cancel and dismiss QEMU job ${j.id})`,
    })
  }
  const status = run.live.migration.status
  if (status && MIGRATING.has(status)) {
    run.add({
      code: 'MIGRATION_ORPHANED',
      message: `QEMU has an outgoing migration in state ${status} but no qmpd job of this VM runs`,
      actual: status,
      repair: 'none automatic: flags the VM needs-repair (migrate_cancel)',
    })
  }
}

/**
 * Files in the VM directory that qmpd's own naming makes and nothing references: temporary files
 * (removed by repair) and images or RAM state files no record names (flagged; qmpd never deletes
 * an image it cannot attribute).
 */
export function checkFiles(run: CheckRun): void {
  if (isAdopted(run.rec.definition) || !existsSync(run.dir)) return
  const referenced = referencedFiles(run)
  for (const entry of readdirSync(run.dir, { withFileTypes: true })) {
    if (entry.isDirectory()) continue
    run.counts.files++
    if (run.busy) continue // an operation in flight owns its temporary and not yet recorded files
    const path = join(run.dir, entry.name)
    const kind = orphanKind(entry.name, path, referenced)
    if (kind === 'temporary') {
      run.add({
        code: 'ORPHAN_FILE',
        message: `${path} is a temporary file of an operation that is over`,
        actual: path,
        repair: `removes ${path}`,
        fix: { kind: 'remove-temp-file', file: path },
      })
    } else if (kind === 'unreferenced') {
      run.add({
        code: 'ORPHAN_FILE',
        message: `${path} is referenced by no disk, image graph row or snapshot`,
        actual: path,
        repair: 'none automatic: flags the VM needs-repair (delete the file if nothing needs it)',
      })
    }
  }
}

/** Every path a record of the VM names: definition, runtime, image graph, snapshots. */
function referencedFiles(run: CheckRun): Set<string> {
  const out = new Set<string>()
  const def = run.rec.definition as VmDefinition
  for (const d of def.disks ?? []) out.add(d.file)
  if (def.kernel) out.add(def.kernel)
  if (def.initrd) out.add(def.initrd)
  for (const d of run.rec.runtime.disks) out.add(d.file)
  for (const f of run.rec.runtime.createdFiles) out.add(f)
  for (const f of run.chainFiles) out.add(f)
  for (const i of run.images) {
    out.add(i.file)
    if (i.backing) out.add(i.backing)
  }
  for (const s of run.snapshots) {
    if (s.vmstateFile) out.add(s.vmstateFile)
    for (const d of s.disks) {
      out.add(d.file)
      if (d.overlay) out.add(d.overlay)
    }
  }
  return out
}
