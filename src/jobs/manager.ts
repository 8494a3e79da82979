// JobManager: per-VM and per-disk queues, job history, controls and waiters; knows nothing of what
// a job does.
import { randomUUID } from 'node:crypto'
import PQueue from 'p-queue'
import type { Logger } from 'pino'
import { QmpCommandError, QmpdError, toQmpdError } from '../errors.ts'
import type { EventBus } from '../events/bus.ts'
import type { JobRepo } from '../store/jobs.ts'
import { nextTurn } from '../util.ts'
import { isFinal, type Job, type JobError } from './model.ts'

/** What a running job's code gets: its id, a cancel signal, a logger and a progress setter. */
export interface JobContext {
  readonly id: string
  readonly vm: string
  readonly signal: AbortSignal
  readonly log: Logger
  setProgress(current: number, total: number): void
  /** Moves a running job between running, ready (waiting for complete) and paused. */
  setPhase(state: 'running' | 'ready' | 'paused'): void
  /** Registers what POST /v1/jobs/{id}/pause|resume|complete and PATCH speed do for this job. */
  setControls(controls: JobControls): void
  setSpeed(bytesPerSec: number): void
}

/** Controls a long-running job offers while it runs (block jobs). Each throws when not applicable. */
export interface JobControls {
  pause?: () => Promise<void>
  resume?: () => Promise<void>
  complete?: () => Promise<void>
  setSpeed?: (bytesPerSec: number) => Promise<void>
}

/** An action on a running job. */
export type JobAction = 'pause' | 'resume' | 'complete' | 'speed'

/** How a job runs: the function that does the work, and whether it may be aborted mid-run. */
export interface JobSpec<R> {
  vm: string
  op: string
  params: unknown
  run: (ctx: JobContext) => Promise<R>
  /** A running job may be cancelled only when its code honours ctx.signal at safe points. */
  cancellableWhileRunning?: boolean
  /**
   * The queue to run in (default: the VM's). Block jobs use a queue of their own so that a
   * mirror waiting in READY does not hold up pause or resume; conflicting operations are refused
   * by the services instead (409 BUSY).
   */
  queue?: string
}

interface Live {
  job: Job
  abort: AbortController
  cancellableWhileRunning: boolean
  waiters: Array<(job: Job) => void>
  lastProgressSave: number
  controls: JobControls
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

  private explain: ((vm: string, err: QmpdError) => QmpdError | Promise<QmpdError>) | undefined

  constructor(
    private readonly repo: JobRepo,
    private readonly bus: EventBus,
    private readonly log: Logger,
  ) {}

  /**
   * Sets who may restate a job's error from what happened to its VM meanwhile (VmManager: a lost
   * QMP connection whose QEMU crashed becomes VM_CRASHED). Called once, at daemon start.
   */
  explainFailures(fn: (vm: string, err: QmpdError) => QmpdError | Promise<QmpdError>): void {
    this.explain = fn
  }

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

  /**
   * Records what crash recovery did with the operation an interrupted job ran: rolled forward,
   * the job succeeded after all (its result says it was finished by recovery); rolled back, it
   * stays failed (INTERRUPTED) and its error says what was undone.
   */
  noteRecovery(id: string, outcome: { action: 'forward' | 'back'; detail: string; result?: unknown }): void {
    const job = this.repo.get(id)
    if (!job || job.state !== 'failed' || job.error?.code !== 'INTERRUPTED') return
    const done: Job =
      outcome.action === 'forward'
        ? { ...job, state: 'succeeded', result: { ...(isObject(outcome.result) ? outcome.result : {}), recovered: outcome.detail } }
        : { ...job, error: { ...job.error, details: { ...job.error.details, recovery: outcome.detail } } }
    if (outcome.action === 'forward') delete done.error
    this.repo.save(done)
    this.bus.emit({ type: 'job', vm: done.vm, job: { ...done } })
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
      controls: {},
    }
    this.live.set(job.id, live)
    this.persist(live)
    void this.queue(spec.queue ?? spec.vm).add(() => this.execute(live, spec.run))
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

  /** True while the job is queued or running in this daemon. */
  isLive(id: string): boolean {
    return this.live.has(id)
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

  /**
   * Pauses, resumes, completes (pivot) or re-speeds a running job through the controls its
   * operation registered. 409 when the job is finished or the action does not apply now.
   */
  async control(id: string, action: JobAction, arg?: number): Promise<Job> {
    const live = this.live.get(id)
    if (!live) {
      const old = this.repo.get(id)
      if (!old) throw new QmpdError('JOB_NOT_FOUND', `no job ${id}`, { job: id })
      throw new QmpdError('INVALID_STATE', `job ${id} is already ${old.state}`, { job: id, state: old.state })
    }
    const st = live.job.state
    const refuse = (why: string): never => {
      throw new QmpdError('INVALID_STATE', `cannot ${action} job ${id} (${live.job.op}, ${st}): ${why}`, { job: id, state: st })
    }
    try {
      await this.apply(live, action, arg, refuse)
    } catch (err) {
      // QEMU moves a job on its own (a pause takes effect, a job concludes) between qmpd's view
      // and the command: its refusal then means the job is not in the state the request needs.
      if (!(err instanceof QmpCommandError) || err.qmpClass !== 'GenericError') throw err
      throw new QmpdError('INVALID_STATE', `cannot ${action} job ${id} (${live.job.op}): QEMU says: ${err.desc}`, { job: id, state: live.job.state, qmpClass: err.qmpClass }, { cause: err })
    }
    return { ...live.job }
  }

  /** Runs one control action of a live job; `refuse` throws the 409 for an action that does not apply now. */
  private async apply(live: Live, action: JobAction, arg: number | undefined, refuse: (why: string) => never): Promise<void> {
    const c = live.controls
    const st = live.job.state
    switch (action) {
      case 'pause':
        if (!c.pause) refuse('this operation cannot be paused')
        if (st === 'paused') refuse('it is already paused')
        if (st === 'queued') refuse('it has not started')
        await c.pause()
        break
      case 'resume':
        if (!c.resume) refuse('this operation cannot be paused')
        if (st !== 'paused') refuse('it is not paused')
        await c.resume()
        break
      case 'complete':
        if (!c.complete) refuse('this operation has nothing to complete')
        if (st !== 'ready') refuse('it is not ready')
        await c.complete()
        break
      case 'speed':
        if (!c.setSpeed) refuse('this operation has no speed')
        await c.setSpeed(arg ?? 0)
        live.job.speedBytesPerSec = arg ?? 0
        this.persist(live)
        break
    }
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

  /** Forgets a VM's queues (its own and its disks' block-job queues) once the VM is deleted. */
  dropQueue(vm: string): void {
    for (const [key, q] of this.queues) {
      if ((key === vm || key.startsWith(`${vm}#`)) && q.size === 0 && q.pending === 0) this.queues.delete(key)
    }
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
    // A job starts in a loop iteration of its own (util.ts nextTurn): fifty jobs submitted
    // together do not run their synchronous beginnings back to back.
    await nextTurn()
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
      setPhase: (state) => {
        if (isFinal(live.job.state) || live.job.state === state) return
        live.job.state = state
        this.persist(live)
      },
      setControls: (controls) => {
        live.controls = controls
      },
      setSpeed: (bytesPerSec) => {
        live.job.speedBytesPerSec = bytesPerSec
      },
    }
    const t0 = performance.now()
    try {
      const result = await run(ctx)
      log.info({ ms: Math.round(performance.now() - t0) }, 'job succeeded')
      this.finish(live, 'succeeded', result)
    } catch (err) {
      let e = toQmpdError(err)
      const cancelled = live.abort.signal.aborted && (e.code === 'JOB_CANCELLED' || err === live.abort.signal.reason)
      if (!cancelled && this.explain) {
        // Synchronous unless QEMU is gone and its exit not yet recorded: a job failed by the
        // daemon's own shutdown must be stored before the store closes.
        const explained = this.explain(live.job.vm, e)
        e = explained instanceof Promise ? await explained.catch(() => e) : explained
      }
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

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
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
