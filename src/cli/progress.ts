// Follows one job for the CLI: a progress bar with throughput and ETA from the job's SSE progress,
// Ctrl-C asking the daemon to cancel (or detaching); it changes nothing but that cancel.
import cliProgress from 'cli-progress'
import { ApiError, expectOk, waitForJob, type Job, type QmpdClient } from '../client/index.ts'
import { CliError, EXIT } from './exit.ts'
import { formatBytes } from './output.ts'

/** How a command follows its job. */
export interface FollowJobOptions {
  /** Draw the bar: true forces it (also when stderr is not a terminal), false never, undefined when stderr is a TTY. */
  progress?: boolean
  /** Bar updates per second when stderr is not a terminal (default 2). */
  nonTtyRate?: number
}

/**
 * Waits for `job` to end, drawing its progress on stderr. Ctrl-C asks the daemon to cancel it
 * (POST /v1/jobs/{id}/cancel); when the daemon refuses (a job that cannot be interrupted), or at a
 * second Ctrl-C, it detaches and the job goes on.
 * @throws CliError: EXIT.jobFailed when the job failed or was cancelled, EXIT.interrupted when detached.
 */
export async function followJob(client: QmpdClient, job: Job, opts: FollowJobOptions = {}): Promise<Job> {
  const show = opts.progress ?? process.stderr.isTTY === true
  let bar: cliProgress.SingleBar | undefined
  let lastAt = 0
  let lastBytes = 0
  let rate = 0
  const detach = new AbortController()
  let cancelling = false
  const onSigint = (): void => {
    if (cancelling) {
      detach.abort()
      return
    }
    cancelling = true
    bar?.stop()
    bar = undefined
    process.stderr.write(`\ninterrupted: asking qmpd to cancel job ${job.id}…\n`)
    expectOk(client.api.POST('/v1/jobs/{id}/cancel', { params: { path: { id: job.id } } })).then(
      () => process.stderr.write('cancel requested; waiting for the job to stop (Ctrl-C again to detach)\n'),
      (err: unknown) => {
        const why = err instanceof ApiError ? err.message : String(err)
        process.stderr.write(`job ${job.id} cannot be cancelled (${why}); detaching: it goes on (qmpd job watch ${job.id})\n`)
        detach.abort()
      },
    )
  }
  process.on('SIGINT', onSigint)
  const update = (j: Job): void => {
    const p = j.progress
    if (!show || !p || p.total <= 0) return
    const now = Date.now()
    if (lastAt && now > lastAt && p.current >= lastBytes) {
      // Exponentially smoothed so one late event does not make the rate jump.
      const inst = ((p.current - lastBytes) * 1000) / (now - lastAt)
      rate = rate ? rate * 0.7 + inst * 0.3 : inst
    }
    lastAt = now
    lastBytes = p.current
    if (!bar) {
      bar = new cliProgress.SingleBar(
        {
          stream: process.stderr,
          format: `${j.op} [{bar}] {percentage}% | {done} / {all} | {rate}/s | ETA {eta_formatted}`,
          noTTYOutput: true,
          notTTYSchedule: 1000 / (opts.nonTtyRate ?? 2),
          etaBuffer: 20,
          hideCursor: process.stderr.isTTY === true,
        },
        cliProgress.Presets.legacy,
      )
      bar.start(p.total, p.current, { done: formatBytes(p.current), all: formatBytes(p.total), rate: formatBytes(rate) })
    }
    bar.setTotal(p.total)
    bar.update(p.current, { done: formatBytes(p.current), all: formatBytes(p.total), rate: formatBytes(rate) })
  }
  try {
    // A block job in `ready` (a copy or a commit without pivot) waits for complete or cancel: the
    // wait ends there and says so.
    const done = await waitForJob(client, job.id, { onProgress: update, signal: detach.signal, untilReady: true })
    bar?.stop()
    if (done.state === 'ready') {
      process.stderr.write(`job ${done.id} is ready: it keeps mirroring until POST /v1/jobs/${done.id}/complete, or qmpd job cancel ${done.id} (a copy then keeps its point-in-time copy)\n`)
      return done
    }
    if (done.state !== 'succeeded') {
      const e = done.error
      throw Object.assign(new CliError(`job ${done.id} (${done.op}) ${done.state}${e ? `: ${e.message} (${e.code})` : ''}`, EXIT.jobFailed), { job: done })
    }
    return done
  } catch (err) {
    bar?.stop()
    if (detach.signal.aborted && !(err instanceof CliError)) throw new CliError(`detached from job ${job.id}; it goes on (qmpd job watch ${job.id})`, EXIT.interrupted)
    throw err
  } finally {
    process.off('SIGINT', onSigint)
  }
}
