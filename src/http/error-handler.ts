// The one place error codes become HTTP statuses and error bodies; raises nothing itself.
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { hasZodFastifySchemaValidationErrors, isResponseSerializationError } from 'fastify-type-provider-zod'
import { type ErrorCode, QmpdError } from '../errors.ts'

/** The only map from error codes to HTTP statuses. */
export const STATUS_BY_CODE: Record<ErrorCode, number> = {
  INVALID_INPUT: 400,
  INVALID_PATH: 400,
  UNAUTHORIZED: 401,
  QMP_PASSTHROUGH_DISABLED: 403,
  QMP_COMMAND_NOT_ALLOWED: 403,
  QMP_COMMAND_REFUSED: 422,
  NOT_FOUND: 404,
  METHOD_NOT_ALLOWED: 405,
  VM_NOT_FOUND: 404,
  JOB_NOT_FOUND: 404,
  SNAPSHOT_NOT_FOUND: 404,
  SCHEDULE_NOT_FOUND: 404,
  BACKUP_NOT_FOUND: 404,
  DISK_NOT_FOUND: 404,
  VM_EXISTS: 409,
  SNAPSHOT_EXISTS: 409,
  SCHEDULE_EXISTS: 409,
  FILE_EXISTS: 409,
  INVALID_STATE: 409,
  BUSY: 409,
  NOT_SUPPORTED: 409,
  ADOPTED_NEEDS_RELAUNCH: 409,
  JOB_CANCELLED: 409,
  INTERRUPTED: 500,
  /** The host could not write a file (ENOSPC, EIO): 507 Insufficient Storage. */
  IO_ERROR: 507,
  /** The store could not be written: the state directory's disk is full. */
  DISK_FULL: 507,
  /** The VM's stored records fail their schema (GET /v1/vms/{vm} says which row). */
  STORE_ROW_INVALID: 409,
  QMP_COMMAND_FAILED: 502,
  QMP_DISCONNECTED: 502,
  QMP_PROTOCOL_ERROR: 502,
  QMP_CONNECT_FAILED: 502,
  QGA_COMMAND_FAILED: 502,
  QGA_UNAVAILABLE: 409,
  QEMU_START_FAILED: 502,
  QEMU_IMG_FAILED: 502,
  VM_CRASHED: 502,
  QEMU_NOT_FOUND: 503,
  HOST_RESOURCE_MISSING: 422,
  PORT_IN_USE: 409,
  TIMEOUT: 504,
  IDEMPOTENCY_KEY_REUSED: 409,
  MIGRATION_BLOCKED: 409,
  EXPORT_ACTIVE: 409,
  EXPORT_NOT_FOUND: 404,
  BITMAP_NOT_FOUND: 404,
  INTERNAL: 500,
}

/** HTTP status for an error code (unknown codes, e.g. from an old job row, are 500). */
export function statusFor(code: string): number {
  return STATUS_BY_CODE[code as ErrorCode] ?? 500
}

/** The one JSON error shape: {error: {code, message, details?}}. */
export function errorBody(code: string, message: string, details?: Record<string, unknown>): {
  error: { code: string; message: string; details?: Record<string, unknown> }
} {
  return { error: { code, message, ...(details && Object.keys(details).length > 0 ? { details } : {}) } }
}

interface Issue {
  instancePath?: string
  message?: string
  keyword?: string
  params?: { errors?: Array<Array<{ path: PropertyKey[]; message: string; code: string }>> }
}

/**
 * A union's failure lists every branch's complaints; the branch with the fewest is the one the
 * client meant (a VM definition rather than an adoption), so report that one.
 */
function flattenIssues(issues: Issue[]): Array<{ path: string; message: string }> {
  return issues.flatMap((i) => {
    const branches = i.params?.errors
    if (i.keyword === 'invalid_union' && branches && branches.length > 0) {
      const best = [...branches].sort((a, b) => a.length - b.length)[0]!
      const base = i.instancePath === '/' ? '' : (i.instancePath ?? '')
      return best.map((b) => ({ path: `${base}/${b.path.map(String).join('/')}`, message: b.message }))
    }
    return [{ path: i.instancePath ?? '', message: i.message ?? 'invalid' }]
  })
}

/** A route's URL pattern (":param" and "*" as fastify writes them) as a regular expression. */
function routeRegex(url: string): RegExp {
  const parts = url.split('/').map((seg) => (seg.startsWith(':') ? '[^/]+' : seg === '*' ? '.*' : seg.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')))
  return new RegExp(`^${parts.join('/')}$`)
}

/**
 * Installs the error and not-found handlers on an app (call before the routes are registered: it
 * learns them to answer 405 with Allow for a known path and a wrong method).
 */
export function installErrorHandler(app: FastifyInstance): void {
  const routes: Array<{ re: RegExp; methods: string[] }> = []
  app.addHook('onRoute', (route) => {
    routes.push({ re: routeRegex(route.url), methods: ([] as string[]).concat(route.method) })
  })
  app.setErrorHandler((err: FastifyError, req: FastifyRequest, reply: FastifyReply) => {
    if (hasZodFastifySchemaValidationErrors(err)) {
      const issues = flattenIssues(err.validation)
      const where = err.validationContext ?? 'request'
      const message = `invalid ${where}: ` + issues.map((i) => `${i.path || '/'} ${i.message}`).join('; ')
      return reply.code(400).send(errorBody('INVALID_INPUT', message, { issues }))
    }
    if (err instanceof QmpdError) {
      const status = statusFor(err.code)
      if (status >= 500) req.log.warn({ err }, 'request failed')
      return reply.code(status).send(errorBody(err.code, err.message, err.data))
    }
    if (isResponseSerializationError(err)) {
      req.log.error({ err, issues: err.cause.issues }, 'response does not match its schema')
      return reply.code(500).send(errorBody('INTERNAL', 'response does not match its schema'))
    }
    if (err.statusCode === 415) {
      const type = String(req.headers['content-type'] ?? '(none)')
      return reply.code(415).send(errorBody('INVALID_INPUT', `unsupported media type ${type}: send the body as JSON with Content-Type: application/json`, { fastifyCode: err.code }))
    }
    if (typeof err.statusCode === 'number' && err.statusCode >= 400 && err.statusCode < 500) {
      // fastify's own client errors: bad JSON, wrong content type, body too large…
      return reply.code(err.statusCode).send(errorBody(err.statusCode === 401 ? 'UNAUTHORIZED' : 'INVALID_INPUT', err.message, { fastifyCode: err.code }))
    }
    req.log.error({ err }, 'unhandled error')
    return reply.code(500).send(errorBody('INTERNAL', err.message))
  })
  app.setNotFoundHandler((req, reply) => {
    const path = req.url.split('?')[0] ?? ''
    const allowed = [...new Set(routes.filter((r) => r.re.test(path)).flatMap((r) => r.methods))].sort()
    if (allowed.length > 0) {
      reply.header('Allow', allowed.join(', '))
      return reply.code(405).send(errorBody('METHOD_NOT_ALLOWED', `${req.method} is not allowed on ${path} (allowed: ${allowed.join(', ')})`, { allow: allowed }))
    }
    return reply.code(404).send(errorBody('NOT_FOUND' satisfies ErrorCode, `no route ${req.method} ${req.url.split('?')[0]}`))
  })
}
