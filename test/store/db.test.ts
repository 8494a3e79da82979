import t from 'tap'
import { migrate, openDb } from '../../src/store/db.ts'
import { VmRepo } from '../../src/store/vms.ts'

t.test('opens in WAL mode and migrates once', async (t) => {
  const file = `${t.testdir()}/s/qmpd.db`
  const db = openDb(file)
  t.equal(db.pragma('journal_mode', { simple: true }), 'wal')
  const v = db.pragma('user_version', { simple: true })
  t.ok((v as number) >= 1)
  t.equal(migrate(db), v, 'migrating again changes nothing')
  db.close()
  const again = openDb(file)
  t.equal(again.pragma('user_version', { simple: true }), v)
  again.close()
})

t.test('refuses a store from a newer qmpd', async (t) => {
  const db = openDb(':memory:')
  db.pragma('user_version = 999')
  t.throws(() => migrate(db), /newer/)
})

t.test('VM rows round-trip and names are unique', async (t) => {
  const repo = new VmRepo(openDb(':memory:'))
  const rec = {
    name: 'a',
    definition: { name: 'a', machine: 'q35' as const, cpus: 1, memoryMiB: 64, disks: [], serialLog: true, guestAgent: false },
    runtime: { state: 'shutoff' as const, qmpSocket: '/x/qmp.sock', disks: [], createdFiles: [] },
  }
  t.ok(repo.insert(rec))
  t.notOk(repo.insert(rec), 'second insert with the same name is refused')
  t.same(repo.get('a')?.definition, rec.definition)
  repo.updateRuntime('a', { ...rec.runtime, state: 'running', pid: 42 })
  t.equal(repo.get('a')?.runtime.pid, 42)
  t.ok(repo.delete('a'))
  t.equal(repo.get('a'), undefined)
})
