// The -netdev/-device arguments of a VM's NICs; pure, launches and checks nothing.
import type { NicDefinition } from './nic.ts'

/** Where Debian's qemu-system-common installs the helper that puts a tap on a bridge. */
export const BRIDGE_HELPER = '/usr/lib/qemu/qemu-bridge-helper'

/** Backend id of a NIC: the device keeps the NIC's own id (what the guest and query-rx-filter show). */
export function netdevId(nic: NicDefinition): string {
  return `${nic.id}-net`
}

/** True when a NIC makes QEMU fork a helper, which `-sandbox spawn=deny` would kill it for. */
export function needsSpawn(nics: NicDefinition[]): boolean {
  return nics.some((n) => n.bridge !== undefined)
}

/**
 * -netdev and -device for every NIC, in definition order, in JSON form (QEMU >= 7.1 parses
 * -netdev JSON), so a name needs no comma escaping. The MAC is always given (assigned at define),
 * which keeps the argv of a relaunch for -incoming identical to the one that wrote the state:
 * migration checks the device, and the guest's driver knows its MAC.
 * tap uses script=no/downscript=no: QEMU must not run /etc/qemu-ifup (a shell script; the sandbox
 * forbids spawning anyway), the operator made the device.
 */
export function nicArgv(nics: NicDefinition[]): string[] {
  const argv: string[] = []
  for (const nic of nics) {
    const id = netdevId(nic)
    let netdev: Record<string, unknown>
    if (nic.user) {
      netdev = { type: 'user', id }
      if (nic.user.hostfwd.length) {
        netdev['hostfwd'] = nic.user.hostfwd.map((f) => ({ str: `${f.proto}:${f.hostAddr}:${f.hostPort}-:${f.guestPort}` }))
      }
    } else if (nic.tap) {
      netdev = { type: 'tap', id, ifname: nic.tap.ifname, script: 'no', downscript: 'no' }
    } else if (nic.bridge) {
      netdev = { type: 'bridge', id, br: nic.bridge.name, helper: BRIDGE_HELPER }
    } else {
      throw new Error(`NIC ${nic.id} has no backend (the definition schema requires one)`)
    }
    argv.push('-netdev', JSON.stringify(netdev))
    const device: Record<string, unknown> = {
      driver: nic.model === 'e1000' ? 'e1000' : 'virtio-net-pci',
      id: nic.id,
      netdev: id,
      mac: nic.mac,
    }
    argv.push('-device', JSON.stringify(device))
  }
  return argv
}
