// The idempotency_keys table and the claim a keyed request carries down to the write that creates
// its VM or job, so key and row commit in one transaction; SQL only, no HTTP.
import { AsyncLocalStorage } from 'node:async_hooks'
import { z } from 'zod'
import { failPoint } from '../ops/failpoints.ts'
import type { Db } from './db.ts'
import { onRollback, transaction } from './tx.ts'

/** How long a key is remembered (a retry after that creates anew). */
export const IDEMPOTENCY_TTL_MS = 24 * 3600 * 1000

/** What a key answered: the VM (201) or the job (202) its first request created. */
export interface IdempotentAnswer {
  kind: 'vm' | 'job'
  /** The VM's name or the job's id. */
  id: string
}

/** A stored key. */
export interface IdempotencyRecord extends IdempotentAnswer {
  key: string
  /** "POST /v1/vms/:vm/snapshots": the route the key was first used on. */
  route: string
  /** sha256 of the canonical JSON of the request's path parameters and body. */
  bodyHash: string
  status: number
  createdAt: string
}

/** A keyed request on its way down: the first VM or job row written under it records the key. */
export interface IdempotencyClaim {
  key: string
  route: string
  bodyHash: string
  /** Set once the key is written (cleared again if that transaction rolls back). */
  answer?: IdempotentAnswer
  /** Called once the key is written: the request's lock may go before a ?wait=true answer. */
  onAnswer?: () => void
}

const Row = z.strictObject({
  key: z.string(),
  route: z.string(),
  body_hash: z.string(),
  kind: z.enum(['vm', 'job']),
  target: z.string(),
  status: z.number().int(),
  created_at: z.string(),
})

const scope = new AsyncLocalStorage<IdempotencyClaim>()

/** Runs fn with `claim` as the current request's claim (the HTTP idempotency wrapper calls it). */
export function withClaim<T>(claim: IdempotencyClaim, fn: () => T): T {
  return scope.run(claim, fn)
}

/**
 * Runs `write` (the insert of a VM or job row; true when it inserted) in one transaction with the
 * current request's key, when there is an unanswered claim: both commit or neither does. Without a
 * claim it just runs `write`.
 * @throws what `write` throws; SQLite's constraint error when the key is already stored (the
 *   in-process lock makes that a bug or a second writer; the transaction rolls back then).
 */
export function writeClaimed(db: Db, answer: IdempotentAnswer, write: () => boolean): boolean {
  const claim = scope.getStore()
  if (!claim || claim.answer) return write()
  const written = transaction(db, () => {
    if (!write()) return false
    // A crash test's daemon dies here, inside the open transaction: neither row nor key commits.
    // (failPoint's kill-daemon path is synchronous up to the kill, so it may be called unawaited.)
    void failPoint('idempotency.key.before')
    db.prepare('INSERT INTO idempotency_keys (key, route, body_hash, kind, target, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)').run(
      claim.key,
      claim.route,
      claim.bodyHash,
      answer.kind,
      answer.id,
      answer.kind === 'vm' ? 201 : 202,
      new Date().toISOString(),
    )
    claim.answer = answer
    onRollback(db, () => delete claim.answer)
    claim.onAnswer?.()
    return true
  })
  // ...and here, after the commit, before anything answered: both are stored.
  if (written) void failPoint('idempotency.key.after')
  return written
}

/** Repository of idempotency keys. */
export class IdempotencyRepo {
  constructor(private readonly db: Db) {}

  /** The key's record, or undefined when it is unknown or expired (expired keys are deleted first). */
  get(key: string, now = Date.now()): IdempotencyRecord | undefined {
    this.purgeExpired(now)
    const raw = this.db.prepare('SELECT * FROM idempotency_keys WHERE key = ?').get(key)
    if (raw === undefined) return undefined
    const r = Row.parse(raw)
    return { key: r.key, route: r.route, bodyHash: r.body_hash, kind: r.kind, id: r.target, status: r.status, createdAt: r.created_at }
  }

  /** Deletes the keys older than IDEMPOTENCY_TTL_MS; returns how many. */
  purgeExpired(now = Date.now()): number {
    const cutoff = new Date(now - IDEMPOTENCY_TTL_MS).toISOString()
    return this.db.prepare('DELETE FROM idempotency_keys WHERE created_at < ?').run(cutoff).changes
  }
}
