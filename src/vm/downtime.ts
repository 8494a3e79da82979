// Measures a guest's pause from QEMU's STOP/RESUME events; sends no command that changes the VM.
import type { QmpClient } from '../qmp/index.ts'

type Ts = { seconds: number; microseconds: number }

/**
 * Measures the guest pause an operation causes, from QEMU's own STOP and RESUME event timestamps
 * (taken in QEMU when the vCPUs stop and start, not when qmpd hears of it). Start it before the
 * operation; end() returns the milliseconds between the first STOP and the last RESUME after it
 * (0 when the guest never stopped, up to now when it has not resumed yet).
 */
export function trackDowntime(qmp: QmpClient): { end: () => number } {
  let stopAt: number | undefined
  let resumeAt: number | undefined
  const toMs = (t: Ts): number => t.seconds * 1000 + t.microseconds / 1000
  const onStop = (e: { timestamp: Ts }): void => {
    if (stopAt === undefined) stopAt = toMs(e.timestamp)
  }
  const onResume = (e: { timestamp: Ts }): void => {
    if (stopAt !== undefined) resumeAt = toMs(e.timestamp)
  }
  qmp.on('STOP', onStop)
  qmp.on('RESUME', onResume)
  return {
    end: () => {
      qmp.off('STOP', onStop)
      qmp.off('RESUME', onResume)
      if (stopAt === undefined) return 0
      return Math.round(((resumeAt ?? Date.now()) - stopAt) * 10) / 10
    },
  }
}
