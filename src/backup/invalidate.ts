// Marks a VM's backup chains invalid when an operation changes its disks' content behind the
// bitmaps (a snapshot revert); listens on the event bus, touches no QEMU.
import type { EventBus } from '../events/bus.ts'
import { REVERT_OP } from '../snapshot/revert.ts'
import { readManifest, writeManifest } from './manifest.ts'

/**
 * Subscribes to job events: when a snapshot revert starts on a VM, every backup chain of that VM
 * is marked invalid before the revert touches anything (the disks jump to other content that no
 * bitmap recorded), so each chain's next backup is full and says why. Returns the unsubscribe.
 */
export function invalidateOnRevert(bus: EventBus, vmDir: (vm: string) => string, log: { warn: (o: object, msg: string) => void }): () => void {
  return bus.subscribe((ev) => {
    if (ev.type !== 'job' || ev.job.op !== REVERT_OP || ev.job.state !== 'running') return
    try {
      const dir = vmDir(ev.vm)
      const m = readManifest(dir)
      if (m.chains.length === 0) return
      const snapshot = (ev.job.params as { snapshot?: string } | undefined)?.snapshot
      const reason = `snapshot revert${snapshot ? ` to ${snapshot}` : ''} (job ${ev.job.id}) changed the disks behind the bitmaps`
      const at = new Date().toISOString()
      for (const c of m.chains) c.invalid = { reason, at }
      writeManifest(dir, m)
      log.warn({ vm: ev.vm, chains: m.chains.map((c) => c.id) }, reason)
    } catch (err) {
      log.warn({ err, vm: ev.vm }, 'could not mark the backup chains invalid after a revert')
    }
  })
}
