// The CLI's exit codes and how an error becomes one with a message; no I/O beyond stderr.
import { ApiError } from '../client/index.ts'

/** Exit codes of every qmpd client command (README "Command line"). */
export const EXIT = {
  ok: 0,
  /** Bad command line, or input the daemon refused as invalid (400, 422). */
  usage: 1,
  /** The VM, snapshot, disk or job does not exist (404). */
  notFound: 2,
  /** The operation conflicts with the state: wrong state, exists already, busy (409). */
  conflict: 3,
  /** The job ran and failed or was cancelled. */
  jobFailed: 4,
  /** The daemon cannot be reached, or refuses the token (401, 403). */
  unreachable: 5,
  /** The daemon or QEMU failed (5xx). */
  daemonError: 6,
  /** Interrupted (Ctrl-C) while waiting for a job that goes on. */
  interrupted: 130,
} as const

/** An error that already knows its exit code and message. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
  ) {
    super(message)
  }
}

/** The exit code of an HTTP status. */
export function exitForStatus(status: number): number {
  if (status === 404) return EXIT.notFound
  if (status === 409) return EXIT.conflict
  if (status === 401 || status === 403) return EXIT.unreachable
  if (status >= 500) return EXIT.daemonError
  return EXIT.usage
}

/** The message and exit code of whatever a command threw. */
export function describeError(err: unknown, url: string): { message: string; code: number } {
  if (err instanceof CliError) return { message: err.message, code: err.exitCode }
  if (err instanceof ApiError) return { message: `${err.message} (${err.code}, HTTP ${err.status})`, code: exitForStatus(err.status) }
  const cause = (err as { cause?: { code?: string; message?: string } } | undefined)?.cause
  if (err instanceof TypeError && cause) return { message: `cannot reach qmpd at ${url}: ${cause.code ?? cause.message ?? err.message}`, code: EXIT.unreachable }
  return { message: err instanceof Error ? err.message : String(err), code: EXIT.daemonError }
}
