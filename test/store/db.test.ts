import t from 'tap'
import { migrate, openDb } from '../../src/store/db.ts'
import { SnapshotRepo } from '../../src/store/snapshots.ts'
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

t.test('snapshot lists are cached but always what SQLite holds, also after a rollback', async (t) => {
  const db = openDb(':memory:')
  const repo = new SnapshotRepo(db)
  const snap = (name: string, createdAt: string, description?: string) => ({
    vm: 'a',
    name,
    kind: 'external' as const,
    memory: false,
    createdAt,
    vmState: 'running' as const,
    disks: [],
    ...(description ? { description } : {}),
  })
  const stored = () => (db.prepare('SELECT name, body FROM snapshots WHERE vm = ? ORDER BY created_at, rowid').all('a') as Array<{ name: string; body: string }>).map((r) => JSON.parse(r.body))
  const v0 = repo.version('a')
  repo.put(snap('s1', '2026-01-01T00:00:01Z'))
  t.not(repo.version('a'), v0, 'a write changes the version')
  t.same(repo.list('a'), stored())
  repo.put(snap('s2', '2026-01-01T00:00:02Z'))
  t.same(repo.list('a').map((s) => s.name), ['s1', 's2'], 'a newer row is appended to the cached list')
  repo.put(snap('s0', '2026-01-01T00:00:00Z'))
  t.same(repo.list('a').map((s) => s.name), ['s0', 's1', 's2'], 'an older one is placed where SQLite orders it')
  repo.put(snap('s1', '2026-01-01T00:00:01Z', 'updated'))
  t.equal(repo.get('a', 's1')?.description, 'updated', 'an update in place is seen')
  t.same(repo.list('a'), stored())
  const before = repo.version('a')
  t.throws(() =>
    repo.tx(() => {
      repo.put(snap('s3', '2026-01-01T00:00:03Z'))
      repo.delete('a', 's0')
      t.same(repo.list('a').map((s) => s.name), ['s1', 's2', 's3'], 'inside the transaction its writes are seen')
      throw new Error('boom')
    }),
  )
  t.same(repo.list('a').map((s) => s.name), ['s0', 's1', 's2'], 'after the rollback neither write is seen')
  t.same(repo.list('a'), stored())
  t.not(repo.version('a'), before, 'and the version moved: plans made before are not trusted')
  t.throws(() => {
    ;(repo.list('a')[0] as { name: string }).name = 'x'
  }, TypeError, 'the shared objects cannot be modified by a caller')
  repo.deleteAllFor('a')
  t.same(repo.list('a'), [])
})

t.test('declares no foreign keys, and does not pretend to enforce them', async (t) => {
  const db = openDb(':memory:')
  t.equal(db.pragma('foreign_keys', { simple: true }), 0)
  for (const table of ['vms', 'jobs', 'snapshots', 'images', 'journal']) t.same(db.pragma(`foreign_key_list(${table})`), [], `${table} has none`)
})
