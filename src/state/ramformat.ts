// The format of a RAM state file, read from the configuration section QEMU writes at its start;
// no file I/O and no QMP here.

/** How a RAM state file is laid out: a sequential migration stream, or QEMU's mapped-ram file (RAM pages at fixed offsets). */
export type RamFormat = 'stream' | 'mapped-ram'

/** What a RAM state file needs from the QEMU that loads it. */
export interface StateFormat {
  format: RamFormat
  /** Migration capabilities the file was written with that the loading side must switch on too (QEMU checks them). */
  capabilities: string[]
}

/** Bytes of a state file's start that hold its configuration section. */
export const FORMAT_HEADER_BYTES = 4096

// migration/savevm.c: after the 8-byte magic and version, QEMU_VM_CONFIGURATION (0x07) carries
// the machine type (be32 length + name) and optional subsections (QEMU_VM_SUBSECTION, 0x05: u8
// length + name, be32 version, fields). "configuration/capabilities" (be32 count, then u8 length +
// name each) lists the capabilities the destination must have set (mapped-ram, x-ignore-shared).
const QEMU_VM_CONFIGURATION = 0x07
const QEMU_VM_SUBSECTION = 0x05
/** Field bytes of the configuration subsections other than capabilities (savevm.c vmstate_target_page_bits, vmstate_uuid). */
const FIXED_SUBSECTIONS: Record<string, number> = { 'configuration/target-page-bits': 4, 'configuration/uuid': 16 }

/**
 * The format of a migration stream from its first bytes (FORMAT_HEADER_BYTES of them, magic
 * already checked). A stream without a configuration section or capabilities (QEMU 7.2 writes
 * none for a plain save) is `stream`.
 */
export function parseStateFormat(head: Buffer): StateFormat {
  const capabilities: string[] = []
  let p = 8
  if (head[p] === QEMU_VM_CONFIGURATION && p + 5 <= head.length) {
    p += 1
    p += 4 + head.readUInt32BE(p)
    while (p < head.length && head[p] === QEMU_VM_SUBSECTION) {
      const len = head[p + 1] ?? 0
      const name = head.subarray(p + 2, p + 2 + len).toString('latin1')
      p += 2 + len + 4
      if (name === 'configuration/capabilities') {
        if (p + 4 > head.length) break
        const count = head.readUInt32BE(p)
        p += 4
        for (let i = 0; i < count && p < head.length; i++) {
          const n = head[p]!
          capabilities.push(head.subarray(p + 1, p + 1 + n).toString('latin1'))
          p += 1 + n
        }
      } else if (name in FIXED_SUBSECTIONS) {
        p += FIXED_SUBSECTIONS[name]!
      } else {
        break
      }
    }
  }
  return { format: capabilities.includes('mapped-ram') ? 'mapped-ram' : 'stream', capabilities }
}
