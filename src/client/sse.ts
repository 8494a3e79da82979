// Reads qmpd's Server-Sent Events stream (GET /v1/events) as an async iterator; it parses and
// filters, and never changes anything on the daemon.
import { ApiError, type Job, type QmpdClient } from './http.ts'

/** One event of the stream: its id (for Last-Event-ID), name and parsed data. */
export interface StreamEvent {
  id?: string
  event: string
  data: unknown
}

/** The data of a `job` event. */
export interface JobEventData {
  type: 'job'
  vm: string
  job: Job
}

/** What to follow. */
export interface FollowOptions {
  /** Subset of job, vm, qmp (default all). */
  types?: Array<'job' | 'vm' | 'qmp' | 'schedule'>
  vm?: string
  job?: string
  /** Resume after this event id (sent as Last-Event-ID). */
  lastEventId?: string
  signal?: AbortSignal
  /** Called once the stream is open (its headers arrived). */
  onOpen?: () => void
}

/** The query string of GET /v1/events for these options. */
function eventsPath(opts: FollowOptions): string {
  const q = new URLSearchParams()
  if (opts.types?.length) q.set('types', opts.types.join(','))
  if (opts.vm) q.set('vm', opts.vm)
  if (opts.job) q.set('job', opts.job)
  const s = q.toString()
  return `/v1/events${s ? `?${s}` : ''}`
}

/** Parses one SSE block (lines up to a blank line); comments-only blocks give undefined. */
export function parseBlock(block: string): StreamEvent | undefined {
  let id: string | undefined
  let event = 'message'
  const data: string[] = []
  for (const line of block.split('\n')) {
    if (line === '' || line.startsWith(':')) continue
    const i = line.indexOf(':')
    const field = i < 0 ? line : line.slice(0, i)
    const value = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '')
    if (field === 'id') id = value
    else if (field === 'event') event = value
    else if (field === 'data') data.push(value)
  }
  if (!data.length) return undefined
  const text = data.join('\n')
  let parsed: unknown = text
  try {
    parsed = JSON.parse(text)
  } catch {
    // Not JSON: handed on as the text it is.
  }
  return { ...(id !== undefined ? { id } : {}), event, data: parsed }
}

/**
 * Follows GET /v1/events: yields each event until the stream ends (the daemon closes it, `dropped`
 * or `shutdown` arrive) or `signal` aborts (then it returns quietly).
 * @throws ApiError when the daemon refuses the stream (400 for a bad filter, 401).
 */
export async function* followEvents(client: QmpdClient, opts: FollowOptions = {}): AsyncGenerator<StreamEvent> {
  let res: Response
  try {
    res = await client.fetch(eventsPath(opts), {
      headers: { accept: 'text/event-stream', ...(opts.lastEventId ? { 'last-event-id': opts.lastEventId } : {}) },
      ...(opts.signal ? { signal: opts.signal } : {}),
    })
  } catch (err) {
    if (opts.signal?.aborted) return
    throw err
  }
  if (!res.ok || !res.body) {
    const body: unknown = await res.json().catch(() => undefined)
    const e = (body as { error?: { code?: string; message?: string } } | undefined)?.error
    throw new ApiError(res.status, e?.code ?? `HTTP_${res.status}`, e?.message ?? `GET /v1/events answered ${res.status}`, body)
  }
  opts.onOpen?.()
  const decoder = new TextDecoder()
  let buf = ''
  try {
    for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
      buf += decoder.decode(chunk, { stream: true }).replace(/\r\n?/g, '\n')
      let end: number
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const ev = parseBlock(buf.slice(0, end))
        buf = buf.slice(end + 2)
        if (ev) yield ev
      }
    }
  } catch (err) {
    if (opts.signal?.aborted) return
    throw err
  }
}
