// What a revert does to the definition: nothing for old or equal records, else the snapshot's
// definition with runtime disks that follow it.
import t from 'tap'
import type { Snapshot } from '../../src/snapshot/model.ts'
import { definitionRestore } from '../../src/snapshot/revert-definition.ts'
import { parseSnapshotRow } from '../../src/store/snapshots.ts'
import { VmDefinition } from '../../src/vm/definition.ts'

const then = VmDefinition.parse({ name: 'v', memoryMiB: 32, disks: [{ id: 'vda', file: '/a' }, { id: 'vdb', file: '/b' }] })
const snap = (definition?: VmDefinition): Snapshot => ({
  vm: 'v',
  name: 's',
  kind: 'internal',
  memory: true,
  createdAt: '2026-01-01T00:00:00.000Z',
  vmState: 'running',
  disks: [
    { id: 'vda', mode: 'internal', file: '/a', format: 'qcow2' },
    { id: 'vdb', mode: 'internal', file: '/b', format: 'qcow2' },
  ],
  ...(definition ? { definition } : {}),
})
const active = [
  { id: 'vda', file: '/a', format: 'qcow2' as const, gen: 2 },
  { id: 'vdc', file: '/c', format: 'qcow2' as const, gen: 0 },
]

t.test('no change for a snapshot without a definition, or with the VM\'s own', async (t) => {
  t.equal(definitionRestore(then, active, snap()), undefined, 'rows written before definitions were recorded')
  t.equal(definitionRestore(then, active, snap(VmDefinition.parse(JSON.parse(JSON.stringify(then))))), undefined, 'an equal definition, parsed again')
})

t.test('the snapshot\'s definition, a removed disk back from its captured file, an added one left behind', async (t) => {
  const now = VmDefinition.parse({ name: 'v', memoryMiB: 64, disks: [{ id: 'vda', file: '/a' }, { id: 'vdc', file: '/c', sizeMiB: 8 }] })
  const r = definitionRestore(now, active, snap(then))
  t.ok(r)
  t.equal(r!.definition.memoryMiB, 32)
  t.same(r!.disks, [
    { id: 'vda', file: '/a', format: 'qcow2', gen: 2 },
    { id: 'vdb', file: '/b', format: 'qcow2', gen: 0 },
  ])
  t.same(r!.leftBehind, ['vdc'], 'vdc is not cleaned up: its file stays')
})

t.test('a stored row from before definitions were recorded still loads; a recorded one loads with it', async (t) => {
  const row = (s: Snapshot) => ({ vm: 'v', name: 's', body: JSON.stringify(s), created_at: s.createdAt })
  t.equal(parseSnapshotRow(row(snap())).definition, undefined)
  t.same(parseSnapshotRow(row(snap(then))).definition, then)
  t.throws(() => parseSnapshotRow(row({ ...snap(), definition: { name: 'v', memoryMiB: 'x' } } as unknown as Snapshot)), 'a broken definition fails the row (the store quarantines it)')
})
