// NICs with real QEMU: a user-mode NIC whose hostfwd reaches busybox httpd in the Linux test
// guest, before and after a live external checkpoint's revert; MACs; and the host checks that
// refuse a tap, a bridge or a forwarded port the host cannot give.
import { existsSync } from 'node:fs'
import { createServer, type Server } from 'node:net'
import { dirname } from 'node:path'
import t, { type Test } from 'tap'
import { eventually, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { ensureLinuxGuest, GUEST_HTTP_PORT, GUEST_NET_APPEND } from '../helpers/linux-guest.ts'
import { freePort, guestGet } from '../helpers/guest-http.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { revert, snap } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

async function holdPort(t: Test): Promise<{ port: number; srv: Server }> {
  const srv = createServer()
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r))
  t.teardown(() => new Promise<void>((r) => srv.close(() => r())))
  return { port: (srv.address() as { port: number }).port, srv }
}

async function deviceMac(td: TestDaemon, vm: string, nic: string): Promise<string> {
  // qom-get rather than query-rx-filter, which e1000 does not answer.
  const res = await td.api('POST', `/v1/vms/${vm}/qmp`, { execute: 'qom-get', arguments: { path: `/machine/peripheral/${nic}`, property: 'mac' } })
  if (res.status !== 200) throw new Error(`qom-get mac: ${res.status} ${JSON.stringify(res.body)}`)
  return res.body.return
}

t.test('hostfwd reaches httpd in the guest; a live external checkpoint reverts to its state, NIC and MAC included', async (t) => {
  const guest = await ensureLinuxGuest()
  const td = await startTestDaemon(t, { config: { allowedDirs: [dirname(guest.kernel)] } })
  const port = await freePort()
  const def = await td.api('POST', '/v1/vms', {
    name: 'web',
    memoryMiB: 256,
    kernel: guest.kernel,
    initrd: guest.initrd,
    append: `${guest.append} ${GUEST_NET_APPEND}`,
    disks: [{ id: 'vda', file: 'data.qcow2', sizeMiB: 16 }],
    nics: [{ id: 'net0', user: { hostfwd: [{ proto: 'tcp', hostPort: port, guestPort: GUEST_HTTP_PORT }] } }],
  })
  t.equal(def.status, 201, 'VM with a user NIC defined')
  const nic = def.body.definition.nics[0]
  t.match(nic.mac, /^52:54:00:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}$/, 'a MAC was generated under 52:54:00')
  t.equal(nic.model, 'virtio', 'virtio is the default model')
  t.same(nic.user.hostfwd[0], { proto: 'tcp', hostAddr: '127.0.0.1', hostPort: port, guestPort: GUEST_HTTP_PORT }, 'hostfwd with its defaults')
  t.equal((await td.api('GET', '/v1/vms/web')).body.definition.nics[0].mac, nic.mac, 'GET shows the same MAC')

  const t0 = performance.now()
  await op(td, 'web', 'start')
  const boot = await guestGet(port, '/boot', 120_000)
  t.comment(`boot to first HTTP answer: ${Math.round(performance.now() - t0)} ms`)
  t.match(boot, /^[0-9a-f-]{36}$/, 'the host reaches httpd in the guest through the hostfwd')
  t.equal(await guestGet(port, '/mac'), nic.mac, 'the guest sees the defined MAC on eth0')
  t.equal(await deviceMac(td, 'web', 'net0'), nic.mac, 'and so does QEMU')

  const c0 = Number(await guestGet(port, '/counter'))
  const cp = await snap(td, 'web', { name: 'cp1', kind: 'external', memory: true, live: true })
  t.equal(cp.snapshot.kind, 'external', 'live external checkpoint taken')
  const c1 = Number(await guestGet(port, '/counter'))
  t.ok(c1 >= c0, `the guest serves on after the checkpoint (counter ${c0} -> ${c1})`)
  // The guest moves on, well past the checkpoint's counter.
  t.ok(await eventually(async () => Number(await guestGet(port, '/counter')) > c1 + 40, 60_000, 500), 'the guest counter moved on')
  const before = Number(await guestGet(port, '/counter'))

  const rev = await revert(td, 'web', 'cp1')
  t.equal(rev.state, 'running', 'reverted to running')
  const afterBoot = await guestGet(port, '/boot')
  const after = Number(await guestGet(port, '/counter'))
  t.equal(afterBoot, boot, 'same boot id: the guest was not rebooted, it is the checkpoint\'s RAM')
  t.ok(after < before, `the counter went back (${before} before the revert, ${after} after)`)
  t.ok(after >= c0, `to the checkpoint's instant or just after it (checkpoint between ${c0} and ${c1})`)
  t.equal(await guestGet(port, '/mac'), nic.mac, 'the guest keeps its MAC after the revert')
  t.equal(await deviceMac(td, 'web', 'net0'), nic.mac, 'QEMU relaunched with the same MAC')
  t.equal((await td.api('GET', '/v1/vms/web')).body.definition.nics[0].mac, nic.mac, 'the definition keeps it')
  await op(td, 'web', 'stop', { force: true })
})

t.test('NIC backends the host cannot give are refused at define and at start; nothing is created', async (t) => {
  const td = await startTestDaemon(t)
  const tap = await td.api('POST', '/v1/vms', { name: 'nt', nics: [{ id: 'net0', tap: { ifname: 'qmpdnotap9' } }] })
  t.equal(tap.status, 422, 'a tap that does not exist: 422')
  t.equal(tap.body.error.code, 'HOST_RESOURCE_MISSING')
  t.match(tap.body.error.message, /qmpdnotap9/)
  t.notOk(existsSync('/sys/class/net/qmpdnotap9'), 'and no tap of that name was created')
  t.equal((await td.api('GET', '/v1/vms/nt')).status, 404, 'nor a VM')

  const br = await td.api('POST', '/v1/vms', { name: 'nb', nics: [{ id: 'net0', bridge: { name: 'qmpdnobr9' } }] })
  t.equal(br.status, 422, 'a bridge that does not exist: 422')
  t.equal(br.body.error.code, 'HOST_RESOURCE_MISSING')
  t.match(br.body.error.message, /no bridge qmpdnobr9/)
  t.equal((await td.api('GET', '/v1/vms/nb')).status, 404)

  const held = await holdPort(t)
  const busy = await td.api('POST', '/v1/vms', { name: 'np', nics: [{ id: 'net0', user: { hostfwd: [{ proto: 'tcp', hostPort: held.port, guestPort: 22 }] } }] })
  t.equal(busy.status, 409, 'a forwarded port in use: 409')
  t.equal(busy.body.error.code, 'PORT_IN_USE')
  t.match(busy.body.error.message, new RegExp(`127\\.0\\.0\\.1:${held.port}`))
  t.equal((await td.api('GET', '/v1/vms/np')).status, 404)

  // Free at define, taken by the time of the start: the start job fails, the VM stays shut off.
  const port = await freePort()
  const ok = await td.api('POST', '/v1/vms', { name: 'later', nics: [{ id: 'net0', model: 'e1000', user: { hostfwd: [{ proto: 'tcp', hostPort: port, guestPort: 22 }] } }] })
  t.equal(ok.status, 201, 'defined while the port was free')
  const squatter = createServer()
  await new Promise<void>((r) => squatter.listen(port, '127.0.0.1', r))
  t.teardown(() => new Promise<void>((r) => squatter.close(() => r())))
  const start = await td.api('POST', '/v1/vms/later/start?wait=true&timeoutSec=60', {})
  t.equal(start.status, 409, 'start refused')
  t.equal(start.body.error.code, 'PORT_IN_USE', 'with the reason')
  t.equal((await td.api('GET', '/v1/vms/later')).body.state, 'shutoff', 'the VM is still shut off')
  await new Promise<void>((r) => squatter.close(() => r()))
  await op(td, 'later', 'start', { paused: true })
  const mac = (await td.api('GET', '/v1/vms/later')).body.definition.nics[0].mac
  t.equal(await deviceMac(td, 'later', 'net0'), mac, 'once the port is free the e1000 NIC runs with the defined MAC')
  await op(td, 'later', 'stop', { force: true })
})

t.test('malformed NICs are 400s', async (t) => {
  const td = await startTestDaemon(t)
  const bad: Array<[string, unknown]> = [
    ['two backends', [{ id: 'n0', user: {}, tap: { ifname: 'tap0' } }]],
    ['no backend', [{ id: 'n0' }]],
    ['multicast MAC', [{ id: 'n0', mac: '01:00:5e:00:00:01', user: {} }]],
    ['duplicate MAC', [{ id: 'n0', mac: '52:54:00:00:00:01', user: {} }, { id: 'n1', mac: '52:54:00:00:00:01', user: {} }]],
    ['duplicate id', [{ id: 'n0', user: {} }, { id: 'n0', user: {} }]],
    ['unknown model', [{ id: 'n0', model: 'rtl8139', user: {} }]],
    ['port 0', [{ id: 'n0', user: { hostfwd: [{ hostPort: 0, guestPort: 22 }] } }]],
    ['interface name with a comma', [{ id: 'n0', tap: { ifname: 'tap0,script=/bin/sh' } }]],
    ['host address not an IPv4', [{ id: 'n0', user: { hostfwd: [{ hostAddr: 'localhost', hostPort: 2222, guestPort: 22 }] } }]],
  ]
  for (const [what, nics] of bad) {
    const res = await td.api('POST', '/v1/vms', { name: 'bad', nics })
    t.equal(res.status, 400, `${what}: 400`)
    t.equal(res.body.error.code, 'INVALID_INPUT', what)
  }
  t.equal((await td.api('GET', '/v1/vms/bad')).status, 404, 'nothing was defined')
})
