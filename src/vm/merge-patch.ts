// JSON merge patch (RFC 7386) of plain JSON values; pure, knows nothing of VMs.

/** True for a JSON object (not an array, not null). */
function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v)
}

/**
 * The result of applying `patch` to `target` as RFC 7386 section 2 says: an object patch merges
 * member by member (null removes a member), anything else (arrays included) replaces the target.
 * Neither argument is modified.
 */
export function mergePatch(target: unknown, patch: unknown): unknown {
  if (!isObject(patch)) return structuredClone(patch)
  const out: Record<string, unknown> = isObject(target) ? structuredClone(target) : {}
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete out[key]
    // defineProperty, not assignment: a "__proto__" member is data here, never a prototype.
    else Object.defineProperty(out, key, { value: mergePatch(out[key], value), enumerable: true, writable: true, configurable: true })
  }
  return out
}
