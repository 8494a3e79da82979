// CD-ROMs and VNC: an ISO is attached read-only as cd0, left out of every snapshot kind (its bytes
// never change, no overlay is made on it); a VNC display on a unix socket or a 127.0.0.1 port
// answers the RFB banner; bad ISOs and taken ports are refused with nothing created.
import { createHash } from 'node:crypto'
import { execFileSync } from 'node:child_process'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { connect, createServer, type AddressInfo, type Server } from 'node:net'
import { join } from 'node:path'
import t from 'tap'
import { defineGuestVm, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { freePort } from '../helpers/guest-http.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { shortSocketPath } from '../../src/vm/sockpath.ts'

t.before(() => {
  requireQemu(t)
})

const sha = (f: string): string => createHash('sha256').update(readFileSync(f)).digest('hex')

/** The first 12 bytes a VNC server sends: its protocol version. */
function rfbBanner(target: { path: string } | { host: string; port: number }): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(target as never)
    let got = ''
    s.setEncoding('latin1')
    s.on('data', (d: string) => {
      got += d
      if (got.length >= 12) {
        s.destroy()
        resolve(got.slice(0, 12))
      }
    })
    s.once('error', reject)
    setTimeout(() => {
      s.destroy()
      reject(new Error(`no RFB banner (got ${JSON.stringify(got)})`))
    }, 10_000).unref()
  })
}

async function cdState(td: TestDaemon, vm: string): Promise<{ ro: boolean; file: string; removable: boolean } | undefined> {
  const blocks = (await td.api('POST', `/v1/vms/${vm}/qmp`, { execute: 'query-block' })).body.return as any[]
  // A -device with an id and no backend child: its qdev path is the id itself.
  const cd = blocks.find((b) => b.qdev === 'cd0')
  return cd && { ro: cd.inserted?.ro, file: cd.inserted?.file, removable: cd.removable }
}

t.test('an ISO on cd0 and VNC on a unix socket: snapshot kinds leave the ISO out', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'm')
  const dir = join(td.stateDir, 'vms', 'm')
  const iso = join(dir, 'install.iso')
  const bytes = Buffer.alloc(2 * 1024 * 1024)
  bytes.write('CD001 qmpd test medium', 16 * 2048, 'latin1')
  writeFileSync(iso, bytes)
  const before = sha(iso)
  const patched = await td.api('PATCH', '/v1/vms/m', { cdroms: [{ file: 'install.iso' }], vnc: { unix: true } })
  t.equal(patched.status, 200, `PATCH adds the CD-ROM and VNC: ${JSON.stringify(patched.body.error ?? '')}`)
  t.same(patched.body.definition.cdroms, [{ file: iso }], 'the ISO path is resolved under the VM directory')
  t.same(patched.body.consoles.vnc, { socket: join(dir, 'vnc.sock') }, 'GET shows the VNC socket')
  await op(td, 'm', 'start')
  t.same(await cdState(td, 'm'), { ro: true, file: iso, removable: true }, 'QEMU has the ISO read-only on a removable CD-ROM')
  const view = (await td.api('GET', '/v1/vms/m')).body
  t.same(view.disks.map((d: { id: string }) => d.id), ['vda'], 'the CD-ROM is not one of the disks')
  const short = shortSocketPath(join(dir, 'vnc.sock'))
  t.teardown(short.release)
  t.equal(await rfbBanner({ path: short.path }), 'RFB 003.008\n', 'the VNC socket speaks RFB')
  // A graphics card is there to show (without one VNC serves only QEMU's placeholder and
  // screendump has no console to dump).
  const shot = join(dir, 'screen.ppm')
  const dump = await td.api('POST', '/v1/vms/m/qmp', { execute: 'screendump', arguments: { filename: shot } })
  t.equal(dump.status, 200, `screendump: ${JSON.stringify(dump.body.error ?? '')}`)
  t.match(readFileSync(shot).subarray(0, 20).toString('latin1'), /^P6\n\d+ \d+\n255\n/, 'the display is a real framebuffer (PPM)')

  const cp = await op(td, 'm', 'snapshots', { name: 'cp', kind: 'internal' })
  t.equal(cp.state, 'succeeded', 'an internal checkpoint with a read-only CD-ROM attached')
  t.same((cp.result as any).snapshot.disks.map((d: { id: string }) => d.id), ['vda'], 'it captured vda only')
  const ext = await td.api('POST', '/v1/vms/m/snapshots?wait=true&timeoutSec=120', { name: 'e1', kind: 'external', memory: false })
  t.equal(ext.status, 200, `an external snapshot after the internal checkpoint (${JSON.stringify(ext.body.error ?? '')})`)
  // cp's tag is in the image e1 froze: the revert runs on a copy of it (src/snapshot/revert-mixed.ts).
  await op(td, 'm', 'snapshots/cp/revert')
  t.match(td.daemon.vms.record('m').runtime.disks[0]!.file, /vda-cp-r1\.qcow2$/, 'the disk runs on a copy of the tagged image')
  t.same(await cdState(td, 'm'), { ro: true, file: iso, removable: true }, 'after the revert the ISO is still cd0')
  t.equal(sha(iso), before, 'the ISO is byte for byte what it was')
  t.same((await td.api('GET', '/v1/vms/m/check')).body.problems, [], 'the check sees no stray device')
  t.notMatch(execFileSync('qemu-img', ['info', '-f', 'raw', '--output=json', iso], { encoding: 'utf8' }), /snapshots/, 'and holds no snapshot tag')
  await op(td, 'm', 'stop', { force: true })
})

t.test('external snapshots and checkpoints overlay the disks, never the ISO; VNC on 127.0.0.1', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'x')
  const dir = join(td.stateDir, 'vms', 'x')
  const iso = join(dir, 'tools.iso')
  writeFileSync(iso, Buffer.alloc(1024 * 1024, 7))
  const before = sha(iso)
  const port = await freePort()
  t.equal((await td.api('PATCH', '/v1/vms/x', { cdroms: [{ file: iso }], vnc: { port } })).status, 200)
  await op(td, 'x', 'start')
  t.equal((await td.api('GET', '/v1/vms/x')).body.consoles.vnc.port, port)
  t.equal(await rfbBanner({ host: '127.0.0.1', port }), 'RFB 003.008\n', `VNC answers on 127.0.0.1:${port}`)
  const e1 = await op(td, 'x', 'snapshots', { name: 'e1', kind: 'external', memory: false })
  t.same((e1.result as any).snapshot.disks.map((d: { id: string }) => d.id), ['vda'])
  const cp = await op(td, 'x', 'snapshots', { name: 'cp', kind: 'external', memory: true, live: true })
  t.equal(cp.state, 'succeeded', 'a live external checkpoint with the CD-ROM attached')
  await op(td, 'x', 'snapshots/e1/revert', { state: 'running' })
  t.same(await cdState(td, 'x'), { ro: true, file: iso, removable: true }, 'the relaunched QEMU has the ISO again, not an overlay')
  await op(td, 'x', 'snapshots/cp/revert')
  t.same(await cdState(td, 'x'), { ro: true, file: iso, removable: true }, 'and after the checkpoint revert (-incoming) too')
  t.equal(sha(iso), before, 'the ISO never changed')
  await op(td, 'x', 'stop', { force: true })
})

t.test('bad media and taken ports: a clear 4xx, nothing created', async (t) => {
  const td = await startTestDaemon(t)
  const dir = join(td.stateDir, 'vms', 'bad')
  mkdirSync(join(dir, 'a-dir'), { recursive: true })
  execFileSync('mkfifo', [join(dir, 'fifo.iso')])
  for (const [file, why] of [['a-dir', /directory/], ['fifo.iso', /FIFO|fifo/i], ['missing.iso', /does not exist|missing/]] as const) {
    const r = await td.api('POST', '/v1/vms', { name: 'bad', cdroms: [{ file }] })
    t.equal(r.status, 400, `${file}: 400`)
    t.equal(r.body.error.code, 'INVALID_PATH')
    t.match(r.body.error.message, why, `${file}: ${r.body.error.message}`)
  }
  t.equal((await td.api('POST', '/v1/vms', { name: 'bad', cdroms: [{ file: '/etc/hostname' }] })).status, 400, 'an ISO outside the roots')
  const clash = await td.api('POST', '/v1/vms', { name: 'bad', disks: [{ id: 'cd0', file: 'x.qcow2', sizeMiB: 1 }], cdroms: [{ file: 'missing.iso' }] })
  t.equal(clash.status, 400, 'a disk cannot take the id of a CD-ROM')
  t.match(clash.body.error.message, /id of a CD-ROM/)
  t.equal((await td.api('POST', '/v1/vms', { name: 'bad', vnc: { port: 80 } })).status, 400, 'a VNC port below 5900')
  const holder: Server = createServer()
  await new Promise<void>((r) => holder.listen(0, '127.0.0.1', r))
  t.teardown(() => holder.close())
  const taken = (holder.address() as AddressInfo).port
  const r = await td.api('POST', '/v1/vms', { name: 'bad', vnc: { port: taken } })
  t.equal(r.status, 409, `a VNC port in use: ${r.body.error?.message}`)
  t.equal(r.body.error.code, 'PORT_IN_USE')
  t.equal((await td.api('GET', '/v1/vms/bad')).status, 404, 'nothing was defined')
})
