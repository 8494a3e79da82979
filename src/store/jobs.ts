// JobRepo: the jobs table (job history), rows validated when read; SQL only.
import { z } from 'zod'
import { Job, JobError, JobProgress, JobState } from '../jobs/model.ts'
import type { Db } from './db.ts'

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

/** Repository of job history. */
export class JobRepo {
  private seq: number

  constructor(private readonly db: Db) {
    const row = db.prepare('SELECT COALESCE(MAX(seq), 0) AS s FROM jobs').get() as { s: number }
    this.seq = row.s
  }

  /** Writes the whole job (insert or replace). */
  save(job: Job): void {
    this.db
      .prepare(
        `INSERT INTO jobs (id, vm, op, state, params, progress, result, error, created_at, started_at, finished_at, seq)
         VALUES (@id, @vm, @op, @state, @params, @progress, @result, @error, @created_at, @started_at, @finished_at, @seq)
         ON CONFLICT(id) DO UPDATE SET state = excluded.state, progress = excluded.progress, result = excluded.result,
           error = excluded.error, started_at = excluded.started_at, finished_at = excluded.finished_at`,
      )
      .run({
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
      })
  }

  get(id: string): Job | undefined {
    const row = this.db.prepare('SELECT * FROM jobs WHERE id = ?').get(id)
    return row === undefined ? undefined : fromRow(row)
  }

  /** Newest first. */
  list(filter: { vm?: string; limit?: number } = {}): Job[] {
    const limit = filter.limit ?? 100
    const rows =
      filter.vm === undefined
        ? this.db.prepare('SELECT * FROM jobs ORDER BY seq DESC LIMIT ?').all(limit)
        : this.db.prepare('SELECT * FROM jobs WHERE vm = ? ORDER BY seq DESC LIMIT ?').all(filter.vm, limit)
    return rows.map(fromRow)
  }

  /** Jobs a previous daemon left queued or running. */
  unfinished(): Job[] {
    return this.db.prepare("SELECT * FROM jobs WHERE state IN ('queued', 'running', 'ready', 'paused') ORDER BY rowid").all().map(fromRow)
  }
}

function fromRow(raw: unknown): Job {
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
