// Drives one QEMU job to its end (events, error, dismiss) under an AbortSignal; no qmpd job
// bookkeeping.
import type { Logger } from 'pino'
import { QmpdError } from '../errors.ts'
import type { QmpClient } from '../qmp/index.ts'

/** Options of driveQemuJob. */
export interface DriveOptions {
  log: Logger
  /** Aborting cancels the QEMU job (job-cancel) and the drive rejects with JOB_CANCELLED. */
  signal?: AbortSignal
  /** Called with QEMU's own progress while the job runs (polled from query-jobs). */
  onProgress?: (current: number, total: number) => void
  /**
   * What to do when the job becomes READY (mirror, active commit). Default: job-complete at once
   * (the pivot). Return false to leave it ready; the caller completes or cancels it later.
   */
  onReady?: () => Promise<boolean> | boolean
  progressIntervalMs?: number
  /**
   * Whether the job was created with auto-finalize off (block jobs qmpd starts: the default) and so
   * needs job-finalize when PENDING. snapshot-save/load/delete have no such option: they finalize
   * themselves but still wait for job-dismiss.
   */
  manualFinalize?: boolean
  /** Told of every status QEMU reports for the job (running, ready, paused, standby…). */
  onStatus?: (status: string) => void
}

/** The outcome of a QEMU job: how long it ran and the final progress QEMU reported. */
export interface DriveResult {
  ms: number
  current: number
  total: number
}

/**
 * Runs one QEMU job (snapshot-save/load/delete, block-commit, block-stream, blockdev-mirror…) to its
 * end: subscribes to JOB_STATUS_CHANGE for `id` before `issue` sends the command, finalizes when it
 * is pending (auto-finalize off), completes when ready (unless onReady says not to), reads the
 * error from query-jobs once concluded (QEMU reports failures nowhere else), and always dismisses.
 */
export async function driveQemuJob(qmp: QmpClient, id: string, issue: () => Promise<unknown>, opts: DriveOptions): Promise<DriveResult> {
  const t0 = performance.now()
  const events = qmp.events({ names: ['JOB_STATUS_CHANGE'], filter: (e) => e.data.id === id })
  let progress = { current: 0, total: 0 }
  let poll: NodeJS.Timeout | undefined
  let cancelled = false
  let readySeen = false
  const onAbort = (): void => {
    cancelled = true
    qmp.execute('job-cancel', { id }).catch((err) => opts.log.warn({ err, id }, 'job-cancel failed'))
  }
  try {
    await issue()
    if (opts.onProgress) {
      poll = setInterval(() => {
        qmp.execute('query-jobs').then(
          (jobs) => {
            const j = jobs.find((x) => x.id === id)
            if (j) {
              progress = { current: j['current-progress'], total: j['total-progress'] }
              opts.onProgress?.(progress.current, progress.total)
            }
          },
          () => {},
        )
      }, opts.progressIntervalMs ?? 250)
    }
    opts.signal?.addEventListener('abort', onAbort, { once: true })
    if (opts.signal?.aborted) onAbort()
    for await (const ev of events) {
      const status = ev.data.status
      opts.log.debug({ id, status }, 'qemu job status')
      opts.onStatus?.(status)
      if (status === 'ready' && !readySeen) {
        // READY comes again after a pause/resume (standby -> ready): decide only once.
        readySeen = true
        const complete = opts.onReady ? await opts.onReady() : true
        if (complete) await qmp.execute('job-complete', { id })
      } else if (status === 'pending' && opts.manualFinalize !== false) {
        await qmp.execute('job-finalize', { id })
      } else if (status === 'concluded') {
        break
      } else if (status === 'null') {
        // Dismissed by someone else (auto-dismiss): the outcome is lost.
        throw new QmpdError('INTERNAL', `QEMU job ${id} was dismissed before qmpd could read its result`, { id })
      }
    }
    const info = (await qmp.execute('query-jobs')).find((j) => j.id === id)
    if (info) progress = { current: info['current-progress'], total: info['total-progress'] }
    await qmp.execute('job-dismiss', { id }).catch((err) => opts.log.warn({ err, id }, 'job-dismiss failed'))
    if (cancelled) throw new QmpdError('JOB_CANCELLED', `QEMU job ${id} cancelled`, { id })
    if (info?.error) throw new QmpdError('QMP_COMMAND_FAILED', info.error, { qemuJob: id, desc: info.error })
    opts.onProgress?.(progress.current, progress.total)
    return { ms: Math.round(performance.now() - t0), ...progress }
  } finally {
    if (poll) clearInterval(poll)
    opts.signal?.removeEventListener('abort', onAbort)
    await events.return?.()
  }
}

/**
 * block-commit of `top` (down to, not including, `base`) on the chain whose root is `device`,
 * driven to its end. Committing the active layer (top = device) makes a job that becomes READY and
 * needs job-complete, the pivot (driveQemuJob does it unless opts.onReady says no); an
 * intermediate commit ends by itself. Auto-finalize and auto-dismiss are off so the outcome can be read.
 */
export function commitJob(
  qmp: QmpClient,
  args: { jobId: string; device: string; top: string; base: string; speed?: number },
  opts: DriveOptions,
): Promise<DriveResult> {
  return driveQemuJob(
    qmp,
    args.jobId,
    () =>
      qmp.execute('block-commit', {
        'job-id': args.jobId,
        device: args.device,
        'top-node': args.top,
        'base-node': args.base,
        ...(args.speed ? { speed: args.speed } : {}),
        'auto-finalize': false,
        'auto-dismiss': false,
      }),
    opts,
  )
}

/**
 * block-stream into `device` of everything above `base` (all of the chain when base is omitted),
 * driven to its end. A stream ends by itself (no job-complete).
 */
export function streamJob(qmp: QmpClient, args: { jobId: string; device: string; base?: string; speed?: number }, opts: DriveOptions): Promise<DriveResult> {
  return driveQemuJob(
    qmp,
    args.jobId,
    () =>
      qmp.execute('block-stream', {
        'job-id': args.jobId,
        device: args.device,
        ...(args.base ? { 'base-node': args.base } : {}),
        ...(args.speed ? { speed: args.speed } : {}),
        'auto-finalize': false,
        'auto-dismiss': false,
      }),
    opts,
  )
}
