// Network cards of a VM definition (zod) and the MAC addresses qmpd gives them; no host checks, no argv.
import { randomBytes } from 'node:crypto'
import { z } from 'zod'

/** The prefix QEMU and libvirt use for the MACs they make up (locally administered range of QEMU's OUI). */
export const MAC_PREFIX = '52:54:00'

const Port = z.number().int().min(1).max(65535)

/** One host port forwarded into a user-mode (slirp) network. */
export const HostForward = z.strictObject({
  proto: z.enum(['tcp', 'udp']).default('tcp'),
  hostAddr: z.ipv4().default('127.0.0.1').describe('host address QEMU listens on (default 127.0.0.1, never all interfaces unless asked)'),
  hostPort: Port,
  guestPort: Port,
})
export type HostForward = z.output<typeof HostForward>

/** One NIC. Exactly one of `user`, `tap` and `bridge` says where its frames go. */
export const NicDefinition = z
  .strictObject({
    id: z.string().regex(/^[a-z][a-z0-9]{0,15}$/, 'must match [a-z][a-z0-9]{0,15}, e.g. net0'),
    model: z.enum(['virtio', 'e1000']).default('virtio'),
    mac: z
      .string()
      .regex(/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/, 'must be six lower-case hex pairs separated by ":"')
      .refine((m) => (parseInt(m.slice(0, 2), 16) & 1) === 0, 'must be a unicast address (the low bit of the first byte clear)')
      .optional()
      .describe('generated (52:54:00:xx:xx:xx) at define when absent, and kept from then on'),
    user: z.strictObject({ hostfwd: z.array(HostForward).max(32).default([]) }).optional().describe("QEMU's user-mode network (slirp): 10.0.2.0/24, gateway 10.0.2.2"),
    tap: z
      .strictObject({ ifname: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$/, 'must be a Linux interface name (1-15 characters)') })
      .optional()
      .describe('an existing tap device (created by the operator, e.g. ip tuntap add mode tap)'),
    bridge: z
      .strictObject({ name: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$/, 'must be a Linux interface name (1-15 characters)') })
      .optional()
      .describe('an existing bridge, joined through qemu-bridge-helper (it must allow the bridge in /etc/qemu/bridge.conf)'),
  })
  .superRefine((nic, ctx) => {
    const modes = (['user', 'tap', 'bridge'] as const).filter((m) => nic[m] !== undefined)
    if (modes.length !== 1) {
      ctx.addIssue({ code: 'custom', path: [], message: `needs exactly one of user, tap or bridge (got ${modes.length ? modes.join(', ') : 'none'})` })
    }
  })
export type NicDefinition = z.output<typeof NicDefinition>

/** Issues of a definition's NIC list as a whole: duplicate ids, MACs and forwarded host ports. */
export function nicListIssues(nics: NicDefinition[]): { path: (string | number)[]; message: string }[] {
  const issues: { path: (string | number)[]; message: string }[] = []
  const ids = new Set<string>()
  const macs = new Set<string>()
  const ports = new Set<string>()
  nics.forEach((n, i) => {
    if (ids.has(n.id)) issues.push({ path: ['nics', i, 'id'], message: `duplicate NIC id ${n.id}` })
    ids.add(n.id)
    if (n.mac && macs.has(n.mac)) issues.push({ path: ['nics', i, 'mac'], message: `duplicate MAC ${n.mac}` })
    if (n.mac) macs.add(n.mac)
    n.user?.hostfwd.forEach((f, j) => {
      const key = `${f.proto}:${f.hostAddr}:${f.hostPort}`
      if (ports.has(key)) issues.push({ path: ['nics', i, 'user', 'hostfwd', j, 'hostPort'], message: `${f.proto} ${f.hostAddr}:${f.hostPort} is forwarded twice` })
      ports.add(key)
    })
  })
  return issues
}

/**
 * The NICs with a MAC each: given ones are kept, missing ones are drawn at random under
 * 52:54:00, distinct from the others. Called once, at define, so that a MAC never changes
 * across starts, reverts and restores (the guest's state knows it).
 */
export function assignMacs(nics: NicDefinition[], random: (n: number) => Buffer = randomBytes): NicDefinition[] {
  const used = new Set(nics.flatMap((n) => (n.mac ? [n.mac] : [])))
  return nics.map((n) => {
    if (n.mac) return n
    let mac: string
    do {
      mac = `${MAC_PREFIX}:${[...random(3)].map((b) => b.toString(16).padStart(2, '0')).join(':')}`
    } while (used.has(mac))
    used.add(mac)
    return { ...n, mac }
  })
}
