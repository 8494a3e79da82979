// The Reverter: undo steps in reverse order when a multi-step change fails; knows nothing of what
// it undoes.
import type { Logger } from 'pino'

/**
 * Undo stack for multi-step mutations: add an undo after each step that succeeded; success() at
 * the end forgets them; any failure before that runs revert(), which undoes in reverse order and
 * keeps going when one undo fails (logged), so as much as possible is put back.
 */
export class Reverter {
  private undos: Array<{ what: string; fn: () => unknown }> = []

  constructor(private readonly log: Logger) {}

  add(what: string, fn: () => unknown): void {
    this.undos.push({ what, fn })
  }

  success(): void {
    this.undos = []
  }

  async revert(): Promise<void> {
    const undos = this.undos.reverse()
    this.undos = []
    for (const u of undos) {
      try {
        await u.fn()
        this.log.debug({ undo: u.what }, 'undone')
      } catch (err) {
        this.log.error({ err, undo: u.what }, 'undo failed')
      }
    }
  }
}

/** Runs fn with a Reverter: on throw, reverts and rethrows; on return, success(). */
export async function withReverter<T>(log: Logger, fn: (r: Reverter) => Promise<T>): Promise<T> {
  const r = new Reverter(log)
  try {
    const out = await fn(r)
    r.success()
    return out
  } catch (err) {
    await r.revert()
    throw err
  }
}
