// The store's row checks without QEMU: the start-up scan quarantines the VM of every bad row in
// each table (journal and images too), the repositories refuse or skip those rows, the purge
// forgets them, and every write path refuses a row its read path could not parse.
import t from 'tap'
import { openDb, storeWriteError } from '../../src/store/db.ts'
import { ROW_CHECKS } from '../../src/store/checks.ts'
import { Quarantine, scanStore } from '../../src/store/integrity.ts'
import { JobRepo } from '../../src/store/jobs.ts'
import { JournalRepo } from '../../src/store/journal.ts'
import { SnapshotRepo } from '../../src/store/snapshots.ts'
import { VmRepo } from '../../src/store/vms.ts'

const def = (name: string, file = '/s/vms/x/d.qcow2') => ({
  name,
  machine: 'q35' as const,
  cpus: 1,
  memoryMiB: 64,
  disks: [{ id: 'vda', file, format: 'qcow2' as const, bus: 'virtio' as const, readOnly: false }],
  serialLog: true,
  guestAgent: false,
})
const runtime = { state: 'shutoff' as const, qmpSocket: '/s/vms/x/qmp.sock', disks: [], createdFiles: [] }

t.test('the scan quarantines the VM of a bad row in every table, and the repositories keep away from it', async (t) => {
  const db = openDb(':memory:')
  const vms = new VmRepo(db)
  for (const n of ['ok', 'v', 's', 'i', 'j', 'w']) t.ok(vms.insert({ name: n, definition: def(n), runtime }))
  db.prepare("UPDATE vms SET runtime = '{\"state\":\"melted\"}' WHERE name = 'v'").run()
  db.prepare("INSERT INTO snapshots (vm, name, body, created_at) VALUES ('s', 'a', '{\"vm\":\"s\"}', 'x')").run()
  db.prepare("INSERT INTO images (vm, disk, file, format, backing, created_by_qmpd) VALUES ('i', 'vda', '/f', 'vmdk', NULL, 0)").run()
  new JobRepo(db).save({ id: 'job1', vm: 'j', op: 'start', state: 'succeeded', params: {}, createdAt: 'x' })
  db.prepare("UPDATE jobs SET error = '[1]' WHERE id = 'job1'").run()
  db.prepare("INSERT INTO journal (id, vm, op, body, created_at, job, step, updated_at) VALUES ('e1', 'w', 'start', 'not json', 'x', NULL, NULL, NULL)").run()
  // A journal entry of a VM whose row is gone (a VM delete in flight) is quarantined by its name too.
  db.prepare("INSERT INTO journal (id, vm, op, body, created_at, job, step, updated_at) VALUES ('e2', 'gone', 'vm-delete', '{', 'x', NULL, NULL, NULL)").run()
  db.prepare("INSERT INTO journal (id, vm, op, body, created_at, job, step, updated_at) VALUES ('e3', 'ok', 'start', '{}', 'x', NULL, NULL, NULL)").run()

  const q = new Quarantine()
  const found = scanStore(db, ROW_CHECKS, q)
  t.same(
    found.map((p) => [p.vm, p.table, p.key]),
    [
      ['v', 'vms', 'v'],
      ['s', 'snapshots', 's/a'],
      ['i', 'images', 'i:/f'],
      ['j', 'jobs', 'job1'],
      ['w', 'journal', 'e1'],
      ['gone', 'journal', 'e2'],
    ],
    'one problem per bad row, named by table and key',
  )
  t.same(q.vms(), ['gone', 'i', 'j', 's', 'v', 'w'])
  t.match(q.reason('v'), /^stored vms row v fails its schema: state: /)
  t.match(q.reason('s'), /^stored snapshots row s\/a fails its schema: /)

  const vmRepo = new VmRepo(db, q)
  t.same(vmRepo.list().map((r) => r.name), ['ok'], 'list() leaves every quarantined VM out')
  t.throws(() => vmRepo.get('v'), { code: 'STORE_ROW_INVALID', message: /VM v is quarantined: stored vms row v/ })
  const snaps = new SnapshotRepo(db, q)
  t.throws(() => snaps.list('s'), { code: 'STORE_ROW_INVALID' })
  t.throws(() => snaps.images('i'), { code: 'STORE_ROW_INVALID' })
  t.same(snaps.list('ok'), [], 'a sound VM reads as before')
  const journal = new JournalRepo(db, q)
  t.same(journal.pending().map((e) => e.id), ['e3'], "pending() leaves the quarantined VMs' entries out")
  t.same(journal.pending('w'), [])
  const jobs = new JobRepo(db)
  t.same(jobs.list(), [], 'the bad job row is left out of the list')
  t.throws(() => jobs.get('job1'), { code: 'STORE_ROW_INVALID', message: /job1/ })

  for (const n of ['v', 's', 'i', 'j', 'w', 'gone']) vmRepo.purge(n)
  t.same(q.vms(), [], 'the purge releases every VM')
  t.same(scanStore(db, ROW_CHECKS, new Quarantine()), [], 'and a new scan finds nothing')
  t.same(new VmRepo(db).list().map((r) => r.name), ['ok'], 'the sound VM is untouched')
  t.same(journal.pending().map((e) => e.id), ['e3'], "and so is the sound VM's journal entry")
})

t.test('write paths refuse a row their read path could not parse; nothing is written', async (t) => {
  const db = openDb(':memory:')
  const vms = new VmRepo(db)
  t.throws(() => vms.insert({ name: 'long', definition: def('long', '/' + 'a'.repeat(4096)), runtime }), { code: 'INVALID_INPUT', message: /as it would be stored is invalid/ })
  t.equal((db.prepare('SELECT COUNT(*) AS n FROM vms').get() as { n: number }).n, 0, 'no row')
  t.ok(vms.insert({ name: 'a', definition: def('a'), runtime }))
  t.throws(() => vms.updateRuntime('a', { ...runtime, pid: -1 }), { code: 'INTERNAL' })
  t.equal(vms.get('a')?.runtime.pid, undefined, 'the stored runtime is unchanged')
  const snaps = new SnapshotRepo(db)
  t.throws(() => snaps.putImage({ vm: 'a', disk: 'vda', file: '/f', format: 'vmdk' as 'raw', backing: null, createdByQmpd: false }), { code: 'INTERNAL' })
  t.same(snaps.images('a'), [])
  t.throws(() => snaps.put({ vm: 'a', name: 's', kind: 'external', memory: false, createdAt: 'x', vmState: 'bogus' as 'running', disks: [] }), { code: 'INTERNAL' })
  t.same(snaps.list('a'), [])
  const journal = new JournalRepo(db)
  t.throws(() => journal.add({ id: 'e', vm: 'a', op: 'x', body: undefined }), { code: 'INTERNAL' })
  t.same(journal.pending(), [])
  const jobs = new JobRepo(db)
  t.throws(() => jobs.save({ id: 'j', vm: 'a', op: 'x', state: 'exploded' as 'failed', params: {}, createdAt: 'x' }), { code: 'INTERNAL' })
  t.equal(jobs.get('j'), undefined)
})

t.test('SQLite errors of a full or failing disk become DISK_FULL and IO_ERROR; others stay as they are', async (t) => {
  const full = Object.assign(new Error('database or disk is full'), { code: 'SQLITE_FULL' })
  t.match(storeWriteError(full), { code: 'DISK_FULL', message: /disk is full/, data: { sqlite: 'SQLITE_FULL' } })
  t.match(storeWriteError(Object.assign(new Error('disk I/O error'), { code: 'SQLITE_IOERR_WRITE' })), { code: 'IO_ERROR', data: { sqlite: 'SQLITE_IOERR_WRITE' } })
  t.equal(storeWriteError(Object.assign(new Error('UNIQUE constraint failed'), { code: 'SQLITE_CONSTRAINT_PRIMARYKEY' })), undefined)
  t.equal(storeWriteError(new Error('x')), undefined)
})
