// Resuming the guest of a background-snapshot migration once QEMU write-protects its RAM; no
// journal, no disk switch, no file I/O.
import type { QmpClient } from '../qmp/index.ts'

/** How often query-migrate is asked while waiting for the first RAM page (the guest is paused meanwhile): every 2 ms at first, then every 25 ms. */
const POLL_MS = 2
const SLOW_POLL_MS = 25
const FAST_FOR_MS = 100
/** After this long without a page qmpd stops waiting; the migration's completion path resumes the guest. */
const GIVE_UP_MS = 30_000

/**
 * Waits until a background-snapshot migration issued on a stopped guest sends its first RAM page,
 * then resumes the guest with `cont` unless QEMU already did. Resolves without resuming when the
 * migration ended before, or sent no page within GIVE_UP_MS (the caller's completion path resumes
 * or undoes).
 *
 * Why: QEMU's background-snapshot thread stops the guest, saves device state, write-protects RAM
 * (userfaultfd) and then resumes the guest only if it ran before the migration (QEMU 9.0+:
 * bg_migration_vm_start_bh calls vm_resume(vm_old_state); 7.2 called vm_start()). qmpd stops the
 * guest itself before `migrate` (the disks switch in that pause), so QEMU 9+ leaves it paused for
 * the whole RAM write. A `cont` before QEMU's own stop would let the guest run between the disk
 * switch and the RAM capture; RAM pages are sent only after write-protection is on (migration.c
 * bg_migration_thread), so the first page is the earliest safe moment. Chosen by behaviour (the
 * guest's run state), not by version.
 */
export async function resumeOnceTracking(qmp: QmpClient, cont: () => Promise<void>): Promise<boolean> {
  const t0 = Date.now()
  for (;;) {
    const m = await qmp.execute('query-migrate')
    if (m.status !== 'setup' && m.status !== 'active') return false
    const ram = m.ram
    // A page really sent (normal, or a zero page counted as duplicate): not `remaining < total`,
    // which discarded RAM (virtio-mem) makes true before QEMU's own stop and write protection.
    if (m.status === 'active' && ram && ram.normal + ram.duplicate > 0) break
    const waited = Date.now() - t0
    if (waited > GIVE_UP_MS) return false
    await new Promise((r) => setTimeout(r, waited < FAST_FOR_MS ? POLL_MS : SLOW_POLL_MS))
  }
  const st = await qmp.execute('query-status')
  if (st.running) return false
  await cont()
  return true
}
