// Whether the configured QEMU binary can load a RAM state file of a given format, asked before a
// job is made; no file I/O of its own.
import { qemuCaps } from '../vm/qemu-caps.ts'
import { mappedRamUnsupported } from './ramfile.ts'
import type { StateFormat } from './ramformat.ts'

/**
 * Refuses a mapped-ram file when `binary` reports no mapped-ram (or multifd) migration capability
 * (its capability probe, src/vm/qemu-caps.ts), so that the request fails with 409 before QEMU is
 * launched. A stream loads everywhere. Without a binary (tests that build a service alone) the job
 * checks again on the launched QEMU.
 * @throws QmpdError NOT_SUPPORTED for a mapped-ram file the binary cannot load.
 */
export async function assertLoadable(binary: string | undefined, f: StateFormat, file: string): Promise<void> {
  if (f.format !== 'mapped-ram' || !binary) return
  const caps = await qemuCaps(binary)
  if (!caps.hasMigrateCapability('mapped-ram') || !caps.hasMigrateCapability('multifd')) throw mappedRamUnsupported(file)
}
