// Waits for a job to end while reporting its progress: the per-job SSE stream with Last-Event-ID
// resume, falling back to polling GET /v1/jobs/{id}; it never cancels or changes the job.
import { setTimeout as sleep } from 'node:timers/promises'
import { expectOk, type Job, type QmpdClient } from './http.ts'
import { followEvents, type JobEventData } from './sse.ts'

/** How waitForJob reports and stops. */
export interface WaitOptions {
  /** Called with the job on each change (state or progress) seen. */
  onProgress?: (job: Job) => void
  /** Stops waiting (the job goes on); the promise rejects with the signal's reason. */
  signal?: AbortSignal
  /** 'sse' (default: the event stream, polling when it is unavailable) or 'poll' only. */
  mode?: 'sse' | 'poll'
  /** Polling interval (ms, default 500). */
  pollMs?: number
  /** Reconnections of the stream before polling takes over (default 5). */
  reconnects?: number
  /** Called when the helper falls back to polling, with why. */
  onFallback?: (reason: string) => void
  /** Also resolve when the job is `ready` (a block job waiting for complete or cancel). */
  untilReady?: boolean
}

/** True when a job in this state will not change any more. */
export function isFinalState(state: string): boolean {
  return state === 'succeeded' || state === 'failed' || state === 'cancelled'
}

/** GET /v1/jobs/{id}. @throws ApiError (404 for an unknown job). */
export async function getJob(client: QmpdClient, id: string): Promise<Job> {
  const { body } = await expectOk(client.api.GET('/v1/jobs/{id}', { params: { path: { id } } }))
  return body as Job
}

/** Whether waiting for this job ends here. */
function ends(job: Job, opts: WaitOptions): boolean {
  return isFinalState(job.state) || (opts.untilReady === true && job.state === 'ready')
}

async function poll(client: QmpdClient, id: string, opts: WaitOptions): Promise<Job> {
  let last = ''
  for (;;) {
    opts.signal?.throwIfAborted()
    const job = await getJob(client, id)
    const seen = JSON.stringify([job.state, job.progress])
    if (seen !== last) opts.onProgress?.(job)
    last = seen
    if (ends(job, opts)) return job
    await sleep(opts.pollMs ?? 500, undefined, opts.signal ? { signal: opts.signal } : {})
  }
}

/**
 * Resolves with the job once it is final (succeeded, failed or cancelled: the caller reads
 * job.state), or `ready` with `untilReady`. Subscribes to GET /v1/events?types=job&job=<id> before reading the job, so no change
 * falls between; a broken stream is resumed with Last-Event-ID, and after `reconnects` failures
 * (or a daemon that refuses ?job=) it polls.
 * @throws ApiError when the job does not exist (404) or the daemon refuses the token.
 */
export async function waitForJob(client: QmpdClient, id: string, opts: WaitOptions = {}): Promise<Job> {
  if (opts.mode === 'poll') return poll(client, id, opts)
  let lastEventId: string | undefined
  let failures = 0
  const local = new AbortController()
  const abort = (): void => local.abort(opts.signal?.reason)
  opts.signal?.addEventListener('abort', abort, { once: true })
  try {
    while (failures <= (opts.reconnects ?? 5)) {
      opts.signal?.throwIfAborted()
      let opened!: () => void
      const open = new Promise<void>((r) => (opened = r))
      const stream = followEvents(client, { types: ['job'], job: id, signal: local.signal, onOpen: () => opened(), ...(lastEventId ? { lastEventId } : {}) })
      // The first read opens the stream; the job is read once it is open, so no change is lost.
      const first = stream.next()
      const ready = await Promise.race([open.then(() => 'open' as const), first.then(() => 'ended' as const)]).catch((err: unknown) => err)
      if (ready instanceof Error) {
        if ((ready as { status?: number }).status === 400) {
          opts.onFallback?.(`the daemon refuses the per-job stream: ${ready.message}`)
          return await poll(client, id, opts)
        }
        if ((ready as { status?: number }).status !== undefined) throw ready
        failures++
        await sleep(Math.min(200 * failures, 2000), undefined, opts.signal ? { signal: opts.signal } : {})
        continue
      }
      const now = await getJob(client, id)
      opts.onProgress?.(now)
      if (ends(now, opts)) {
        local.abort()
        return now
      }
      try {
        let next = await first
        while (!next.done) {
          const ev = next.value
          if (ev.id) lastEventId = ev.id
          if (ev.event === 'job') {
            const job = (ev.data as JobEventData).job
            opts.onProgress?.(job)
            if (ends(job, opts)) return job
          } else if (ev.event === 'gap') {
            const job = await getJob(client, id)
            opts.onProgress?.(job)
            if (ends(job, opts)) return job
          }
          next = await stream.next()
        }
      } catch (err) {
        opts.signal?.throwIfAborted()
        void err
      }
      // The stream ended (daemon restart, dropped, network): resume after the last event seen.
      opts.signal?.throwIfAborted()
      failures++
    }
    opts.onFallback?.('the event stream kept failing')
    return await poll(client, id, opts)
  } finally {
    opts.signal?.removeEventListener('abort', abort)
    local.abort()
  }
}
