// The OpenAPI document's rules: what every route declares (errors, security, operationId) and the
// touches the generated document needs; no route, no handler.
import type { SwaggerTransformObject } from '@fastify/swagger'
import type { FastifyInstance, RouteOptions } from 'fastify'
import { jsonSchemaTransformObject } from 'fastify-type-provider-zod'
import type { OpenAPIV3 } from 'openapi-types'
import { z } from 'zod'
import { STATUS_BY_CODE } from './error-handler.ts'
import { ErrorBody } from './schemas.ts'

/** Paths served without a token: liveness, the API's own documentation, and the pointer to it (no VM data). */
export const OPEN_PATHS = ['/', '/healthz', '/docs', '/openapi.json']

/** Whether a request path is served without a token. */
export function isOpenPath(path: string): boolean {
  return OPEN_PATHS.some((p) => path === p || (p !== '/' && path.startsWith(p + '/')))
}

/** The document's tags: every route's `tags` must be one of these (redocly's operation-tag-defined). */
export const DOCUMENT_TAGS = [
  { name: 'vms', description: 'Define, adopt, inspect, start, stop, pause, resume, check and repair VMs; the QMP escape hatch' },
  { name: 'snapshots', description: 'Internal and external snapshots, with or without memory: create, list, revert, delete' },
  { name: 'block jobs', description: 'Commit, pull and copy of a disk\'s backing chain' },
  { name: 'backups', description: 'Push-mode full and incremental backups with persistent dirty bitmaps; restore of a point' },
  { name: 'saved state', description: 'RAM and device state to and from files: save, restore, managed save' },
  { name: 'exports', description: 'Pull-mode NBD exports of a point-in-time view of disks (image fleecing), for external backup tools' },
  { name: 'jobs', description: 'Every long operation is a job: its history, progress and controls' },
  { name: 'schedules', description: 'Per-VM snapshot schedules (cron) with retention and expiry' },
  { name: 'events', description: 'Server-Sent Events of jobs, VMs and QEMU' },
  { name: 'daemon', description: 'Liveness and the API\'s own description (no token needed)' },
]

/** Operations (as "METHOD /openapi/{path}") whose body may be left out: the route reads a missing body as {}. */
const optionalBodies = new Set<string>()

/** "/v1/vms/:vm" as the document writes it: "/v1/vms/{vm}". */
export function openapiPath(url: string): string {
  return url.replace(/:([A-Za-z0-9_]+)/g, '{$1}')
}

/** A camelCase operationId from the method and path, for a route that declares none ("POST /v1/vms/:vm/start" -> "postVmsVmStart"). */
function derivedOperationId(method: string, url: string): string {
  const words = url
    .split('/')
    .filter((s) => s !== '' && s !== 'v1')
    .map((s) => s.replace(/^:/, '').replace(/[^A-Za-z0-9]+(.)?/g, (_m: string, c?: string) => (c ?? '').toUpperCase()))
  return method.toLowerCase() + words.map((w) => w.charAt(0).toUpperCase() + w.slice(1)).join('')
}

/**
 * Completes a documented route's schema as it is added: the statuses every route can answer (400
 * invalid input, 401 without the token, 500; 413/415 with a body; 404 with a path parameter), `security: []`
 * on open routes, an operationId when the route gives none. Install before the routes are registered.
 */
export function installDocumentRules(app: FastifyInstance): void {
  app.addHook('onRoute', (route: RouteOptions) => {
    const schema = route.schema as (Record<string, unknown> & { response?: Record<string, unknown>; body?: unknown }) | undefined
    if (!schema || schema['hide'] === true || route.method === 'HEAD') return
    const method = ([] as string[]).concat(route.method)[0] ?? 'GET'
    const open = isOpenPath(route.url)
    const statuses = [400, 500, ...(open ? [] : [401]), ...(schema.body ? [413, 415] : []), ...(route.url.includes('/:') ? [404] : [])]
    schema.response = { ...Object.fromEntries(statuses.map((s) => [s, ErrorBody])), ...schema.response }
    if (open) schema['security'] = []
    schema['operationId'] ??= derivedOperationId(method, route.url)
    if (schema.body instanceof z.ZodType && schema.body.safeParse({}).success) optionalBodies.add(`${method} ${openapiPath(route.url)}`)
  })
}

/** What a 2xx answer is, for the document's response descriptions. */
const SUCCESS: Record<string, string> = {
  '200': 'OK (with ?wait=true: the finished job)',
  '201': 'Created',
  '202': 'Accepted: the job, queued or running (Location names it)',
  '204': 'Done, no body',
}

/** A response's description: for an error status, the error codes that come with it. */
function describeStatus(status: string): string {
  if (SUCCESS[status]) return SUCCESS[status]
  const codes = Object.entries(STATUS_BY_CODE).filter(([, s]) => String(s) === status).map(([c]) => c)
  const fastify: Record<string, string> = { '400': 'INVALID_INPUT also for a malformed body or query', '413': 'the body is over 1 MiB', '415': 'the body is not application/json' }
  return [codes.length > 0 ? `Error: ${codes.join(', ')}` : 'Error (INVALID_INPUT)', fastify[status]].filter(Boolean).join('; ')
}

const HTTP_METHODS = ['get', 'put', 'post', 'delete', 'patch', 'head', 'options'] as const

/**
 * @fastify/swagger's transformObject: the zod components ($ref'd schemas such as ErrorBody), then
 * what the generator cannot say itself: a body the route reads as {} when absent is not required;
 * 201/202 replies carry a Location header; components no operation uses are left out.
 */
export const transformDocument: SwaggerTransformObject = (input) => {
  const doc = jsonSchemaTransformObject(input) as OpenAPIV3.Document
  for (const [path, item] of Object.entries(doc.paths ?? {})) {
    for (const m of HTTP_METHODS) {
      const op = item?.[m]
      if (!op) continue
      if (op.requestBody && 'required' in op.requestBody && optionalBodies.has(`${m.toUpperCase()} ${path}`)) op.requestBody.required = false
      for (const [status, res] of Object.entries(op.responses)) {
        if (!('$ref' in res) && res.description === 'Default Response') res.description = describeStatus(status)
      }
      for (const status of ['201', '202']) {
        const res = op.responses[status]
        if (res && !('$ref' in res)) {
          res.headers = { Location: { description: status === '201' ? 'the new resource' : 'the job: GET it for its state and progress', schema: { type: 'string' } } }
        }
      }
    }
  }
  // Unused components (the input twins zod makes of output-only schemas) only clutter a client.
  const text = JSON.stringify(doc.paths)
  const schemas = doc.components?.schemas ?? {}
  const used = new Set<string>()
  const visit = (s: string): void => {
    for (const m of s.matchAll(/#\/components\/schemas\/([A-Za-z0-9_.-]+)/g)) {
      const name = m[1]!
      if (used.has(name)) continue
      used.add(name)
      visit(JSON.stringify(schemas[name] ?? {}))
    }
  }
  visit(text)
  for (const name of Object.keys(schemas)) if (!used.has(name)) delete schemas[name]
  return doc
}
