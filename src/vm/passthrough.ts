// The policy of the QMP escape hatch (POST /v1/vms/{vm}/qmp): whether it is on, which commands it
// lets through, and the bounds on their arguments; pure, sends nothing to QEMU.
import { QmpdError } from '../errors.ts'

/** Commands the escape hatch allows when it is on and the operator named nothing more. */
export const DEFAULT_QMP_ALLOW: readonly string[] = ['query-*', 'stop', 'cont']

/**
 * Commands that open, create or write host files, spawn processes, take file descriptors or
 * stream guest state somewhere: a pattern (`*`, `block*`) never allows them, only their exact name
 * in the allow-list does. The list is not complete protection on its own (QEMU's sandbox and the
 * allow-list do the rest): any command not in DEFAULT_QMP_ALLOW needs the operator's word anyway.
 */
export const RISKY_QMP_COMMANDS: readonly string[] = [
  'migrate',
  'migrate-incoming',
  'migrate-recover',
  'human-monitor-command',
  'blockdev-add',
  'blockdev-create',
  'blockdev-reopen',
  'blockdev-snapshot-sync',
  'blockdev-change-medium',
  'block-stream',
  'block-commit',
  'change-backing-file',
  'drive-mirror',
  'drive-backup',
  'drive_add',
  'device_add',
  'netdev_add',
  'chardev-add',
  'chardev-change',
  'object-add',
  'transaction',
  'dump-guest-memory',
  'pmemsave',
  'memsave',
  'screendump',
  'getfd',
  'add-fd',
  'nbd-server-start',
  'nbd-server-add',
  'block-export-add',
  'xen-save-devices-state',
  'xen-load-devices-state',
  'dump-skeys',
]

/** Deepest nesting of `arguments` the escape hatch passes on (the arguments object itself is depth 1). */
export const MAX_QMP_ARG_DEPTH = 32
/** Largest `arguments`, as compact JSON, the escape hatch passes on. */
export const MAX_QMP_ARG_BYTES = 64 * 1024

const ENTRY = /^(\*|[A-Za-z][A-Za-z0-9_-]{0,63}\*?)$/

/**
 * Checks one allow-list entry: a command name, a prefix ending in `*` (`query-*`), or `*`.
 * @throws QmpdError INVALID_INPUT for anything else.
 */
export function checkAllowEntry(entry: string): string {
  if (!ENTRY.test(entry)) {
    throw new QmpdError('INVALID_INPUT', `bad QMP allow-list entry ${JSON.stringify(entry)}: expected a command name, a prefix ending in *, or *`, { entry })
  }
  return entry
}

/** What the escape hatch may do: off, or on with these allow-list entries (defaults included). */
export interface PassthroughPolicy {
  enabled: boolean
  allow: readonly string[]
}

/** The policy from the daemon's settings: the defaults plus whatever the operator added. */
export function makePassthroughPolicy(enabled: boolean, extra: readonly string[]): PassthroughPolicy {
  return { enabled, allow: [...new Set([...DEFAULT_QMP_ALLOW, ...extra.map(checkAllowEntry)])] }
}

/** True when `command` is allowed by `allow` (a risky command only by its exact name). */
export function isAllowed(allow: readonly string[], command: string): boolean {
  if (allow.includes(command)) return true
  if (RISKY_QMP_COMMANDS.includes(command)) return false
  return allow.some((e) => e.endsWith('*') && command.startsWith(e.slice(0, -1)))
}

/**
 * Refuses a command the policy does not let through.
 * @throws QmpdError QMP_PASSTHROUGH_DISABLED when the escape hatch is off; QMP_COMMAND_NOT_ALLOWED when the command is not allowed.
 */
export function checkPassthrough(policy: PassthroughPolicy, command: string): void {
  if (!policy.enabled) {
    throw new QmpdError(
      'QMP_PASSTHROUGH_DISABLED',
      'the QMP escape hatch is off: start qmpd with --qmp-passthrough (or QMPD_QMP_PASSTHROUGH=1) to enable it',
      { command },
    )
  }
  if (!isAllowed(policy.allow, command)) {
    const risky = RISKY_QMP_COMMANDS.includes(command)
    throw new QmpdError(
      'QMP_COMMAND_NOT_ALLOWED',
      `QMP command ${command} is not in the escape hatch's allow-list` +
        (risky ? ` (it can reach host files or processes: only --qmp-allow ${command}, by its exact name, allows it)` : ` (add it with --qmp-allow ${command})`),
      { command, allow: policy.allow },
    )
  }
}

/**
 * The nesting depth of a JSON value (scalars 0, `{}` and `[]` 1), counted without recursion and
 * giving up once past `limit` (returns limit + 1 then): a hostile value cannot overflow the stack.
 */
export function jsonDepth(value: unknown, limit: number): number {
  let max = 0
  const stack: Array<[unknown, number]> = [[value, 0]]
  while (stack.length > 0) {
    const [v, d] = stack.pop()!
    if (typeof v !== 'object' || v === null) continue
    const depth = d + 1
    if (depth > limit) return limit + 1
    if (depth > max) max = depth
    for (const child of Array.isArray(v) ? v : Object.values(v)) {
      if (typeof child === 'object' && child !== null) stack.push([child, depth])
    }
  }
  return max
}
