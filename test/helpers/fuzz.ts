// Request generation for the API fuzz test: a seeded random source and values drawn from the
// OpenAPI document's JSON Schemas, mostly valid, sometimes hostile; sends nothing itself.

/** A seeded pseudo-random source (mulberry32): the same seed gives the same requests. */
export class Rng {
  private s: number
  constructor(readonly seed: number) {
    this.s = seed >>> 0
  }
  /** A float in [0, 1). */
  next(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0
    let x = this.s
    x = Math.imul(x ^ (x >>> 15), x | 1)
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61)
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1))
  }
  chance(p: number): boolean {
    return this.next() < p
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.next() * xs.length)] as T
  }
}

/** A JSON Schema as fastify's swagger emits it (the parts the generator reads). */
export interface Schema {
  type?: string | string[]
  properties?: Record<string, Schema>
  required?: string[]
  additionalProperties?: boolean | Schema
  items?: Schema
  enum?: unknown[]
  const?: unknown
  anyOf?: Schema[]
  oneOf?: Schema[]
  allOf?: Schema[]
  minimum?: number
  maximum?: number
  minLength?: number
  maxLength?: number
  minItems?: number
  maxItems?: number
  default?: unknown
}

/** Strings a hostile client tries wherever a string goes: paths out, shapes too long, odd bytes. */
export const HOSTILE_STRINGS = [
  '',
  '..',
  '../../etc/passwd',
  '/etc/passwd',
  '/dev/zero',
  '/proc/self/mem',
  'a\u0000b',
  'x'.repeat(5000),
  'a/'.repeat(3000),
  'é✓漢字',
  '%2e%2e%2f',
  ' ',
  '-rf',
  '$(touch /tmp/qmpd-fuzz-pwned)',
  '`id`',
  'exec:touch /tmp/qmpd-fuzz-pwned',
  'file:/tmp/x,format=raw',
  'null',
  '{}',
]

/** Numbers at and past every usual boundary. */
const HOSTILE_NUMBERS = [0, -1, 1, 2 ** 31, 2 ** 53, -(2 ** 53), 1e308, 0.5, Number.MAX_SAFE_INTEGER, 65536]

/** Draws values for schemas; `strings` are the realistic strings to mix in (names, real paths). */
export class ValueGen {
  constructor(
    private readonly rng: Rng,
    private readonly strings: string[],
    /** Probability, at each value, of breaking the schema on purpose. */
    private readonly hostility = 0.15,
  ) {}

  /** A value for `schema`: valid most of the time, hostile (wrong type, out of range, odd) otherwise. */
  value(schema: Schema | undefined, depth = 0): unknown {
    const r = this.rng
    if (!schema || depth > 6) return this.any(depth)
    if (r.chance(this.hostility)) return this.hostile(schema, depth)
    const alts = schema.anyOf ?? schema.oneOf
    if (alts?.length) return this.value(r.pick(alts), depth)
    if (schema.allOf?.length) return this.value(r.pick(schema.allOf), depth)
    if (schema.const !== undefined) return schema.const
    if (schema.enum?.length) return r.pick(schema.enum)
    const type = Array.isArray(schema.type) ? r.pick(schema.type) : schema.type
    switch (type) {
      case 'object':
        return this.object(schema, depth)
      case 'array': {
        const n = r.int(schema.minItems ?? 0, Math.min(schema.maxItems ?? 4, 4))
        return Array.from({ length: n }, () => this.value(schema.items, depth + 1))
      }
      case 'string':
        return this.string(schema)
      case 'integer':
        return r.int(Math.max(schema.minimum ?? 0, -1000), Math.min(schema.maximum ?? 1000, 1000))
      case 'number':
        return (schema.minimum ?? 0) + r.next() * Math.min((schema.maximum ?? 1000) - (schema.minimum ?? 0), 1000)
      case 'boolean':
        return r.chance(0.5)
      case 'null':
        return null
      default:
        return this.any(depth)
    }
  }

  private object(schema: Schema, depth: number): Record<string, unknown> {
    const r = this.rng
    const out: Record<string, unknown> = {}
    const required = new Set(schema.required ?? [])
    for (const [k, s] of Object.entries(schema.properties ?? {})) {
      if (required.has(k) ? !r.chance(0.05) : r.chance(0.5)) out[k] = this.value(s, depth + 1)
    }
    if (typeof schema.additionalProperties === 'object' && r.chance(0.6)) {
      for (let i = r.int(1, 2); i > 0; i--) out[this.string({})] = this.value(schema.additionalProperties, depth + 1)
    }
    if (r.chance(0.05)) out[r.pick(['__proto__', 'constructor', 'extra', 'x'.repeat(300)])] = this.any(depth + 1)
    return out
  }

  private string(schema: Schema): string {
    const r = this.rng
    if (this.strings.length && r.chance(0.6)) return r.pick(this.strings)
    const len = r.int(schema.minLength ?? 1, Math.min(schema.maxLength ?? 12, 12))
    const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789-_.'
    let s = r.pick('abcdefghijklmnopqrstuvwxyz'.split(''))
    while (s.length < len) s += r.pick(alphabet.split(''))
    return s
  }

  /** A value that breaks `schema`: the wrong type, a boundary number, a hostile string, null. */
  private hostile(schema: Schema, depth: number): unknown {
    const r = this.rng
    switch (r.int(0, 5)) {
      case 0:
        return null
      case 1:
        return r.pick(HOSTILE_STRINGS)
      case 2:
        return r.pick(HOSTILE_NUMBERS) * (r.chance(0.5) ? 1 : -1)
      case 3:
        return schema.type === 'array' ? {} : [this.any(depth + 1)]
      case 4:
        return nested(r.int(1, 200))
      default:
        return r.chance(0.5)
    }
  }

  private any(depth: number): unknown {
    const r = this.rng
    const kinds = depth > 3 ? 4 : 6
    switch (r.int(0, kinds - 1)) {
      case 0:
        return r.pick(HOSTILE_STRINGS)
      case 1:
        return r.pick(HOSTILE_NUMBERS)
      case 2:
        return r.chance(0.5)
      case 3:
        return null
      case 4:
        return [this.any(depth + 1)]
      default:
        return { [this.string({})]: this.any(depth + 1) }
    }
  }
}

/** An object nested `depth` levels deep: {"a":{"a":...}}. */
export function nested(depth: number): unknown {
  let v: unknown = 1
  for (let i = 0; i < depth; i++) v = { a: v }
  return v
}
