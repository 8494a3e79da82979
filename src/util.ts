/** Resolves after ms milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms))
}

/**
 * Resolves true when `p` settles within ms, false otherwise; the timer is cleared either way so a
 * long limit never keeps the process alive.
 */
export async function settlesWithin(p: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<false>((r) => {
    timer = setTimeout(() => r(false), ms)
  })
  try {
    return await Promise.race([p.then(() => true as const, () => true as const), timeout])
  } finally {
    clearTimeout(timer)
  }
}

const turnWaiters: Array<() => void> = []
let turnScheduled = false

function releaseOneTurn(): void {
  const next = turnWaiters.shift()
  if (turnWaiters.length > 0) setImmediate(releaseOneTurn)
  else turnScheduled = false
  next?.()
}

/**
 * Resolves in a later event-loop iteration, one waiter per iteration, in call order. The daemon
 * awaits it before each synchronous stretch that a burst of requests would otherwise run back to
 * back (a request's handler, a job's start, the code after a QMP reply): fifty snapshot requests
 * arriving together then take fifty loop iterations, and timers, sockets and other requests get
 * their turn between any two of them instead of after all of them.
 */
export function nextTurn(): Promise<void> {
  return new Promise((resolve) => {
    turnWaiters.push(resolve)
    if (!turnScheduled) {
      turnScheduled = true
      setImmediate(releaseOneTurn)
    }
  })
}
