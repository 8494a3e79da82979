// Which entries of a VM directory the check calls orphans: qmpd's own naming only.
import t from 'tap'
import { orphanKind } from '../../src/ops/orphans.ts'

const dir = '/s/vms/a'
const referenced = new Set([`${dir}/vda.qcow2`, `${dir}/cp1.vmstate`])
const kind = (name: string) => orphanKind(name, `${dir}/${name}`, referenced)

t.test('temporary files of qmpd are orphans whatever references them', async (t) => {
  t.equal(kind('.cp2.vmstate.partial-1a2b3c4d'), 'temporary')
  t.equal(kind('.x.vmstate.partial-1234'), 'temporary')
  t.equal(kind('.x.vmstate.partial'), 'temporary')
  t.equal(kind('mig-abcd.sock'), 'temporary')
  t.equal(kind('managed.save.restored'), 'temporary')
})

t.test('images and RAM state files are orphans only when nothing references them', async (t) => {
  t.equal(kind('vda.qcow2'), undefined)
  t.equal(kind('cp1.vmstate'), undefined)
  t.equal(kind('vda-s1.qcow2'), 'unreferenced')
  t.equal(kind('cp2.vmstate'), 'unreferenced')
  t.equal(kind('vdb-s1-r2.qcow2'), 'unreferenced')
})

t.test("an image a user named is the user's, referenced or not (a layer a commit or copy left unused)", async (t) => {
  for (const name of ['base.qcow2', 'mid.qcow2', 'disk0.qcow2', 'My-Disk.qcow2']) t.equal(kind(name), undefined, name)
})

t.test('files of any other naming are never orphans', async (t) => {
  for (const name of ['pmem-1.bin', 'qmp.sock', 'qga.sock', 'qemu.log', 'serial.log', 'qemu.pid', 'managed.save', 'disk.raw', 'notes.partial', 'mig.sock', 'x.qcow2.bak']) {
    t.equal(kind(name), undefined, name)
  }
})
