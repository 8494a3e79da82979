// Discovery of an adopted QEMU's disks from query-block answers (as QEMU 7.2 gives them): which
// devices become disks, which are left out and why, and the node generation. No QEMU needed.
import t from 'tap'
import type { QmpClient } from '../../src/qmp/index.ts'
import { discoverAdoptedDisks, mergeAdoptedDisks } from '../../src/vm/adopted-disks.ts'

const inserted = (filename: string, extra: Record<string, unknown> = {}) => ({ file: filename, drv: 'qcow2', ro: false, 'node-name': '#block1', image: { filename, format: 'qcow2' }, ...extra })

function fakeQmp(blocks: unknown[], nodes: string[] = []): QmpClient {
  return {
    execute: async (cmd: string) => (cmd === 'query-block' ? blocks : nodes.map((n) => ({ 'node-name': n, file: '', drv: 'qcow2' }))),
  } as unknown as QmpClient
}

t.test('devices become disks by -device id or drive name; media, read-only, odd names and formats are left out', async (t) => {
  const blocks = [
    { device: '', qdev: '/machine/peripheral/vda/virtio-backend', removable: false, inserted: inserted('/srv/a.qcow2') },
    { device: 'drv0', qdev: '/machine/peripheral-anon/device[0]/virtio-backend', removable: false, inserted: inserted('/srv/b.raw', { drv: 'raw' }) },
    { device: 'cd0', qdev: '/machine/peripheral-anon/device[1]', removable: true },
    { device: 'cd1', removable: true, inserted: inserted('/srv/x.iso', { drv: 'raw', ro: true }) },
    { device: 'ro0', removable: false, inserted: inserted('/srv/ro.qcow2', { ro: true }) },
    { device: 'rel0', removable: false, inserted: inserted('disk.qcow2') },
    { device: 'json0', removable: false, inserted: inserted('json:{"driver":"qcow2"}') },
    { device: 'vmdk0', removable: false, inserted: inserted('/srv/c.vmdk', { drv: 'vmdk' }) },
    { device: '', qdev: '/machine/peripheral-anon/device[2]/virtio-backend', removable: false, inserted: inserted('/srv/d.qcow2') },
  ]
  const found = await discoverAdoptedDisks(fakeQmp(blocks))
  t.same(found.disks, [
    { id: 'vda', file: '/srv/a.qcow2', format: 'qcow2', gen: 0 },
    { id: 'drv0', file: '/srv/b.raw', format: 'raw', gen: 0 },
  ])
  t.same(found.skipped.map((s) => s.id), ['cd0', 'cd1', 'ro0', 'rel0', 'json0', 'vmdk0', '/machine/peripheral-anon/device[2]/virtio-backend'])
  t.match(found.skipped.find((s) => s.id === 'cd0')?.reason, /empty/)
  t.match(found.skipped.find((s) => s.id === 'rel0')?.reason, /relative/)
  t.match(found.skipped.find((s) => s.id === 'vmdk0')?.reason, /format vmdk/)
})

t.test('the node generation starts above the overlays qmpd already added, and never goes down', async (t) => {
  const blocks = [{ device: 'drv0', removable: false, inserted: inserted('/v/drv0-s2.qcow2') }]
  const found = await discoverAdoptedDisks(fakeQmp(blocks, ['drv0-f1', 'drv0-f3', 'other-f9', '#block7']))
  t.equal(found.disks[0]?.gen, 3, 'past drv0-f3, not other-f9')
  const again = await discoverAdoptedDisks(fakeQmp(blocks, []), [{ id: 'drv0', file: '/v/x', format: 'qcow2', gen: 5 }])
  t.equal(again.disks[0]?.gen, 5, 'the stored generation is kept')
  const merged = mergeAdoptedDisks([{ id: 'drv0', file: '/v/stored.qcow2', format: 'qcow2', gen: 2 }, { id: 'gone', file: '/v/g', format: 'raw', gen: 0 }], found.disks)
  t.same(merged, [{ id: 'drv0', file: '/v/stored.qcow2', format: 'qcow2', gen: 3 }], 're-adoption keeps the stored file for recovery to judge, drops devices QEMU lost')
})
