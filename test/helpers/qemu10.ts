// Where the tests find the two QEMUs they compare: the distribution's (/usr/bin) and the private
// QEMU 10 that scripts/setup.sh --qemu10 unpacks into .qemu/10. Never skips: a missing one fails.
import { accessSync, constants } from 'node:fs'
import { fileURLToPath } from 'node:url'
import type { Test } from 'tap'

/** The checkout's private QEMU 10 wrapper (scripts/setup.sh --qemu10), or $QMPD_QEMU10. */
export const QEMU10 = process.env['QMPD_QEMU10'] ?? fileURLToPath(new URL('../../.qemu/10/bin/qemu-system-x86_64', import.meta.url))

/** The distribution's QEMU (Debian 12: 7.2), or $QMPD_QEMU_SYSTEM; PATH may point at QEMU 10 during the QEMU 10 pass. */
export const QEMU_SYSTEM = process.env['QMPD_QEMU_SYSTEM'] ?? '/usr/bin/qemu-system-x86_64'

/** Asserts that `binary` can be executed; returns whether it can. */
export function requireBinary(t: Pick<Test, 'ok'>, binary: string, how: string): boolean {
  let ok = true
  try {
    accessSync(binary, constants.X_OK)
  } catch {
    ok = false
  }
  t.ok(ok, `${binary} is executable (needed by this test; ${how})`)
  return ok
}
