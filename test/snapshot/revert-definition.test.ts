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

t.test('labels are not the machine: a label-only difference restores nothing, and a revert keeps the labels the VM has now', async (t) => {
  const labelled = VmDefinition.parse({ ...JSON.parse(JSON.stringify(then)), labels: { owner: 'sched' } })
  t.equal(definitionRestore(labelled, active, snap(then)), undefined, 'no relaunch for a label change')
  const now = VmDefinition.parse({ ...JSON.parse(JSON.stringify(then)), memoryMiB: 64, labels: { owner: 'sched' } })
  const r = definitionRestore(now, active, snap(VmDefinition.parse({ ...JSON.parse(JSON.stringify(then)), labels: { owner: 'old' } })))
  t.equal(r!.definition.memoryMiB, 32)
  t.same(r!.definition.labels, { owner: 'sched' })
})

t.test('a UEFI VM keeps its NVRAM through a revert to another definition', async (t) => {
  const uefi = VmDefinition.parse({ name: 'v', memoryMiB: 32, firmware: 'uefi', disks: [{ id: 'vda', file: '/a' }] })
  const s: Snapshot = { ...snap(uefi), disks: [{ id: 'vda', mode: 'internal', file: '/a', format: 'qcow2' }, { id: 'nvram', mode: 'internal', file: '/nv', format: 'qcow2' }] }
  const live = [{ id: 'vda', file: '/a', format: 'qcow2' as const, gen: 1 }, { id: 'nvram', file: '/nv', format: 'qcow2' as const, gen: 3 }]
  const r = definitionRestore({ ...uefi, memoryMiB: 64 }, live, s)
  t.same(r!.disks, live, 'both disks keep their active layers')
  t.same(r!.leftBehind, [])
  const ext: Snapshot = { ...s, kind: 'external', disks: [{ id: 'vda', mode: 'external', file: '/a', format: 'qcow2' }, { id: 'nvram', mode: 'external', file: '/nv', format: 'qcow2' }] }
  const back = definitionRestore({ ...uefi, memoryMiB: 64 }, live, ext)
  t.ok(back!.disks.some((d) => d.id === 'nvram'), 'the NVRAM is a runtime disk of the restored UEFI definition')
})
