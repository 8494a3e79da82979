// Checks that the host can give a VM's NICs what they ask for (tap, bridge + helper, free forwarded ports); changes nothing.
import { createSocket } from 'node:dgram'
import { accessSync, constants, existsSync, readFileSync, statSync } from 'node:fs'
import { createServer } from 'node:net'
import { isAbsolute } from 'node:path'
import { QmpdError } from '../errors.ts'
import { BRIDGE_HELPER } from './argv-net.ts'
import type { HostForward, NicDefinition } from './nic.ts'

/** Where the kernel lists network interfaces; a tap device has tun_flags there, a bridge a bridge/ directory. */
const SYS_NET = '/sys/class/net'

/** qemu-bridge-helper's ACL file (its compiled-in DEFAULT_ACL_FILE on Debian). */
export const BRIDGE_ACL = '/etc/qemu/bridge.conf'

/** Where each check looks; tests point them at files of their own. */
export interface NetHostPaths {
  sysNet: string
  helper: string
  acl: string
}

const DEFAULT_PATHS: NetHostPaths = { sysNet: SYS_NET, helper: BRIDGE_HELPER, acl: BRIDGE_ACL }

/**
 * Checks every NIC against the host, at define and again before every launch (a tap can vanish,
 * a port can be taken in between): the tap device exists and is a tap; the bridge exists,
 * qemu-bridge-helper is there and its ACL allows the bridge; each forwarded host port can be
 * bound now. QEMU's own refusal, should the state change after this check, reaches the start
 * job through qemu.log.
 * @throws QmpdError HOST_RESOURCE_MISSING (tap, bridge, helper or ACL), PORT_IN_USE (hostfwd).
 */
export async function checkNicsOnHost(nics: NicDefinition[], paths: NetHostPaths = DEFAULT_PATHS): Promise<void> {
  for (const [i, nic] of nics.entries()) {
    const field = `nics[${i}]`
    if (nic.tap) {
      const ifname = nic.tap.ifname
      if (!existsSync(`${paths.sysNet}/${ifname}`)) {
        // QEMU would create a fresh, unconnected tap of that name (TUNSETIFF): refuse instead.
        throw new QmpdError('HOST_RESOURCE_MISSING', `${field}.tap.ifname: no network interface ${ifname} on this host (create it first, e.g. ip tuntap add dev ${ifname} mode tap)`, { nic: nic.id, ifname })
      }
      if (!existsSync(`${paths.sysNet}/${ifname}/tun_flags`)) {
        throw new QmpdError('HOST_RESOURCE_MISSING', `${field}.tap.ifname: ${ifname} is not a tap device`, { nic: nic.id, ifname })
      }
    }
    if (nic.bridge) checkBridge(nic, field, paths)
    for (const [j, f] of (nic.user?.hostfwd ?? []).entries()) await checkPortFree(f, `${field}.user.hostfwd[${j}]`, nic.id)
  }
}

function checkBridge(nic: NicDefinition, field: string, paths: NetHostPaths): void {
  const br = nic.bridge!.name
  if (!existsSync(`${paths.sysNet}/${br}/bridge`)) {
    throw new QmpdError('HOST_RESOURCE_MISSING', `${field}.bridge.name: no bridge ${br} on this host`, { nic: nic.id, bridge: br })
  }
  try {
    accessSync(paths.helper, constants.X_OK)
  } catch {
    throw new QmpdError('HOST_RESOURCE_MISSING', `${field}.bridge: ${paths.helper} is missing (install qemu-system-common)`, { nic: nic.id, helper: paths.helper })
  }
  // QEMU runs under seccomp with no_new_privs: a setuid helper gains nothing, so only a root
  // qmpd (whose QEMU is root) can attach to a bridge this way.
  if (process.getuid?.() !== 0) {
    throw new QmpdError('HOST_RESOURCE_MISSING', `${field}.bridge: qemu-bridge-helper needs root under QEMU's sandbox, and qmpd does not run as root`, { nic: nic.id })
  }
  const verdict = bridgeAcl(paths.acl, br)
  if (verdict !== 'allowed') {
    throw new QmpdError('HOST_RESOURCE_MISSING', `${field}.bridge.name: ${paths.acl} ${verdict === 'denied' ? 'denies' : 'does not allow'} bridge ${br} (add "allow ${br}")`, { nic: nic.id, bridge: br, acl: paths.acl })
  }
}

/**
 * What qemu-bridge-helper's ACL says about a bridge, read as the helper reads it (qemu-bridge-helper.c
 * parse_acl_file): "allow NAME|all", "deny NAME|all", "include FILE"; any matching deny wins, else
 * a matching allow is needed. A missing file allows nothing.
 */
export function bridgeAcl(file: string, bridge: string, depth = 0): 'allowed' | 'denied' | 'not-allowed' {
  let allowed = false
  let denied = false
  const visit = (f: string, d: number): void => {
    if (d > 8) return
    let text: string
    try {
      if (!statSync(f).isFile()) return
      text = readFileSync(f, 'utf8')
    } catch {
      return
    }
    for (const raw of text.split('\n')) {
      const line = raw.replace(/#.*/, '').trim()
      const m = /^(allow|deny|include)\s+(\S+)$/.exec(line)
      if (!m) continue
      const [, cmd, arg] = m as unknown as [string, string, string]
      if (cmd === 'include') {
        if (isAbsolute(arg)) visit(arg, d + 1)
      } else if (arg === 'all' || arg === bridge) {
        if (cmd === 'allow') allowed = true
        else denied = true
      }
    }
  }
  visit(file, depth)
  return denied ? 'denied' : allowed ? 'allowed' : 'not-allowed'
}

/** Binds the forwarded host address and port for a moment: the answer QEMU would get now. */
async function checkPortFree(f: HostForward, field: string, nic: string): Promise<void> {
  const err = await bindError(f.proto, f.hostAddr, f.hostPort)
  if (!err) return
  const data = { nic, proto: f.proto, hostAddr: f.hostAddr, hostPort: f.hostPort, reason: err.code ?? err.message }
  if (err.code === 'EADDRINUSE') {
    throw new QmpdError('PORT_IN_USE', `${field}: ${f.proto} ${f.hostAddr}:${f.hostPort} is already in use on this host`, data)
  }
  throw new QmpdError('HOST_RESOURCE_MISSING', `${field}: cannot bind ${f.proto} ${f.hostAddr}:${f.hostPort}: ${err.message}`, data)
}

/** Binds `port` on `host` for a moment and lets go: the error a listener there would get, or undefined when it is free. */
export function bindError(proto: 'tcp' | 'udp', host: string, port: number): Promise<NodeJS.ErrnoException | undefined> {
  return new Promise((resolve) => {
    if (proto === 'udp') {
      const s = createSocket('udp4')
      s.once('error', (err) => {
        s.close()
        resolve(err)
      })
      s.bind(port, host, () => s.close(() => resolve(undefined)))
      return
    }
    const srv = createServer()
    srv.once('error', (err) => resolve(err))
    srv.listen({ host, port, exclusive: true }, () => srv.close(() => resolve(undefined)))
  })
}
