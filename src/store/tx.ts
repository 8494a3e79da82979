// SQLite transactions with rollback hooks. Memory that mirrors a row (VmManager's VM records)
// registers how to put itself back, so a transaction that rolls back leaves memory and store
// equal. Holds no SQL of its own and must not be bypassed by repositories that open transactions.
import { storeWriteError, type Db } from './db.ts'

/** Per database: one frame of rollback hooks per open (possibly nested) transaction. */
const frames = new WeakMap<Db, Array<Array<() => void>>>()

/**
 * Runs fn in one SQLite transaction (a savepoint when nested). When fn throws, the rollback hooks
 * registered inside it run, newest first, and the error is rethrown; on success a nested
 * transaction's hooks pass to the enclosing one (which may still roll back).
 */
export function transaction<T>(db: Db, fn: () => T): T {
  let stack = frames.get(db)
  if (!stack) frames.set(db, (stack = []))
  const frame: Array<() => void> = []
  stack.push(frame)
  let out: T
  try {
    out = db.transaction(fn)()
  } catch (err) {
    stack.pop()
    for (const undo of frame.reverse()) undo()
    // A COMMIT that meets a full disk throws here, not in a statement.
    throw storeWriteError(err) ?? err
  }
  stack.pop()
  stack.at(-1)?.push(...frame)
  return out
}

/** Registers undo to run if the innermost transaction() now open on db rolls back; outside one, does nothing. */
export function onRollback(db: Db, undo: () => void): void {
  frames.get(db)?.at(-1)?.push(undo)
}
