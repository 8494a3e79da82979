// The accelerator probe's guest as bytes (assembled src/vm/probe-guest.S); builds a disk image, runs nothing.

// Assembled src/vm/probe-guest.S. To regenerate after editing it:
//   as --32 -o /tmp/g.o src/vm/probe-guest.S && ld -m elf_i386 -Ttext 0x7c00 -e 0x7c00 --oformat binary -o /tmp/g.bin /tmp/g.o
//   xxd -p -c 32 /tmp/g.bin
// and paste the lines below. test/vm/accel-probe.test.ts checks the two agree when as and ld exist.
const PROBE_GUEST_HEX = `
fa31c08ed88ec08ed0bc007cea117c0000baf803b052eebf0010b9001831c0f3
abc70600100320c70600200330bf003066b883000000b9000266890566050000
200083c708e2f20f0116f07c0f20c00c010f22c0ea597c080066b810008ed88e
c08ed066baf803b050ee0f20e083c8200f22e0b8001000000f22d8b9800000c0
0f320d000100000f3066baf803b045ee0f20c00d000000800f22c0b047eeeaa5
7c00001800b04cee48c7c70000200048c7c10000800048c7c050510000f348ab
b057eeb010e6f4f4ebfd8db6000000000000000000000000ffff0000009acf00
ffff00000092cf00ffff0000009aaf001f00d07c000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
0000000000000000000000000000000000000000000000000000000000000000
00000000000000000000000000000000000000000000000000000000000055aa
`

/** Exit status of QEMU when the probe guest finished (isa-debug-exit turns `out 0x10` into (0x10 << 1) | 1). */
export const PROBE_GUEST_EXIT = 33

/** Letters the guest prints on COM1 after each stage, in order: real mode, protected mode, EFER.LME set, paging on, long mode, 64 MiB written. */
export const PROBE_STAGES = 'RPEGLW'

/** The 512-byte boot sector; QEMU needs `-device isa-debug-exit,iobase=0xf4,iosize=4` and 128 MiB of RAM. */
export function probeGuestSector(): Buffer {
  const buf = Buffer.from(PROBE_GUEST_HEX.replace(/\s+/g, ''), 'hex')
  if (buf.length !== 512 || buf[510] !== 0x55 || buf[511] !== 0xaa) throw new Error('probe guest: embedded boot sector is damaged')
  return buf
}
