// unpinClones: the names a keep rule refuses leave every snapshot's clone pins; nothing else changes.
import t from 'tap'
import { openDb } from '../../src/store/db.ts'
import { SnapshotRepo } from '../../src/store/snapshots.ts'
import { unpinClones } from '../../src/snapshot/clone-pins.ts'

function ext(vm: string, name: string, clones?: string[]): never {
  return { vm, name, kind: 'external', memory: false, createdAt: `2026-01-0${name.at(-1)}T00:00:00.000Z`, vmState: 'shutoff', disks: [{ id: 'vda', mode: 'external', file: `/s/${vm}.${name}.qcow2`, format: 'qcow2', overlay: `/s/${vm}.${name}.o.qcow2` }], ...(clones ? { clones } : {}) } as never
}

t.test('a deleted clone is unpinned everywhere; other pins and snapshots stay as they were', async (t) => {
  const repo = new SnapshotRepo(openDb(':memory:'))
  repo.put(ext('a', 's1', ['c1', 'c2']))
  repo.put(ext('a', 's2', ['c1']))
  repo.put(ext('b', 's1', ['c3']))
  repo.put(ext('b', 's2'))
  const changed = unpinClones(repo, ['a', 'b'], (c) => c !== 'c1')
  t.same(changed, [{ vm: 'a', snapshot: 's1', removed: ['c1'] }, { vm: 'a', snapshot: 's2', removed: ['c1'] }])
  t.same(repo.get('a', 's1')?.clones, ['c2'])
  t.equal(repo.get('a', 's2')?.clones, undefined, 'an emptied pin list is dropped')
  t.same(repo.get('b', 's1')?.clones, ['c3'], 'another VM\'s pins stay')
  t.same(repo.get('a', 's1')?.disks, (ext('a', 's1') as { disks: unknown }).disks, 'the rest of the record is unchanged')
  t.same(unpinClones(repo, ['a', 'b'], (c) => c !== 'c1'), [], 'a second pass changes nothing')
})

t.test('start-up prune: names of VMs that are gone leave, existing ones stay', async (t) => {
  const repo = new SnapshotRepo(openDb(':memory:'))
  repo.put(ext('a', 's1', ['gone', 'here']))
  const exists = new Set(['a', 'here'])
  t.same(unpinClones(repo, ['a'], (c) => exists.has(c)), [{ vm: 'a', snapshot: 's1', removed: ['gone'] }])
  t.same(repo.get('a', 's1')?.clones, ['here'])
})
