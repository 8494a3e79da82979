// The typed HTTP client of the qmpd API (openapi-fetch over the generated schema), over TCP or a
// unix socket; it holds no daemon logic and retries nothing.
import createClient, { type Client } from 'openapi-fetch'
import { Agent } from 'undici'
import type { paths } from './schema.d.ts'

/** Where the daemon is and how to authenticate. */
export interface QmpdClientOptions {
  /** http://host:port, or unix:/path/to/socket (default http://127.0.0.1:7777). */
  url?: string
  /** A unix socket path (the same as url unix:/path). */
  socketPath?: string
  /** The bearer token (TCP listeners require it; unix sockets ignore it). */
  token?: string
}

/** A connected client: the typed openapi-fetch client and a raw fetch for what it does not model (SSE). */
export interface QmpdClient {
  /** The openapi-fetch client typed by the document (src/client/schema.d.ts). */
  api: Client<paths>
  /** The base URL requests go to (http://localhost for a unix socket). */
  baseUrl: string
  /** fetch(path) against the daemon with the token set; for the event stream. */
  fetch(path: string, init?: RequestInit): Promise<Response>
  /** Closes the unix socket agent, if any. */
  close(): Promise<void>
}

/** The JSON body of an operation's answer with `status`, as the document declares it. */
export type JsonOf<P extends keyof paths, M extends keyof paths[P], S extends number> = paths[P][M] extends {
  responses: { [K in S]: { content: { 'application/json': infer B } } }
}
  ? B
  : never

/** A job as GET /v1/jobs/{id} serves it. */
export type Job = JsonOf<'/v1/jobs/{id}', 'get', 200>

/** Splits a url or unix:/path into a base URL and an optional socket path. */
export function parseDaemonUrl(url: string): { baseUrl: string; socketPath?: string } {
  if (url.startsWith('unix:')) {
    const socketPath = url.slice('unix:'.length)
    if (!socketPath.startsWith('/')) throw new Error(`unix socket path must be absolute: ${url}`)
    return { baseUrl: 'http://localhost', socketPath }
  }
  let u: URL
  try {
    u = new URL(url)
  } catch {
    throw new Error(`not a daemon address (http://host:port or unix:/path): ${url}`)
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new Error(`not a daemon address (http://host:port or unix:/path): ${url}`)
  return { baseUrl: u.origin }
}

/** Creates a client of the daemon at `url` or `socketPath`. Nothing is connected until a request. */
export function createQmpdClient(opts: QmpdClientOptions = {}): QmpdClient {
  const target = opts.socketPath ? { baseUrl: 'http://localhost', socketPath: opts.socketPath } : parseDaemonUrl(opts.url ?? 'http://127.0.0.1:7777')
  const agent = target.socketPath ? new Agent({ connect: { socketPath: target.socketPath } }) : undefined
  const headers: Record<string, string> = opts.token ? { authorization: `Bearer ${opts.token}` } : {}
  // Node's fetch takes an undici dispatcher: the unix socket goes there, the URL keeps its path.
  const doFetch = (input: Request | string, init?: RequestInit): Promise<Response> =>
    globalThis.fetch(input, { ...init, ...(agent ? { dispatcher: agent } : {}) })
  const api = createClient<paths>({ baseUrl: target.baseUrl, headers, fetch: (req: Request) => doFetch(req) })
  return {
    api,
    baseUrl: target.baseUrl,
    fetch: (path, init = {}) => doFetch(target.baseUrl + path, { ...init, headers: { ...headers, ...(init.headers as Record<string, string> | undefined) } }),
    close: async () => agent?.close(),
  }
}

/** An error answer of the API: its status and the {error:{code,message,details}} body. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly body: unknown,
  ) {
    super(message)
    this.name = 'ApiError'
  }
}

/** The error body's code and message, whatever the body is. */
function errorOf(status: number, body: unknown): ApiError {
  const e = (body as { error?: { code?: unknown; message?: unknown } } | undefined)?.error
  const code = typeof e?.code === 'string' ? e.code : `HTTP_${status}`
  const message = typeof e?.message === 'string' ? e.message : `HTTP ${status}`
  return new ApiError(status, code, message, body)
}

/**
 * Awaits an openapi-fetch call and returns its body as unknown (the caller narrows it), or throws
 * ApiError for a 4xx/5xx answer.
 */
export async function expectOk(call: Promise<{ data?: unknown; error?: unknown; response: Response }>): Promise<{ status: number; body: unknown }> {
  const { data, error, response } = await call
  if (!response.ok) throw errorOf(response.status, error)
  return { status: response.status, body: data }
}
