// Checks HTTP responses against the API's own OpenAPI document (ajv over the declared response
// schemas) and records which operations and statuses were seen; starts nothing.
import { Ajv, type ValidateFunction } from 'ajv'
import addFormatsPlugin from 'ajv-formats'
import type { OpenAPIV3 } from 'openapi-types'

const addFormats = addFormatsPlugin as unknown as (ajv: Ajv) => Ajv

/** One operation of the document. */
export interface Operation {
  id: string
  method: string
  path: string
  re: RegExp
  responses: Record<string, OpenAPIV3.ResponseObject>
}

/** What a response was checked against, and what was wrong with it (nothing: problem undefined). */
export interface Verdict {
  operation?: string
  problem?: string
}

/** A response checker over one document; it remembers every (operation, status) it saw. */
export class Contract {
  readonly operations: Operation[] = []
  /** operationId -> statuses seen. */
  readonly seen = new Map<string, Set<number>>()
  private readonly ajv = new Ajv({ strict: false, allErrors: true })
  private readonly validators = new Map<string, ValidateFunction>()
  private readonly components: unknown

  constructor(doc: OpenAPIV3.Document) {
    addFormats(this.ajv)
    this.components = doc.components ?? {}
    for (const [path, item] of Object.entries(doc.paths)) {
      for (const method of ['get', 'put', 'post', 'delete', 'patch'] as const) {
        const op = item?.[method]
        if (!op) continue
        const re = new RegExp('^' + path.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\{[^}]+\}/g, '[^/]+') + '$')
        this.operations.push({ id: op.operationId ?? `${method} ${path}`, method: method.toUpperCase(), path, re, responses: op.responses as Record<string, OpenAPIV3.ResponseObject> })
      }
    }
  }

  /** The operation a request goes to (HEAD is its GET), or undefined for a path the document does not have. */
  operation(method: string, url: string): Operation | undefined {
    const path = url.split('?')[0] ?? ''
    const m = method.toUpperCase() === 'HEAD' ? 'GET' : method.toUpperCase()
    return this.operations.find((o) => o.method === m && o.re.test(path))
  }

  /**
   * Checks one response: its operation must declare its status, and a JSON body must match that
   * status's schema. A path or method the document does not have may only be answered 404 or 405
   * with the error body (the not-found handler).
   */
  check(method: string, url: string, status: number, contentType: string | undefined, body: string): Verdict {
    const op = this.operation(method, url)
    const isJson = (contentType ?? '').startsWith('application/json')
    if (!op) {
      if (status !== 404 && status !== 405) return { problem: `${method} ${url}: answered ${status} but the document has no such operation` }
      return this.validate('error', { $ref: '#/components/schemas/ErrorBody' }, body, isJson, `${method} ${url} ${status}`)
    }
    let seen = this.seen.get(op.id)
    if (!seen) this.seen.set(op.id, (seen = new Set()))
    seen.add(status)
    const declared = op.responses[String(status)]
    if (!declared) return { operation: op.id, problem: `${op.id} (${method} ${url}): status ${status} is not declared (declared: ${Object.keys(op.responses).join(', ')})` }
    if (status === 204 || method.toUpperCase() === 'HEAD') {
      return body === '' ? { operation: op.id } : { operation: op.id, problem: `${op.id}: ${status} with a body` }
    }
    const media = declared.content ?? {}
    if (!isJson) {
      const type = (contentType ?? '').split(';')[0]!.trim()
      return media[type] ? { operation: op.id } : { operation: op.id, problem: `${op.id} ${status}: content type ${contentType} is not declared (${Object.keys(media).join(', ')})` }
    }
    const schema = media['application/json']?.schema
    if (!schema) return { operation: op.id, problem: `${op.id} ${status}: a JSON body but no JSON schema declared` }
    const v = this.validate(`${op.id} ${status}`, schema, body, isJson, `${op.id} (${method} ${url}) ${status}`)
    return { operation: op.id, ...v }
  }

  private validate(key: string, schema: unknown, body: string, isJson: boolean, what: string): Verdict {
    if (!isJson) return { problem: `${what}: the body is not JSON` }
    let fn = this.validators.get(key)
    if (!fn) {
      // '#/components/...' refs resolve against the root: the components ride along with the schema.
      fn = this.ajv.compile({ ...(schema as object), components: this.components })
      this.validators.set(key, fn)
    }
    let value: unknown
    try {
      value = JSON.parse(body)
    } catch {
      return { problem: `${what}: the body is not valid JSON` }
    }
    if (fn(value)) return {}
    return { problem: `${what}: ${this.ajv.errorsText(fn.errors, { separator: '; ' })}; body ${body.slice(0, 400)}` }
  }

  /** Operations no response was seen for. */
  uncovered(): string[] {
    return this.operations.filter((o) => !this.seen.has(o.id)).map((o) => `${o.id} (${o.method} ${o.path})`)
  }
}

const byApp = new WeakMap<object, Contract>()

/** The contract of an app: its own served document (built once per app). */
export function contractOf(app: { swagger(): unknown }): Contract {
  let c = byApp.get(app)
  if (!c) byApp.set(app, (c = new Contract(app.swagger() as OpenAPIV3.Document)))
  return c
}
