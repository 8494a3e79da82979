import { isAbsolute, join } from 'node:path'
import t from 'tap'
import { CreateSnapshotBody, type Snapshot } from '../../src/snapshot/model.ts'
import { planCreate, type PlanFacts } from '../../src/snapshot/plan.ts'
import { VmDefinition, type VmState } from '../../src/vm/definition.ts'

const DIR = '/srv/qmpd/vms/web'

/** Facts of a VM "web" with a qcow2 disk vda and a raw disk vdb; every file given in `files` exists. */
function facts(over: Partial<PlanFacts> & { files?: string[]; guestAgent?: boolean } = {}): PlanFacts {
  const files = new Set(over.files ?? [`${DIR}/vda.qcow2`, `${DIR}/vdb.raw`])
  const definition = VmDefinition.parse({
    name: 'web',
    guestAgent: over.guestAgent ?? false,
    disks: [
      { id: 'vda', file: `${DIR}/vda.qcow2`, format: 'qcow2' },
      { id: 'vdb', file: `${DIR}/vdb.raw`, format: 'raw' },
    ],
  })
  return {
    vm: 'web',
    state: 'running',
    definition,
    runtime: {
      disks: [
        { id: 'vda', file: `${DIR}/vda.qcow2`, format: 'qcow2', gen: 0 },
        { id: 'vdb', file: `${DIR}/vdb.raw`, format: 'raw', gen: 0 },
      ],
    },
    existing: [],
    vmDir: DIR,
    resolve: (input, dir) => (isAbsolute(input) ? input : join(dir, input)),
    exists: (f) => files.has(f),
    now: () => new Date('2024-05-01T00:00:00Z'),
    ...over,
  }
}

const body = (b: Record<string, unknown>) => CreateSnapshotBody.parse(b)

t.test('plans an external checkpoint of a running VM: an overlay per disk and a RAM state file', async (t) => {
  const p = planCreate(facts({ runtime: { ...facts().runtime, currentSnapshot: 'base' } }), body({ name: 's1', kind: 'external' }))
  t.same(p.overlays, [
    { id: 'vda', file: `${DIR}/vda.qcow2`, format: 'qcow2', overlay: `${DIR}/vda-s1.qcow2` },
    { id: 'vdb', file: `${DIR}/vdb.raw`, format: 'raw', overlay: `${DIR}/vdb-s1.qcow2` },
  ])
  t.match(p.snapshot, { vm: 'web', name: 's1', kind: 'external', memory: true, parent: 'base', vmState: 'running', vmstateFile: `${DIR}/s1.vmstate`, createdAt: '2024-05-01T00:00:00.000Z' })
  t.same(p.snapshot.disks.map((d) => d.mode), ['external', 'external'])
})

t.test('plans an internal disk-only snapshot of a shut-off VM with the raw disk excluded', async (t) => {
  const p = planCreate(facts({ state: 'shutoff' }), body({ name: 's1', disks: { vdb: { exclude: true } } }))
  t.same(p.overlays, [])
  t.equal(p.snapshot.memory, false, 'memory defaults to off when no QEMU runs')
  t.equal(p.snapshot.vmState, 'shutoff')
  t.same(p.snapshot.disks.map((d) => [d.id, d.mode]), [['vda', 'internal'], ['vdb', 'excluded']])
  t.notOk('vmstateDisk' in p.snapshot)
})

t.test('an internal checkpoint keeps its RAM in the first captured disk', async (t) => {
  const p = planCreate(facts({ state: 'paused' }), body({ name: 'c', disks: { vdb: { exclude: true } } }))
  t.equal(p.snapshot.vmstateDisk, 'vda')
  t.equal(p.snapshot.vmState, 'paused')
})

t.test('refuses the states the table does not accept, naming the operation', async (t) => {
  for (const state of ['starting', 'stopping', 'unknown', 'saved'] as VmState[]) {
    t.throws(() => planCreate(facts({ state }), body({ name: 's' })), { code: 'INVALID_STATE', message: new RegExp(`^cannot snapshot-create VM web while it is ${state}`) }, state)
  }
  t.throws(() => planCreate(facts({ state: 'shutoff' }), body({ name: 's', memory: true })), {
    code: 'INVALID_STATE',
    message: 'cannot snapshot-create-memory VM web while it is shutoff (needs running or paused)',
  })
})

t.test('refuses requests that do not fit together', async (t) => {
  const f = facts()
  t.throws(() => planCreate(f, body({ name: 's', kind: 'internal', live: true })), { code: 'INVALID_INPUT', message: /^live applies only/ })
  t.throws(() => planCreate(f, body({ name: 's', kind: 'internal', vmstateFile: 'x' })), { code: 'INVALID_INPUT', message: /^vmstateFile applies only/ })
  t.throws(() => planCreate(f, body({ name: 's', kind: 'internal' })), { code: 'INVALID_STATE', message: /disk vdb is raw: internal snapshots need qcow2/ })
  t.throws(() => planCreate(f, body({ name: 's', kind: 'external', disks: { vda: { exclude: true, file: 'o.qcow2' } } })), { message: /file and exclude cannot go together/ })
  t.throws(() => planCreate(f, body({ name: 's', kind: 'external', disks: { vda: { file: 'o.qcow2' }, vdb: { file: 'o.qcow2' } } })), { message: /two disks cannot share the overlay/ })
  t.throws(() => planCreate(facts({ state: 'shutoff' }), body({ name: 's', kind: 'external', disks: { vda: { exclude: true }, vdb: { exclude: true } } })), {
    code: 'INVALID_INPUT',
    message: /^every disk is excluded/,
  })
})

t.test('quiesce needs a guest agent, a running guest and a disk-only snapshot', async (t) => {
  t.throws(() => planCreate(facts(), body({ name: 's', kind: 'external', memory: false, quiesce: true })), { message: /has no guest agent/ })
  t.throws(() => planCreate(facts({ guestAgent: true, state: 'paused' }), body({ name: 's', kind: 'external', memory: false, quiesce: true })), {
    code: 'INVALID_STATE',
    message: /^cannot snapshot-create-quiesce VM web while it is paused \(needs running\): a stopped guest agent/,
  })
  t.throws(() => planCreate(facts({ guestAgent: true }), body({ name: 's', kind: 'external', quiesce: true })), { code: 'INVALID_INPUT', message: /^quiesce applies to disk-only/ })
  const p = planCreate(facts({ guestAgent: true }), body({ name: 's', kind: 'external', memory: false, quiesce: true }))
  t.equal(p.snapshot.quiesced, true)
})

t.test('never plans over an existing file, nor snapshots a disk not yet created', async (t) => {
  t.throws(() => planCreate(facts({ files: [`${DIR}/vda.qcow2`, `${DIR}/vdb.raw`, `${DIR}/vda-s.qcow2`] }), body({ name: 's', kind: 'external' })), { code: 'FILE_EXISTS' })
  t.throws(() => planCreate(facts({ files: [`${DIR}/vda.qcow2`, `${DIR}/vdb.raw`, `${DIR}/s.vmstate`] }), body({ name: 's', kind: 'external' })), { code: 'FILE_EXISTS' })
  const other = { name: 'old', kind: 'internal' } as Snapshot
  t.equal(planCreate(facts({ existing: [other] }), body({ name: 's', kind: 'external' })).snapshot.kind, 'external', 'kinds mix on one VM')
  t.throws(() => planCreate(facts({ state: 'shutoff', files: [] }), body({ name: 's', kind: 'external' })), { code: 'INVALID_STATE', message: /does not exist yet/ })
})
