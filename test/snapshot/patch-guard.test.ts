// PATCH may not put a disk on an image snapshots hold, nor change the firmware under snapshots.
import t from 'tap'
import { openDb } from '../../src/store/db.ts'
import { SnapshotRepo } from '../../src/store/snapshots.ts'
import { VmRepo } from '../../src/store/vms.ts'
import { assertPatchKeepsSnapshots } from '../../src/snapshot/patch-guard.ts'
import { VmDefinition } from '../../src/vm/definition.ts'

const def = VmDefinition.parse({ name: 'v', disks: [{ id: 'vda', file: '/s/a.qcow2' }] })

function store(): SnapshotRepo {
  const db = openDb(':memory:')
  new VmRepo(db).insert({ name: 'v', definition: def, runtime: { state: 'shutoff', qmpSocket: '/s/q', disks: [{ id: 'vda', file: '/s/a.1.qcow2', format: 'qcow2', gen: 1 }], createdFiles: [] } })
  return new SnapshotRepo(db)
}

t.test('no snapshots: anything goes', async (t) => {
  const repo = store()
  t.doesNotThrow(() => assertPatchKeepsSnapshots(repo, 'v', def, { ...def, firmware: 'uefi' }, [{ id: 'vda', file: '/s/a.qcow2', format: 'qcow2', gen: 2 }]))
})

t.test('an external snapshot froze /s/a.qcow2: a disk put back on it, or a firmware change, is refused', async (t) => {
  const repo = store()
  repo.put({ vm: 'v', name: 'e1', kind: 'external', memory: false, createdAt: '2026-01-01T00:00:00.000Z', vmState: 'shutoff', disks: [{ id: 'vda', mode: 'external', file: '/s/a.qcow2', format: 'qcow2', overlay: '/s/a.1.qcow2' }] } as never)
  repo.putImage({ vm: 'v', disk: 'vda', file: '/s/a.1.qcow2', format: 'qcow2', backing: '/s/a.qcow2', createdByQmpd: true })
  t.throws(() => assertPatchKeepsSnapshots(repo, 'v', def, def, [{ id: 'vdb', file: '/s/a.qcow2', format: 'qcow2', gen: 0 }]), { code: 'INVALID_STATE', message: /snapshots of VM v hold/ })
  t.throws(() => assertPatchKeepsSnapshots(repo, 'v', def, { ...def, firmware: 'uefi' }, []), { code: 'INVALID_STATE', message: /firmware/ })
  t.doesNotThrow(() => assertPatchKeepsSnapshots(repo, 'v', def, { ...def, memoryMiB: 256 }, [{ id: 'vdb', file: '/s/b.qcow2', format: 'qcow2', gen: 0 }]), 'a new file is fine')
  repo.put({ vm: 'v', name: 'e2', kind: 'external', memory: false, createdAt: '2026-01-02T00:00:00.000Z', vmState: 'shutoff', disks: [{ id: 'vda', mode: 'external', file: '/s/a.1.qcow2', format: 'qcow2', overlay: '/s/a.2.qcow2' }, { id: 'scratch', mode: 'excluded', file: '/s/scratch.raw', format: 'raw' }] } as never)
  t.doesNotThrow(() => assertPatchKeepsSnapshots(repo, 'v', def, def, [{ id: 'tmp', file: '/s/scratch.raw', format: 'raw', gen: 0 }]), 'an excluded disk\'s file is live, not frozen')
})
