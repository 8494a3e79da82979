// Each journaled operation's body has a schema next to its type; recovery parses with it instead
// of casting, so a body that does not fit fails its rule (the entry stays, reported) rather than
// being acted on. No QEMU.
import pino from 'pino'
import t from 'tap'
import { ChainJournal } from '../../src/chain/recovery.ts'
import { Recovery } from '../../src/ops/recovery.ts'
import { CreateJournal } from '../../src/snapshot/create.ts'
import { DeleteJournal } from '../../src/snapshot/delete.ts'
import { RevertJournal } from '../../src/snapshot/revert.ts'
import { openDb } from '../../src/store/db.ts'
import { JournalRepo } from '../../src/store/journal.ts'
import { StartJournal, VmDeleteJournal } from '../../src/vm/plans.ts'

const snapshot = { vm: 'a', name: 's', kind: 'external', memory: false, createdAt: '2026-01-01T00:00:00Z', vmState: 'running', disks: [{ id: 'vda', mode: 'external', file: '/d/a.qcow2', format: 'qcow2', overlay: '/d/b.qcow2' }] }

t.test('bodies as the operations write them parse after a JSON round trip', async (t) => {
  const rt = (x: unknown) => JSON.parse(JSON.stringify(x)) as unknown
  t.ok(CreateJournal.safeParse(rt({ plan: { snapshot, overlays: [{ id: 'vda', file: '/d/a.qcow2', format: 'qcow2', overlay: '/d/b.qcow2' }] }, wasRunning: true })).success)
  t.ok(RevertJournal.safeParse(rt({ snapshot: 's', state: undefined, overlays: ['/d/c.qcow2'] })).success, 'an undefined state is dropped by JSON and still fits')
  t.ok(DeleteJournal.safeParse(rt({ snapshot: 's', children: true, remove: [] })).success)
  t.ok(ChainJournal.safeParse(rt({ job: 'copy', disk: 'vda', layers: [{ file: '/d/a', format: 'qcow2' }], top: 0, base: 1, live: true, keepMerged: false, dest: '/d/c', format: 'raw' })).success)
  t.ok(StartJournal.safeParse({ managed: true, paused: false }).success)
  t.ok(VmDeleteJournal.safeParse({ files: ['/d/a'], dir: '/d', deleteStorage: true }).success)
})

t.test('bodies that do not fit are refused', async (t) => {
  t.notOk(CreateJournal.safeParse({ plan: { snapshot: { ...snapshot, kind: 'weird' }, overlays: [] }, wasRunning: true }).success)
  t.notOk(RevertJournal.safeParse({ overlays: [] }).success, 'no snapshot')
  t.notOk(DeleteJournal.safeParse({ snapshot: 's', extra: 1 }).success, 'unknown member')
  t.notOk(ChainJournal.safeParse({ job: 'mirror', disk: 'vda', layers: [], top: 0, base: 0, live: true, keepMerged: false }).success)
  t.notOk(StartJournal.safeParse({ managed: 'yes', paused: false }).success)
  t.notOk(VmDeleteJournal.safeParse({ files: '/d/a', dir: '/d', deleteStorage: true }).success)
})

t.test('a rule that parses a bad body throws, and the entry stays in the journal', async (t) => {
  const repo = new JournalRepo(openDb(':memory:'))
  const recovery = new Recovery(repo, pino({ level: 'silent' }), () => {})
  repo.add({ id: 'e', vm: 'a', op: 'start', body: { managed: 1 } })
  recovery.register('start', async (e) => (StartJournal.parse(e.body), { action: 'back', detail: '' }))
  const [r] = await recovery.run()
  t.ok(r?.error, 'reported')
  t.same(repo.pending().map((e) => e.id), ['e'])
})
