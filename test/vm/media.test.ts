// CD-ROM and VNC arguments: ports after the disks' on q35's AHCI and pc's PIIX, read-only raw
// nodes, VNC on a relative socket or 127.0.0.1 only; the schema's limits.
import t from 'tap'
import { buildArgv } from '../../src/vm/argv.ts'
import { VmDefinition } from '../../src/vm/definition.ts'
import { cdromArgv, vncArg } from '../../src/vm/media.ts'

const devices = (argv: string[]): any[] => argv.flatMap((a, i) => (argv[i - 1] === '-device' && a.startsWith('{') ? [JSON.parse(a)] : []))

t.test('CD-ROMs take the IDE ports after the disks\' ones', async (t) => {
  t.same(devices(cdromArgv([{ file: '/i.iso' }, { file: '/j.iso', bootIndex: 1 }], 'q35', 2)), [
    { driver: 'ide-cd', id: 'cd0', drive: 'cd0-f0', bus: 'ide.2' },
    { driver: 'ide-cd', id: 'cd1', drive: 'cd1-f0', bus: 'ide.3', bootindex: 1 },
  ])
  t.same(devices(cdromArgv([{ file: '/i.iso' }], 'pc', 1)), [{ driver: 'ide-cd', id: 'cd0', drive: 'cd0-f0', bus: 'ide.0', unit: 1 }])
  const node = JSON.parse(cdromArgv([{ file: '/i.iso' }], 'q35', 0)[1]!)
  t.same(node, { driver: 'raw', 'node-name': 'cd0-f0', 'read-only': true, file: { driver: 'file', filename: '/i.iso', 'node-name': 'cd0-p0', 'read-only': true } })
  const def = VmDefinition.parse({ name: 'v', disks: [{ id: 'sda', file: '/a', bus: 'sata' }], cdroms: [{ file: '/i.iso' }] })
  const argv = buildArgv(def, { accel: 'tcg', disks: [{ id: 'sda', file: '/a', format: 'qcow2', gen: 0 }] })
  t.same(devices(argv).map((d) => [d.id, d.bus]), [['sda', 'ide.0'], ['cd0', 'ide.1']], 'a q35 sata disk first, then the CD-ROM')
})

t.test('VNC: a relative unix socket, or a display on 127.0.0.1', async (t) => {
  t.equal(vncArg({ unix: true }), 'unix:vnc.sock')
  t.equal(vncArg({ port: 5901 }), '127.0.0.1:1')
  const argv = buildArgv(VmDefinition.parse({ name: 'v', vnc: { port: 5900 } }), { accel: 'tcg', disks: [] })
  t.equal(argv[argv.indexOf('-vnc') + 1], '127.0.0.1:0')
  t.same(devices(argv).find((d) => d.driver === 'VGA'), { driver: 'VGA', id: 'video0' }, 'a display device for VNC to show')
  t.notOk(buildArgv(VmDefinition.parse({ name: 'v' }), { accel: 'tcg', disks: [] }).includes('VGA'), 'none without VNC')
})

t.test('the schema refuses what cannot be attached', async (t) => {
  const bad = (d: unknown): boolean => !VmDefinition.safeParse(d).success
  t.ok(bad({ name: 'v', cdroms: Array(5).fill({ file: '/i' }) }), 'at most 4 CD-ROMs')
  t.ok(bad({ name: 'v', machine: 'pc', disks: [0, 1, 2].map((i) => ({ id: `hd${String.fromCharCode(97 + i)}`, file: `/${i}`, bus: 'ide' })), cdroms: [{ file: '/i' }, { file: '/j' }] }), 'pc has 4 IDE ports')
  t.ok(bad({ name: 'v', disks: [{ id: 'vda', file: '/a', bootIndex: 0 }], cdroms: [{ file: '/i', bootIndex: 0 }] }), 'one bootIndex twice')
  t.ok(bad({ name: 'v', vnc: { port: 5900, unix: true } }), 'VNC is a socket or a port')
  t.ok(bad({ name: 'v', disks: [{ id: 'cd0', file: '/a' }], cdroms: [{ file: '/i' }] }), 'cd0 is the first CD-ROM\'s id')
  t.notOk(bad({ name: 'v', disks: [{ id: 'cd0', file: '/a' }] }), 'a disk named cd0 on a VM without CD-ROMs (rows stored before cdroms existed) still parses')
  t.notOk(bad({ name: 'v', disks: [{ id: 'cd1', file: '/a' }], cdroms: [{ file: '/i' }] }), 'cd1 is free with one CD-ROM')
  t.notOk(bad({ name: 'v', cdroms: [{ file: '/i', bootIndex: 0 }], disks: [{ id: 'vda', file: '/a', bootIndex: 1 }] }))
})
