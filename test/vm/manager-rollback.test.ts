// VmManager's in-memory record against the store when a transaction around a runtime write rolls back.
import pino from 'pino'
import t from 'tap'
import { openDb } from '../../src/store/db.ts'
import { JournalRepo } from '../../src/store/journal.ts'
import { SnapshotRepo } from '../../src/store/snapshots.ts'
import { VmRepo } from '../../src/store/vms.ts'
import { VmManager } from '../../src/vm/manager.ts'

function setup() {
  const db = openDb(':memory:')
  const repo = new VmRepo(db)
  repo.insert({
    name: 'a',
    definition: { name: 'a', machine: 'q35' as const, cpus: 1, memoryMiB: 64, disks: [], serialLog: true, guestAgent: false },
    runtime: { state: 'shutoff' as const, qmpSocket: '/x/qmp.sock', disks: [], createdFiles: [] },
  })
  const events: unknown[] = []
  // updateRuntime and the state setters touch only the repository, the bus and the logger.
  const vms = new VmManager({ repo, bus: { emit: (e: unknown) => events.push(e) }, log: pino({ level: 'silent' }) } as unknown as ConstructorParameters<typeof VmManager>[0])
  return { db, repo, vms, snapshots: new SnapshotRepo(db), journal: new JournalRepo(db) }
}

t.test('a transaction that throws after updateRuntime leaves record() equal to the stored row', async (t) => {
  const { repo, vms, snapshots } = setup()
  const before = structuredClone(vms.record('a').runtime)
  t.throws(() =>
    snapshots.tx(() => {
      vms.updateRuntime('a', { createdFiles: ['/x/new.qcow2'] })
      vms.updateRuntime('a', { currentSnapshot: 's1' })
      throw new Error('boom')
    }),
  /boom/)
  t.same(vms.record('a').runtime, before, 'memory is back to the runtime before the transaction')
  t.same(vms.record('a').runtime, repo.get('a')!.runtime, 'memory equals the stored row')
})

t.test('a state change inside a rolled-back journal transaction is undone in memory too', async (t) => {
  const { repo, vms, journal } = setup()
  t.throws(() =>
    journal.tx(() => {
      vms.markSaved('a')
      throw new Error('boom')
    }),
  )
  t.equal(vms.record('a').runtime.state, 'shutoff')
  t.same(vms.record('a').runtime, repo.get('a')!.runtime)
})

t.test('a committed transaction keeps the new runtime', async (t) => {
  const { repo, vms, snapshots } = setup()
  snapshots.tx(() => vms.updateRuntime('a', { createdFiles: ['/x/kept.qcow2'] }))
  t.same(vms.record('a').runtime.createdFiles, ['/x/kept.qcow2'])
  t.same(vms.record('a').runtime, repo.get('a')!.runtime)
})

t.test('an inner transaction that rolls back undoes only its own writes', async (t) => {
  const { repo, vms, snapshots, journal } = setup()
  snapshots.tx(() => {
    vms.updateRuntime('a', { createdFiles: ['/x/outer.qcow2'] })
    t.throws(() =>
      journal.tx(() => {
        vms.updateRuntime('a', { createdFiles: ['/x/inner.qcow2'] })
        throw new Error('inner')
      }),
    )
  })
  t.same(vms.record('a').runtime.createdFiles, ['/x/outer.qcow2'])
  t.same(vms.record('a').runtime, repo.get('a')!.runtime)
})

t.test('an outer rollback undoes the writes of a committed inner transaction', async (t) => {
  const { repo, vms, snapshots, journal } = setup()
  t.throws(() =>
    snapshots.tx(() => {
      journal.tx(() => vms.updateRuntime('a', { createdFiles: ['/x/inner.qcow2'] }))
      throw new Error('outer')
    }),
  )
  t.same(vms.record('a').runtime.createdFiles, [])
  t.same(vms.record('a').runtime, repo.get('a')!.runtime)
})
