// NIC definitions, MAC assignment, NIC argv and the host checks, without QEMU: host state is faked
// with a sysfs-like directory and an ACL file of the test's own.
import { mkdirSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { join } from 'node:path'
import t from 'tap'
import { QmpdError } from '../../src/errors.ts'
import { buildArgv, SANDBOX, SANDBOX_SPAWN } from '../../src/vm/argv.ts'
import { nicArgv } from '../../src/vm/argv-net.ts'
import { VmDefinition } from '../../src/vm/definition.ts'
import { bridgeAcl, checkNicsOnHost } from '../../src/vm/net-host.ts'
import { assignMacs, NicDefinition } from '../../src/vm/nic.ts'

const nic = (x: unknown) => NicDefinition.parse(x)

t.test('assignMacs keeps given MACs and draws distinct ones under 52:54:00 for the rest', async (t) => {
  // A random source that repeats itself first: the second draw must not reuse the given MAC.
  const draws = [Buffer.from([0, 0, 1]), Buffer.from([0, 0, 1]), Buffer.from([0xab, 0xcd, 0xef])]
  const out = assignMacs([nic({ id: 'a', mac: '52:54:00:00:00:01', user: {} }), nic({ id: 'b', user: {} })], () => draws.shift()!)
  t.equal(out[0]!.mac, '52:54:00:00:00:01', 'given MAC kept')
  t.equal(out[1]!.mac, '52:54:00:ab:cd:ef', 'a drawn MAC that collides is drawn again')
  const real = assignMacs([nic({ id: 'a', user: {} }), nic({ id: 'b', user: {} })])
  t.match(real[0]!.mac, /^52:54:00(:[0-9a-f]{2}){3}$/)
  t.not(real[0]!.mac, real[1]!.mac)
})

t.test('nicArgv: JSON -netdev/-device per NIC, MAC always given, no scripts for tap', async (t) => {
  const argv = nicArgv([
    nic({ id: 'net0', mac: '52:54:00:00:00:01', user: { hostfwd: [{ hostPort: 2222, guestPort: 22 }, { proto: 'udp', hostAddr: '127.0.0.2', hostPort: 5353, guestPort: 53 }] } }),
    nic({ id: 'net1', model: 'e1000', mac: '52:54:00:00:00:02', tap: { ifname: 'tap7' } }),
    nic({ id: 'net2', mac: '52:54:00:00:00:03', bridge: { name: 'br0' } }),
  ])
  const pairs = []
  for (let i = 0; i < argv.length; i += 2) pairs.push([argv[i], JSON.parse(argv[i + 1]!)])
  t.same(pairs, [
    ['-netdev', { type: 'user', id: 'net0-net', hostfwd: [{ str: 'tcp:127.0.0.1:2222-:22' }, { str: 'udp:127.0.0.2:5353-:53' }] }],
    ['-device', { driver: 'virtio-net-pci', id: 'net0', netdev: 'net0-net', mac: '52:54:00:00:00:01' }],
    ['-netdev', { type: 'tap', id: 'net1-net', ifname: 'tap7', script: 'no', downscript: 'no' }],
    ['-device', { driver: 'e1000', id: 'net1', netdev: 'net1-net', mac: '52:54:00:00:00:02' }],
    ['-netdev', { type: 'bridge', id: 'net2-net', br: 'br0', helper: '/usr/lib/qemu/qemu-bridge-helper' }],
    ['-device', { driver: 'virtio-net-pci', id: 'net2', netdev: 'net2-net', mac: '52:54:00:00:00:03' }],
  ])
})

t.test('the sandbox allows spawning only for a VM with a bridge NIC', async (t) => {
  const sandbox = (nics: unknown[]) => {
    const argv = buildArgv(VmDefinition.parse({ name: 'v', nics }), { accel: 'tcg', disks: [] })
    return argv[argv.indexOf('-sandbox') + 1]
  }
  t.equal(sandbox([]), SANDBOX)
  t.equal(sandbox([{ id: 'n0', mac: '52:54:00:00:00:01', user: {} }]), SANDBOX)
  t.equal(sandbox([{ id: 'n0', mac: '52:54:00:00:00:01', bridge: { name: 'br0' } }]), SANDBOX_SPAWN)
  t.match(SANDBOX_SPAWN, /spawn=allow/)
  t.match(SANDBOX_SPAWN, /elevateprivileges=deny/)
})

t.test('bridgeAcl reads allow/deny/include as qemu-bridge-helper does', async (t) => {
  const dir = t.testdir({
    'none.conf': '# nothing\n',
    'allow.conf': 'allow br0\n',
    'all.conf': 'allow all\ndeny br1\n',
    'inc.conf': `include ${join(t.testdirName, 'allow.conf')}\n`,
  })
  t.equal(bridgeAcl(join(dir, 'missing.conf'), 'br0'), 'not-allowed', 'no file allows nothing')
  t.equal(bridgeAcl(join(dir, 'none.conf'), 'br0'), 'not-allowed')
  t.equal(bridgeAcl(join(dir, 'allow.conf'), 'br0'), 'allowed')
  t.equal(bridgeAcl(join(dir, 'allow.conf'), 'br1'), 'not-allowed')
  t.equal(bridgeAcl(join(dir, 'all.conf'), 'br0'), 'allowed', 'allow all')
  t.equal(bridgeAcl(join(dir, 'all.conf'), 'br1'), 'denied', 'a matching deny wins over allow all')
  t.equal(bridgeAcl(join(dir, 'inc.conf'), 'br0'), 'allowed', 'include is followed')
})

t.test('checkNicsOnHost: taps, bridges and their helper and ACL, against a fake sysfs', async (t) => {
  const root = t.testdir()
  const sysNet = join(root, 'net')
  mkdirSync(join(sysNet, 'tap0'), { recursive: true })
  writeFileSync(join(sysNet, 'tap0', 'tun_flags'), '0x1002\n')
  mkdirSync(join(sysNet, 'eth0'), { recursive: true })
  mkdirSync(join(sysNet, 'br0', 'bridge'), { recursive: true })
  const helper = join(root, 'helper')
  writeFileSync(helper, '#!/bin/true\n', { mode: 0o755 })
  const acl = join(root, 'bridge.conf')
  writeFileSync(acl, 'allow br0\n')
  const paths = { sysNet, helper, acl }
  const code = async (n: unknown, p = paths) => {
    try {
      await checkNicsOnHost([nic(n)], p)
      return 'ok'
    } catch (err) {
      return err instanceof QmpdError ? `${err.code}: ${err.message}` : String(err)
    }
  }
  t.equal(await code({ id: 'n', tap: { ifname: 'tap0' } }), 'ok', 'an existing tap')
  t.match(await code({ id: 'n', tap: { ifname: 'tap1' } }), /^HOST_RESOURCE_MISSING: .*no network interface tap1/)
  t.match(await code({ id: 'n', tap: { ifname: 'eth0' } }), /^HOST_RESOURCE_MISSING: .*eth0 is not a tap device/)
  t.match(await code({ id: 'n', bridge: { name: 'br1' } }), /^HOST_RESOURCE_MISSING: .*no bridge br1/)
  t.match(await code({ id: 'n', bridge: { name: 'eth0' } }), /^HOST_RESOURCE_MISSING: .*no bridge eth0/, 'an interface that is not a bridge')
  if (process.getuid?.() === 0) {
    t.equal(await code({ id: 'n', bridge: { name: 'br0' } }), 'ok', 'an allowed bridge with its helper')
    writeFileSync(acl, 'allow br9\n')
    t.match(await code({ id: 'n', bridge: { name: 'br0' } }), /^HOST_RESOURCE_MISSING: .*does not allow bridge br0/)
    writeFileSync(acl, 'allow all\ndeny br0\n')
    t.match(await code({ id: 'n', bridge: { name: 'br0' } }), /^HOST_RESOURCE_MISSING: .*denies bridge br0/)
  } else {
    t.match(await code({ id: 'n', bridge: { name: 'br0' } }), /needs root/, 'not root: refused with the reason')
  }
  t.match(await code({ id: 'n', bridge: { name: 'br0' } }, { ...paths, helper: join(root, 'no-helper') }), /^HOST_RESOURCE_MISSING: .*no-helper is missing/)

  const srv = createServer()
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  const port = (srv.address() as { port: number }).port
  t.match(await code({ id: 'n', user: { hostfwd: [{ hostPort: port, guestPort: 80 }] } }), /^PORT_IN_USE: .*tcp 127\.0\.0\.1:/)
  t.equal(await code({ id: 'n', user: { hostfwd: [{ hostAddr: '127.0.0.2', hostPort: port, guestPort: 80 }] } }), 'ok', 'the same port on another address is free')
  await new Promise((r) => srv.close(r))
  t.equal(await code({ id: 'n', user: { hostfwd: [{ hostPort: port, guestPort: 80 }] } }), 'ok', 'free again once closed')
  t.match(await code({ id: 'n', user: { hostfwd: [{ hostAddr: '192.0.2.1', hostPort: 2222, guestPort: 80 }] } }), /^HOST_RESOURCE_MISSING: .*cannot bind/, 'an address the host does not have')
})

t.test('the definition schema: exactly one backend, distinct ids, MACs and forwarded ports', async (t) => {
  const issues = (nics: unknown) => {
    const r = VmDefinition.safeParse({ name: 'v', nics })
    return r.success ? [] : r.error.issues.map((i) => i.message)
  }
  t.same(issues([{ id: 'n0', user: {} }]), [])
  t.match(issues([{ id: 'n0', user: {}, bridge: { name: 'br0' } }]), [/exactly one of user, tap or bridge \(got user, bridge\)/])
  t.match(issues([{ id: 'n0', user: { hostfwd: [{ hostPort: 80, guestPort: 80 }] } }, { id: 'n1', user: { hostfwd: [{ hostPort: 80, guestPort: 81 }] } }]), [/forwarded twice/])
  t.match(issues([{ id: 'n0', user: {} }, { id: 'n0', user: {} }]), [/duplicate NIC id/])
  t.match(issues([{ id: 'n0', mac: '52:54:00:AA:00:01', user: {} }]), [/lower-case/])
  t.same(VmDefinition.parse({ name: 'v' }).nics, undefined, 'no nics field: no NICs, as before')
})
