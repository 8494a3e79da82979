import { randomUUID } from 'node:crypto'
import PQueue from 'p-queue'
import type { Logger } from 'pino'
import { QmpCommandError, QmpdError, toQmpdError } from '../errors.ts'
import type { EventBus } from '../events/bus.ts'
import type { JobRepo } from '../store/jobs.ts'
import { isFinal, type Job, type JobError } from './model.ts'

/** What a running job's code gets: its id, a cancel signal, a logger and a progress setter. */
export interface JobContext {
  readonly id: string
  readonly vm: string
  readonly signal: AbortSignal
  readonly log: Logger
  setProgress(current: number, total: number): void
}

/** How a job runs: the function that does the work, and whether it may be aborted mid-run. */
export interface JobSpec<R> {
  vm: string
  op: string
  params: unknown
  run: (ctx: JobContext) => Promise<R>
  /** A running job may be cancelled only when its code honours ctx.signal at safe points. */
  cancellableWhileRunning?: boolean
}

interface Live {
  job: Job
  abort: AbortController
  cancellableWhileRunning: boolean
  waiters: Array<(job: Job) => void>
  lastProgressSave: number
}

/** How often progress is written to the store; in memory it is always current. */
const PROGRESS_SAVE_INTERVAL_MS = 1000

/**
 * Runs every operation that changes a VM as a job, in that VM's own queue (concurrency 1), so one
 * VM's operations never interleave while different VMs proceed in parallel. Job history is persisted.
 */
export class JobManager {
  private readonly queues = new Map<string, PQueue>()
  private readonly live = new Map<string, Live>()

  constructor(
    private readonly repo: JobRepo,
    private readonly bus: EventBus,
    private readonly log: Logger,
  ) {}

  /**
   * Marks jobs that a previous daemon left queued or running as failed (INTERRUPTED). Called once at
   * start, before any new job is accepted.
   */
  recoverInterrupted(): Job[] {
    const stale = this.repo.unfinished()
    for (const job of stale) {
      const done: Job = {
        ...job,
        state: 'failed',
        error: { code: 'INTERRUPTED', message: `the daemon stopped while this job was ${job.state}` },
        finishedAt: new Date().toISOString(),
      }
      this.repo.save(done)
    }
    return stale
  }

  /** Queues a job on its VM's queue and returns it (state queued). */
  submit<R>(spec: JobSpec<R>): Job {
    const job: Job = {
      id: randomUUID(),
      vm: spec.vm,
      op: spec.op,
      state: 'queued',
      params: spec.params,
      createdAt: new Date().toISOString(),
    }
    const live: Live = {
      job,
      abort: new AbortController(),
      cancellableWhileRunning: spec.cancellableWhileRunning ?? false,
      waiters: [],
      lastProgressSave: 0,
    }
    this.live.set(job.id, live)
    this.persist(live)
    void this.queue(spec.vm).add(() => this.execute(live, spec.run))
    return { ...job }
  }

  /** The current view of a job, live or from history. */
  get(id: string): Job | undefined {
    const live = this.live.get(id)
    return live ? { ...live.job } : this.repo.get(id)
  }

  /** Newest first; live jobs reflect in-memory progress. */
  list(filter: { vm?: string; limit?: number } = {}): Job[] {
    return this.repo.list(filter).map((j) => this.get(j.id) ?? j)
  }

  /** True while the VM has a queued or running job. */
  busy(vm: string): boolean {
    const q = this.queues.get(vm)
    return q !== undefined && (q.size > 0 || q.pending > 0)
  }

  /**
   * Cancels a job. A queued job is cancelled at once and never runs; a running one only when its
   * operation supports it (its signal is aborted and it ends as cancelled once it stops).
   */
  cancel(id: string): Job {
    const live = this.live.get(id)
    if (!live) {
      const old = this.repo.get(id)
      if (!old) throw new QmpdError('JOB_NOT_FOUND', `no job ${id}`, { job: id })
      throw new QmpdError('INVALID_STATE', `job ${id} is already ${old.state}`, { job: id, state: old.state })
    }
    if (live.job.state === 'queued') {
      live.abort.abort(new QmpdError('JOB_CANCELLED', 'cancelled before it started'))
      this.finish(live, 'cancelled', undefined, { code: 'JOB_CANCELLED', message: 'cancelled before it started' })
      return { ...live.job }
    }
    if (!live.cancellableWhileRunning) {
      throw new QmpdError('INVALID_STATE', `job ${id} (${live.job.op}) is running and cannot be cancelled`, {
        job: id,
        state: live.job.state,
      })
    }
    live.abort.abort(new QmpdError('JOB_CANCELLED', 'cancelled by request'))
    return { ...live.job }
  }

  /** Resolves with the job once it is final, or with its current view after timeoutMs. */
  wait(id: string, timeoutMs: number): Promise<Job> {
    const live = this.live.get(id)
    if (!live) {
      const job = this.repo.get(id)
      if (!job) return Promise.reject(new QmpdError('JOB_NOT_FOUND', `no job ${id}`, { job: id }))
      return Promise.resolve(job)
    }
    return new Promise((resolve) => {
      const done = (job: Job): void => {
        clearTimeout(timer)
        resolve(job)
      }
      const timer = setTimeout(() => {
        live.waiters = live.waiters.filter((w) => w !== done)
        resolve({ ...live.job })
      }, timeoutMs)
      live.waiters.push(done)
    })
  }

  /** Waits until every queue is idle (used at shutdown and by tests). */
  async drain(): Promise<void> {
    await Promise.all([...this.queues.values()].map((q) => q.onIdle()))
  }

  /** Forgets a VM's queue once the VM is deleted. */
  dropQueue(vm: string): void {
    const q = this.queues.get(vm)
    if (q && q.size === 0 && q.pending === 0) this.queues.delete(vm)
  }

  private queue(vm: string): PQueue {
    let q = this.queues.get(vm)
    if (!q) {
      q = new PQueue({ concurrency: 1 })
      this.queues.set(vm, q)
    }
    return q
  }

  private async execute(live: Live, run: (ctx: JobContext) => Promise<unknown>): Promise<void> {
    if (live.job.state !== 'queued') return // cancelled while waiting
    live.job.state = 'running'
    live.job.startedAt = new Date().toISOString()
    this.persist(live)
    const log = this.log.child({ vm: live.job.vm, job: live.job.id, op: live.job.op })
    const ctx: JobContext = {
      id: live.job.id,
      vm: live.job.vm,
      signal: live.abort.signal,
      log,
      setProgress: (current, total) => {
        live.job.progress = { current, total }
        const now = Date.now()
        if (now - live.lastProgressSave >= PROGRESS_SAVE_INTERVAL_MS) {
          live.lastProgressSave = now
          this.persist(live)
        } else {
          this.bus.emit({ type: 'job', vm: live.job.vm, job: { ...live.job } })
        }
      },
    }
    const t0 = performance.now()
    try {
      const result = await run(ctx)
      log.info({ ms: Math.round(performance.now() - t0) }, 'job succeeded')
      this.finish(live, 'succeeded', result)
    } catch (err) {
      const e = toQmpdError(err)
      const cancelled = live.abort.signal.aborted && (e.code === 'JOB_CANCELLED' || err === live.abort.signal.reason)
      log.warn({ err: e, ms: Math.round(performance.now() - t0) }, cancelled ? 'job cancelled' : 'job failed')
      this.finish(live, cancelled ? 'cancelled' : 'failed', undefined, jobError(e))
    }
  }

  private finish(live: Live, state: 'succeeded' | 'failed' | 'cancelled', result?: unknown, error?: JobError): void {
    live.job.state = state
    live.job.finishedAt = new Date().toISOString()
    if (result !== undefined) live.job.result = result
    if (error) live.job.error = error
    this.persist(live)
    this.live.delete(live.job.id)
    const snapshot = { ...live.job }
    for (const w of live.waiters) w(snapshot)
    live.waiters = []
  }

  private persist(live: Live): void {
    this.repo.save(live.job)
    this.bus.emit({ type: 'job', vm: live.job.vm, job: { ...live.job } })
    if (isFinal(live.job.state)) this.log.debug({ job: live.job.id, state: live.job.state }, 'job final')
  }
}

/** The stored form of a job's error. */
export function jobError(e: QmpdError): JobError {
  const details = Object.fromEntries(Object.entries(e.data).filter(([k]) => k !== 'qmpClass'))
  return {
    code: e.code,
    message: e.message,
    ...(e instanceof QmpCommandError ? { qmpClass: e.qmpClass } : {}),
    ...(Object.keys(details).length > 0 ? { details } : {}),
  }
}
