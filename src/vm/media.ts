// Removable media and the display of a VM qmpd launches: CD-ROM and VNC arguments for QEMU and
// the host checks they need; pure except for the port probe, launches nothing.
import { QmpdError } from '../errors.ts'
import { bindError } from './net-host.ts'

/** A CD-ROM as the definition holds it (file resolved by PathPolicy at define). */
export interface CdromSpec {
  file: string
  bootIndex?: number | undefined
}

/** A VNC display: a unix socket in the VM directory, or a TCP port on 127.0.0.1 only. */
export type VncSpec = { unix: true } | { port: number }

/** The guest-visible id of the i-th CD-ROM (cd0, cd1, ...); disk ids of that shape are refused. */
export function cdromId(i: number): string {
  return `cd${i}`
}

/** File name of the VNC socket in the VM directory (QEMU runs there: a relative path). */
export const VNC_SOCKET = 'vnc.sock'

/** The lowest port a VNC display can have (QEMU counts displays from 5900). */
export const VNC_BASE_PORT = 5900

/**
 * -blockdev/-device pairs of the CD-ROMs: raw, read-only, on IDE/AHCI ports after the disks' ones
 * (`nextIde`: the first free port). They are no runtime disk: no snapshot kind captures them.
 */
export function cdromArgv(cdroms: readonly CdromSpec[], machine: 'q35' | 'pc', nextIde: number): string[] {
  const argv: string[] = []
  cdroms.forEach((cd, i) => {
    const id = cdromId(i)
    const port = nextIde + i
    argv.push(
      '-blockdev',
      JSON.stringify({ driver: 'raw', 'node-name': `${id}-f0`, 'read-only': true, file: { driver: 'file', filename: cd.file, 'node-name': `${id}-p0`, 'read-only': true } }),
    )
    const bus = machine === 'q35' ? { bus: `ide.${port}` } : { bus: `ide.${port >> 1}`, unit: port & 1 }
    argv.push('-device', JSON.stringify({ driver: 'ide-cd', id, drive: `${id}-f0`, ...bus, ...(cd.bootIndex !== undefined ? { bootindex: cd.bootIndex } : {}) }))
  })
  return argv
}

/** -vnc's argument: `unix:vnc.sock`, or display N on 127.0.0.1 (port 5900 + N). */
export function vncArg(vnc: VncSpec): string {
  return 'unix' in vnc ? `unix:${VNC_SOCKET}` : `127.0.0.1:${vnc.port - VNC_BASE_PORT}`
}

/**
 * Refuses a VNC port something on this host already holds, before QEMU would fail on it.
 * @throws QmpdError PORT_IN_USE; HOST_RESOURCE_MISSING when the port cannot be bound for another reason.
 */
export async function checkVncPort(vnc: VncSpec | undefined): Promise<void> {
  if (!vnc || 'unix' in vnc) return
  const err = await bindError('tcp', '127.0.0.1', vnc.port)
  if (!err) return
  if (err.code === 'EADDRINUSE') throw new QmpdError('PORT_IN_USE', `vnc.port: 127.0.0.1:${vnc.port} is already in use on this host`, { port: vnc.port })
  throw new QmpdError('HOST_RESOURCE_MISSING', `vnc.port: cannot bind 127.0.0.1:${vnc.port}: ${err.message}`, { port: vnc.port, reason: err.code ?? err.message })
}
