// The operation model: a journaled operation is a program of named steps. Each step is recorded
// in the journal before it runs and passes a fail point before and after it, so a crash test can
// stop the daemon at every boundary and recovery knows where an operation stood. What a step does
// and how it is recovered belong to the service that owns the operation.
import { randomUUID } from 'node:crypto'
import type { JournalRepo } from '../store/journal.ts'
import { failPoint } from './failpoints.ts'

/** What an operation starts from. */
export interface OperationSpec {
  vm: string
  /** The operation's journal name, also the first part of its fail points (e.g. `snapshot-create`). */
  op: string
  /** The qmpd job running it. */
  job?: string
  /** Its plan: everything recovery needs to finish or undo it (validated by the owner on read). */
  body: unknown
  /** The VM's QEMU PID at this moment, for kill-qemu fail points. */
  qemuPid?: () => number | undefined
  /**
   * Write the entry together with the first step's record, in one statement, instead of at
   * begin(): for an operation that touches nothing (QEMU, files, store) before its first step,
   * so a crash before that step has nothing to recover either way. Saves one SQLite commit.
   */
  withFirstStep?: boolean
}

/** Starts journaled operations. */
export class Journal {
  constructor(readonly repo: JournalRepo) {}

  /**
   * Runs an operation whose entry ends when it does, succeeded or failed (a failure the daemon
   * lives through was undone by the operation's own Reverter; only a crash leaves the entry).
   */
  async run<T>(spec: OperationSpec, fn: (o: Operation) => Promise<T>): Promise<T> {
    const o = this.begin(spec)
    try {
      return await fn(o)
    } finally {
      o.end()
    }
  }

  /** Writes the operation's intent to the journal (before anything is touched) and returns it. */
  begin(spec: OperationSpec): Operation {
    const id = randomUUID()
    const o = new Operation(this.repo, id, spec)
    if (!spec.withFirstStep) this.repo.add({ id, vm: spec.vm, op: spec.op, ...(spec.job ? { job: spec.job } : {}), body: spec.body })
    else o.unwritten = true
    return o
  }
}

/** One journaled operation in progress. */
export class Operation {
  private ended = false
  /** The entry is not in the journal yet (OperationSpec.withFirstStep): the first step writes it. */
  unwritten = false
  /** The steps begun so far, in order. */
  readonly begun: string[] = []

  constructor(
    private readonly repo: JournalRepo,
    readonly id: string,
    private readonly spec: OperationSpec,
  ) {}

  /** The fail point name of a step boundary: `<op>.<step>.before|after`. */
  pointName(step: string, when: 'before' | 'after'): string {
    return `${this.spec.op}.${step}.${when}`
  }

  /**
   * Runs one step: records it (and `body`, when the step learned something recovery needs, such
   * as a file name it chose) in the journal, passes `<op>.<step>.before`, runs it, passes
   * `<op>.<step>.after`.
   */
  async step<T>(name: string, fn: () => Promise<T> | T, opts: { body?: unknown } = {}): Promise<T> {
    return this.bracket(name, () => this.record(name, opts.body), fn)
  }

  /**
   * Runs a last step that is one SQLite transaction of its own (the operation's metadata, which
   * ends the entry: call end() inside `fn`): its record is written in that same transaction, so
   * the step costs one commit, and the store can never show the step without its effect or the
   * reverse. Passes `<op>.<step>.before` and `.after` around the transaction.
   */
  async commitStep<T>(name: string, fn: () => T): Promise<T> {
    return this.bracket(name, () => {}, () => {
      const unwritten = this.unwritten
      try {
        return this.repo.tx(() => {
          this.record(name)
          return fn()
        })
      } catch (err) {
        this.unwritten = unwritten // a rolled-back first step wrote no entry
        throw err
      }
    })
  }

  /** A step's frame: refused once ended; `first` (its record), then the fail points around `run`. */
  private async bracket<T>(name: string, first: () => void, run: () => Promise<T> | T): Promise<T> {
    if (this.ended) throw new Error(`operation ${this.spec.op} already ended; step ${name} not run`)
    first()
    await failPoint(this.pointName(name, 'before'), { qemuPid: this.spec.qemuPid?.() })
    const out = await run()
    await failPoint(this.pointName(name, 'after'), { qemuPid: this.spec.qemuPid?.() })
    return out
  }

  /** Writes the step about to run (with the entry itself when it is not written yet). */
  private record(name: string, body?: unknown): void {
    if (this.unwritten) {
      const s = this.spec
      this.repo.add({ id: this.id, vm: s.vm, op: s.op, ...(s.job ? { job: s.job } : {}), body: body ?? s.body, step: name })
      this.unwritten = false
    } else this.repo.setStep(this.id, name, body)
    this.begun.push(name)
  }

  /** A fail point inside a step (`<op>.<name>`), e.g. while a migration streams; no journal write. */
  async point(name: string): Promise<void> {
    await failPoint(`${this.spec.op}.${name}`, { qemuPid: this.spec.qemuPid?.() })
  }

  /**
   * Ends the operation: its journal entry goes. Call it inside the SQLite transaction that
   * commits the operation's metadata, so the two can never disagree, or after an undo.
   */
  end(): void {
    if (this.ended) return
    this.ended = true
    if (!this.unwritten) this.repo.done(this.id)
  }
}
