// Crash recovery's dispatcher: at start, before anything else runs, every operation a previous
// daemon left in the journal goes to the recovery rule its owner registered. The rules live with
// the operations (src/snapshot/recovery.ts, src/chain/recovery.ts, src/state/recovery.ts,
// src/vm/recovery.ts); the decision table is in docs/architecture.md.
import type { Logger } from 'pino'
import type { JournalEntry, JournalRepo } from '../store/journal.ts'

/** What recovery did with an interrupted operation. */
export interface RecoveryOutcome {
  /** forward: finished (the operation happened); back: undone (as if it never ran). */
  action: 'forward' | 'back'
  /** What was done, in words, for the log and the job's error details. */
  detail: string
  /** The result the job would have had, when rolled forward. */
  result?: unknown
}

/** A recovery rule: inspects QEMU and the files, then finishes or undoes the operation. */
export type RecoveryRule = (entry: JournalEntry, log: Logger) => Promise<RecoveryOutcome>

/** Tells the job that ran an operation what recovery did with it. */
export type JobNote = (jobId: string, outcome: RecoveryOutcome) => void

/** Runs the registered recovery rule of every pending journal entry. */
export class Recovery {
  private readonly rules = new Map<string, RecoveryRule>()

  constructor(
    private readonly repo: JournalRepo,
    private readonly log: Logger,
    private readonly noteJob: JobNote,
  ) {}

  /** Registers the rule for one operation name (each name once). */
  register(op: string, rule: RecoveryRule): void {
    if (this.rules.has(op)) throw new Error(`recovery rule for ${op} registered twice`)
    this.rules.set(op, rule)
  }

  /** The operation names that have a rule (the crash tests check every journaled op has one). */
  ops(): string[] {
    return [...this.rules.keys()]
  }

  /**
   * Recovers every pending entry, oldest first, one VM's entries in order. An entry whose rule
   * throws stays in the journal for the next start and is reported (GET /v1/vms/{vm}/check).
   */
  async run(): Promise<Array<{ entry: JournalEntry; outcome?: RecoveryOutcome; error?: unknown }>> {
    const report: Array<{ entry: JournalEntry; outcome?: RecoveryOutcome; error?: unknown }> = []
    for (const entry of this.repo.pending()) {
      const log = this.log.child({ vm: entry.vm, journal: entry.id, op: entry.op, step: entry.step })
      const rule = this.rules.get(entry.op)
      if (!rule) {
        log.error('no recovery rule for this operation; entry left in the journal')
        report.push({ entry, error: new Error(`no recovery rule for ${entry.op}`) })
        continue
      }
      try {
        const outcome = await rule(entry, log)
        this.repo.done(entry.id)
        if (entry.job) this.noteJob(entry.job, outcome)
        log.warn({ action: outcome.action, detail: outcome.detail }, 'recovered an operation interrupted by a crash')
        report.push({ entry, outcome })
      } catch (error) {
        log.error({ err: error }, 'could not recover an interrupted operation; left in the journal for the next start')
        report.push({ entry, error })
      }
    }
    return report
  }
}
