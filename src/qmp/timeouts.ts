/**
 * The one table of QMP command timeouts (CONVENTIONS #4). A timeout here bounds how long QEMU's
 * main loop may take to ANSWER a command, not how long the work takes: long work (block jobs,
 * migration, snapshot-save/load/delete) is started by a command that answers at once and is then
 * followed through events with an AbortSignal. Call sites pass `timeoutMs` only for the rare
 * command whose own run time is the work (pmemsave of a big guest, HMP savevm).
 */

import type { CommandName } from './commands.ts'

/** Timeout of a command not in the table. Generous: under TCG a busy main loop answers late. */
export const DEFAULT_COMMAND_TIMEOUT_MS = 30_000

/** Time allowed for connect + greeting + qmp_capabilities. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000

/** How long disconnect() waits for the socket to close gracefully before destroying it. */
export const DISCONNECT_GRACE_MS = 2_000

const QUICK_QUERY_MS = 10_000

/** Per-command timeouts in milliseconds; commands absent here get DEFAULT_COMMAND_TIMEOUT_MS. */
export const COMMAND_TIMEOUTS: { readonly [C in CommandName]?: number } & { readonly [name: string]: number | undefined } = {
  // Pure state reads: answered from memory, no I/O.
  'query-status': QUICK_QUERY_MS,
  'query-version': QUICK_QUERY_MS,
  'query-jobs': QUICK_QUERY_MS,
  'query-migrate': QUICK_QUERY_MS,
  'query-migrate-capabilities': QUICK_QUERY_MS,
  // query-block / query-named-block-nodes read image headers (snapshot tables) of every node:
  // they stay at the default.
  //
  // quit answers before QEMU exits; a missing answer means QEMU is wedged and will be killed.
  quit: 5_000,
  // stop drains all block I/O (bdrv_drain_all) before answering: slow storage makes it slow.
  stop: 60_000,
  // transaction / snapshot-sync create and open files and drain the affected nodes while the
  // graph changes; blockdev-del and block-export-del drain too.
  transaction: 60_000,
  'blockdev-snapshot-sync': 60_000,
  'blockdev-snapshot-internal-sync': 60_000,
  'blockdev-snapshot-delete-internal-sync': 60_000,
  'blockdev-del': 60_000,
  // HMP commands run synchronously in the main loop (HMP savevm writes all RAM before answering).
  'human-monitor-command': 120_000,
  // pmemsave/memsave (sent through the escape hatch, not typed) write the memory range before answering.
  pmemsave: 120_000,
  memsave: 120_000,
}

/** Timeout for a command by wire name (typed or not), from the table or the default. */
export function commandTimeoutMs(command: string): number {
  return Object.hasOwn(COMMAND_TIMEOUTS, command) ? (COMMAND_TIMEOUTS[command] ?? DEFAULT_COMMAND_TIMEOUT_MS) : DEFAULT_COMMAND_TIMEOUT_MS
}
