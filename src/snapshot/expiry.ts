// Turns a creation's expiresIn / expiresAt into the one absolute expiresAt the record keeps; no I/O.
import { QmpdError } from '../errors.ts'
import { durationMs } from '../sched/model.ts'
import type { CreateSnapshotInput } from './model.ts'

/**
 * The body with `expiresIn` replaced by `expiresAt` (now + the duration), and `expiresAt`
 * normalized to UTC. Called once, at submit: a job that waits in the queue keeps its instant.
 * @throws QmpdError INVALID_INPUT when both are given, or when expiresAt is not in the future.
 */
export function withExpiry<T extends CreateSnapshotInput>(body: T, now = new Date()): T {
  if (body.expiresIn === undefined && body.expiresAt === undefined) return body
  if (body.expiresIn !== undefined && body.expiresAt !== undefined) throw new QmpdError('INVALID_INPUT', 'give expiresIn or expiresAt, not both', { field: 'expiresAt' })
  const at = body.expiresIn !== undefined ? new Date(now.getTime() + durationMs(body.expiresIn)) : new Date(body.expiresAt!)
  if (at.getTime() <= now.getTime()) throw new QmpdError('INVALID_INPUT', `expiresAt ${body.expiresAt} is not in the future`, { field: 'expiresAt' })
  const { expiresIn: _drop, ...rest } = body
  return { ...rest, expiresAt: at.toISOString() } as T
}
