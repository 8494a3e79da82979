// The reply schemas of src/qmp/commands.ts against replies shaped as QEMU 7.2 sends them.
import t from 'tap'
import { replySchemas } from '../../src/qmp/commands.ts'

const image = (filename: string, backing?: object) => ({
  filename,
  format: 'qcow2',
  'virtual-size': 1048576,
  'actual-size': 200704,
  'cluster-size': 65536,
  'dirty-flag': false,
  'format-specific': { type: 'qcow2', data: { compat: '1.1', 'lazy-refcounts': false, 'refcount-bits': 16, corrupt: false, 'extended-l2': false } },
  snapshots: [{ id: '1', name: 's1', 'vm-state-size': 0, 'date-sec': 1, 'date-nsec': 2, 'vm-clock-sec': 3, 'vm-clock-nsec': 4, icount: 0 }],
  ...(backing ? { 'backing-filename': 'base.qcow2', 'full-backing-filename': '/d/base.qcow2', 'backing-filename-format': 'qcow2', 'backing-image': backing } : {}),
})

const node = (file: string, nodeName: string, img: object) => ({
  file,
  'node-name': nodeName,
  ro: false,
  drv: 'qcow2',
  encrypted: false,
  detect_zeroes: 'off',
  bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0,
  write_threshold: 0,
  cache: { writeback: true, direct: false, 'no-flush': false },
  backing_file_depth: 1,
  image: img,
})

t.test('query-block: a device with a two-layer chain passes, unknown statistics included', async (t) => {
  const reply = [
    {
      device: '',
      qdev: '/machine/peripheral/vda/virtio-backend',
      type: 'unknown',
      removable: false,
      locked: false,
      'io-status': 'ok',
      inserted: node('/d/top.qcow2', 'vda-f1', image('/d/top.qcow2', image('/d/base.qcow2'))),
    },
  ]
  const r = replySchemas['query-block']!.safeParse(reply)
  t.ok(r.success, r.success ? 'parsed' : JSON.stringify(r.error.issues))
  t.equal(r.data?.[0]?.inserted?.image['backing-image']?.filename, '/d/base.qcow2')
})

t.test('query-block: a chain layer without a filename is refused', async (t) => {
  const bad = image('/d/top.qcow2', { format: 'qcow2', 'virtual-size': 1 })
  t.notOk(replySchemas['query-block']!.safeParse([{ device: 'x', type: 'unknown', removable: false, locked: false, inserted: node('/d/top.qcow2', 'n', bad) }]).success)
})

t.test('query-named-block-nodes: flat nodes pass; a node without a driver is refused', async (t) => {
  const ok = [node('/d/top.qcow2', 'vda-f1', image('/d/top.qcow2')), { ...node('/d/top.qcow2', 'vda-p1', image('/d/top.qcow2')), drv: 'file' }]
  t.ok(replySchemas['query-named-block-nodes']!.safeParse(ok).success)
  const { drv: _drv, ...noDrv } = ok[0]!
  t.notOk(replySchemas['query-named-block-nodes']!.safeParse([noDrv]).success)
})

t.test('query-migrate-capabilities and blockdev-snapshot-delete-internal-sync', async (t) => {
  t.ok(replySchemas['query-migrate-capabilities']!.safeParse([{ capability: 'background-snapshot', state: false }, { capability: 'some-future-cap', state: true }]).success)
  t.notOk(replySchemas['query-migrate-capabilities']!.safeParse([{ capability: 'events' }]).success)
  t.ok(replySchemas['blockdev-snapshot-delete-internal-sync']!.safeParse({ id: '1', name: 's', 'vm-state-size': 0, 'date-sec': 0, 'date-nsec': 0, 'vm-clock-sec': 0, 'vm-clock-nsec': 0 }).success)
})
