// JobRepo: the jobs table (job history), rows validated when read and before they are written;
// a write the full disk refused is kept and written later. SQL only.
import type { Logger } from 'pino'
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import { Job, JobError, JobProgress, JobState } from '../jobs/model.ts'
import { isStoreWriteFailure, type Db } from './db.ts'
import { writeClaimed } from './idempotency.ts'
import { describeIssue } from './integrity.ts'

const Row = z.strictObject({
  id: z.string(),
  vm: z.string(),
  op: z.string(),
  state: JobState,
  params: z.string(),
  progress: z.string().nullable(),
  result: z.string().nullable(),
  error: z.string().nullable(),
  created_at: z.string(),
  started_at: z.string().nullable(),
  finished_at: z.string().nullable(),
  seq: z.number(),
})
type Row = z.output<typeof Row>

/** How often rows a full disk refused are tried again. */
const RETRY_MS = 5_000

/** Repository of job history. */
export class JobRepo {
  private seq: number
  /**
   * Rows the store refused for want of disk (DISK_FULL, IO_ERROR), newest form per job: reads see
   * them, and they are written by the next save or the retry timer. Job history must not stop a
   * job: a stop on a full disk still has to end its QEMU and answer.
   */
  private readonly unwritten = new Map<string, Row>()
  private retry: NodeJS.Timeout | undefined

  constructor(
    private readonly db: Db,
    private readonly log?: Logger,
  ) {
    const row = db.prepare('SELECT COALESCE(MAX(seq), 0) AS s FROM jobs').get() as { s: number }
    this.seq = row.s
  }

  /**
   * Writes the whole job (insert or replace). When the disk is full the row is kept in memory and
   * written later (logged at error); every other failure throws.
   * @throws QmpdError INTERNAL when the row as stored would fail the read path's schema.
   */
  save(job: Job): void {
    const row: Row = {
      id: job.id,
      vm: job.vm,
      op: job.op,
      state: job.state,
      params: JSON.stringify(job.params ?? null),
      progress: job.progress ? JSON.stringify(job.progress) : null,
      result: job.result === undefined ? null : JSON.stringify(job.result),
      error: job.error ? JSON.stringify(job.error) : null,
      created_at: job.createdAt,
      started_at: job.startedAt ?? null,
      finished_at: job.finishedAt ?? null,
      seq: ++this.seq,
    }
    try {
      parseJobRow(row)
    } catch (err) {
      throw new QmpdError('INTERNAL', `job ${job.id} as it would be stored is invalid: ${describeIssue(err)}`, { job: job.id })
    }
    this.flush()
    this.unwritten.delete(row.id)
    try {
      // A job's first row (queued) stores the Idempotency-Key of the request that made it, if any, in one transaction.
      if (job.state === 'queued') writeClaimed(this.db, { kind: 'job', id: job.id }, () => (this.write(row), true))
      else this.write(row)
    } catch (err) {
      if (!isStoreWriteFailure(err)) throw err
      this.keep(row, err)
    }
  }

  private write(row: Row): void {
    this.db
      .prepare(
        `INSERT INTO jobs (id, vm, op, state, params, progress, result, error, created_at, started_at, finished_at, seq)
         VALUES (@id, @vm, @op, @state, @params, @progress, @result, @error, @created_at, @started_at, @finished_at, @seq)
         ON CONFLICT(id) DO UPDATE SET state = excluded.state, progress = excluded.progress, result = excluded.result,
           error = excluded.error, started_at = excluded.started_at, finished_at = excluded.finished_at`,
      )
      .run(row)
  }

  private keep(row: Row, err: unknown): void {
    if (this.unwritten.size === 0) this.log?.error({ err, job: row.id }, 'cannot write job history (disk full?); kept in memory and written when the store can be')
    this.unwritten.set(row.id, row)
    if (!this.retry) {
      this.retry = setInterval(() => {
        try {
          this.flush()
        } catch (err) {
          // Not a full disk (the store was closed, say): these rows cannot be written by this daemon.
          this.log?.error({ err, jobs: [...this.unwritten.keys()] }, 'cannot write job history: these jobs keep their last stored state (the next daemon marks queued or running ones interrupted)')
          this.unwritten.clear()
          clearInterval(this.retry)
          this.retry = undefined
        }
      }, RETRY_MS)
      this.retry.unref()
    }
  }

  /** Writes the rows a full disk refused, oldest first; stops at the first that still fails. */
  flush(): void {
    if (this.unwritten.size === 0) return
    for (const row of this.unwritten.values()) {
      try {
        this.write(row)
      } catch (err) {
        if (isStoreWriteFailure(err)) return
        throw err
      }
      this.unwritten.delete(row.id)
    }
    if (this.retry) clearInterval(this.retry)
    this.retry = undefined
    this.log?.info('job history written again')
  }

  /** How many job rows wait for disk space. */
  pendingWrites(): number {
    return this.unwritten.size
  }

  /**
   * One job by id.
   * @throws QmpdError STORE_ROW_INVALID when its stored row fails the schema.
   */
  get(id: string): Job | undefined {
    const kept = this.unwritten.get(id)
    if (kept) return parseJobRow(kept)
    const row = this.db.prepare('SELECT * FROM jobs WHERE id = ?').get(id)
    if (row === undefined) return undefined
    try {
      return parseJobRow(row)
    } catch (err) {
      throw new QmpdError('STORE_ROW_INVALID', `stored job ${id} fails its schema: ${describeIssue(err)}`, { job: id })
    }
  }

  /** Newest first; rows that fail their schema are left out (the start-up scan reported them). */
  list(filter: { vm?: string; limit?: number } = {}): Job[] {
    const limit = filter.limit ?? 100
    const rows =
      filter.vm === undefined
        ? this.db.prepare('SELECT * FROM jobs ORDER BY seq DESC LIMIT ?').all(limit)
        : this.db.prepare('SELECT * FROM jobs WHERE vm = ? ORDER BY seq DESC LIMIT ?').all(filter.vm, limit)
    const jobs = rows.flatMap((r) => {
      const kept = this.unwritten.get((r as { id: string }).id)
      return soundJob(kept ?? r)
    })
    for (const kept of this.unwritten.values()) {
      if ((filter.vm === undefined || kept.vm === filter.vm) && !jobs.some((j) => j.id === kept.id)) jobs.unshift(parseJobRow(kept))
    }
    return jobs.slice(0, limit)
  }

  /** Jobs a previous daemon left queued or running (rows that fail their schema are left out). */
  unfinished(): Job[] {
    return this.db.prepare("SELECT * FROM jobs WHERE state IN ('queued', 'running', 'ready', 'paused') ORDER BY rowid").all().flatMap(soundJob)
  }
}

function soundJob(raw: unknown): Job[] {
  try {
    return [parseJobRow(raw)]
  } catch {
    return []
  }
}

/**
 * A jobs row parsed as the read path does.
 * @throws ZodError or SyntaxError when the row does not fit its schema.
 */
export function parseJobRow(raw: unknown): Job {
  const row = Row.parse(raw)
  return {
    id: row.id,
    vm: row.vm,
    op: row.op,
    state: row.state,
    params: JSON.parse(row.params),
    ...(row.progress ? { progress: JobProgress.parse(JSON.parse(row.progress)) } : {}),
    ...(row.result !== null ? { result: JSON.parse(row.result) } : {}),
    ...(row.error ? { error: JobError.parse(JSON.parse(row.error)) } : {}),
    createdAt: row.created_at,
    ...(row.started_at ? { startedAt: row.started_at } : {}),
    ...(row.finished_at ? { finishedAt: row.finished_at } : {}),
  }
}
