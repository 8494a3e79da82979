// VM labels: their schema (Kubernetes-like keys and values) and the ?label= selectors of
// GET /v1/vms; pure, no store or QEMU.
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import type { StoredDefinition } from './definition.ts'

/** At most this many labels per VM. */
export const MAX_LABELS = 64
const KEY = /^[A-Za-z0-9._/-]{1,63}$/
const VALUE_MAX = 63

/** `labels: {key: value}` of a definition: keys [A-Za-z0-9._/-]{1,63}, values of at most 63 characters, at most 64 labels. */
export const Labels = z
  .record(z.string().regex(KEY, 'label keys must match [A-Za-z0-9._/-]{1,63}'), z.string().max(VALUE_MAX, `label values must be at most ${VALUE_MAX} characters`))
  .refine((l) => Object.keys(l).length <= MAX_LABELS, `at most ${MAX_LABELS} labels`)
  .describe('labels of the VM: a scheduler finds its VMs again with GET /v1/vms?label=key=value')
export type Labels = z.output<typeof Labels>

/** One ?label= selector: `key=value` (the label has that value) or `key` (the VM has the label). */
export interface LabelSelector {
  key: string
  value?: string
}

/**
 * Parses the ?label= selectors of GET /v1/vms (repeatable: every one must match).
 * @throws QmpdError INVALID_INPUT when a selector's key or value could not be a label.
 */
export function parseSelectors(raw: string | string[] | undefined): LabelSelector[] {
  const list = raw === undefined ? [] : Array.isArray(raw) ? raw : [raw]
  return list.map((s) => {
    const eq = s.indexOf('=')
    const key = eq < 0 ? s : s.slice(0, eq)
    const value = eq < 0 ? undefined : s.slice(eq + 1)
    if (!KEY.test(key) || (value !== undefined && value.length > VALUE_MAX)) {
      throw new QmpdError('INVALID_INPUT', `invalid querystring: label=${JSON.stringify(s)} must be key=value or key (key [A-Za-z0-9._/-]{1,63}, value at most ${VALUE_MAX} characters)`, {
        issues: [{ path: '/label', message: 'must be key=value or key' }],
      })
    }
    return value === undefined ? { key } : { key, value }
  })
}

/** Whether a definition's labels satisfy every selector (no selectors: every VM does). */
export function matchesLabels(def: StoredDefinition, selectors: LabelSelector[]): boolean {
  const labels: Record<string, string> = def.labels ?? {}
  return selectors.every((s) => Object.hasOwn(labels, s.key) && (s.value === undefined || labels[s.key] === s.value))
}
