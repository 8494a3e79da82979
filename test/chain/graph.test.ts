// The image graph on its own: which files are still needed, and which qmpd may delete. An
// in-memory store and files in the test directory; no QEMU.
import { existsSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import pino from 'pino'
import t from 'tap'
import { ensureBaseImages, formatOf, imageRow, neededFiles, removeGarbage, removeIfUnneeded, trackChain, type GraphDeps } from '../../src/chain/graph.ts'
import { openDb } from '../../src/store/db.ts'
import { SnapshotRepo } from '../../src/store/snapshots.ts'
import type { VmRecord } from '../../src/store/vms.ts'
import type { VmRuntime } from '../../src/vm/definition.ts'

const log = pino({ level: 'silent' })

/** A VM whose disk vda runs on `active`, with the given files created by qmpd. */
function setup(dir: string, active: string, createdFiles: string[] = []) {
  const repo = new SnapshotRepo(openDb(':memory:'))
  const rec = {
    name: 'a',
    definition: { name: 'a', machine: 'q35', cpus: 1, memoryMiB: 64, disks: [{ id: 'vda', file: join(dir, 'base.qcow2'), format: 'qcow2' }], serialLog: true, guestAgent: false },
    runtime: { state: 'shutoff', qmpSocket: '/x', disks: [{ id: 'vda', file: active }], createdFiles } as unknown as VmRuntime,
    createdAt: '',
    updatedAt: '',
  } as unknown as VmRecord
  const vms: GraphDeps['vms'] = {
    record: () => rec,
    updateRuntime: (_vm: string, patch: Partial<VmRuntime>) => (rec.runtime = { ...rec.runtime, ...patch }),
  }
  return { g: { vms, repo } satisfies GraphDeps, rec, repo }
}

const file = (dir: string, name: string) => {
  const f = join(dir, name)
  writeFileSync(f, '')
  return f
}

const snapshotOn = (name: string, f: string, mode = 'external') => ({
  vm: 'a',
  name,
  kind: 'external' as const,
  memory: false,
  createdAt: `2026-01-01T00:00:0${name.length}Z`,
  vmState: 'shutoff' as const,
  disks: [{ id: 'vda', mode, file: f, format: 'qcow2' }],
})

t.test('ensureBaseImages records the definition disks once, as not created by qmpd', async (t) => {
  const dir = t.testdir()
  const { g, repo } = setup(dir, join(dir, 'base.qcow2'))
  ensureBaseImages(g, 'a')
  ensureBaseImages(g, 'a')
  t.same(repo.images('a'), [{ vm: 'a', disk: 'vda', file: join(dir, 'base.qcow2'), format: 'qcow2', backing: null, createdByQmpd: false }])
})

t.test('neededFiles follows the backing chain down from the active layer and every snapshot', async (t) => {
  const dir = t.testdir()
  const [base, s1, s2, top, stray] = ['base', 's1', 's2', 'top', 'stray'].map((n) => join(dir, `${n}.qcow2`)) as [string, string, string, string, string]
  const { g, repo } = setup(dir, top)
  trackChain(g, 'a', 'vda', [
    { file: top, format: 'qcow2' },
    { file: s1, format: 'qcow2' },
    { file: base, format: 'qcow2' },
  ])
  repo.putImage({ vm: 'a', disk: 'vda', file: s2, format: 'qcow2', backing: s1, createdByQmpd: true })
  repo.putImage({ vm: 'a', disk: 'vda', file: stray, format: 'raw', backing: null, createdByQmpd: true })
  t.same([...neededFiles(g, 'a')].sort(), [base, s1, top].sort(), 'the active chain only')
  repo.put(snapshotOn('x', s2) as never)
  t.same([...neededFiles(g, 'a')].sort(), [base, s1, s2, top].sort(), 'a snapshot on s2 needs s2 and below')
  repo.put(snapshotOn('yy', stray, 'excluded') as never)
  t.notOk(neededFiles(g, 'a').has(stray), 'an excluded disk of a snapshot needs nothing')
  t.equal(formatOf(repo.images('a'), stray), 'raw')
  t.equal(formatOf(repo.images('a'), join(dir, 'unknown')), 'qcow2', 'a file the graph does not know counts as qcow2')
  t.same(imageRow(g, 'a', 'vda', { file: join(dir, 'new.img'), format: 'raw' }), { vm: 'a', disk: 'vda', file: join(dir, 'new.img'), format: 'raw', backing: null, createdByQmpd: false })
})

t.test('a cycle in the stored graph does not hang neededFiles', async (t) => {
  const dir = t.testdir()
  const [x, y] = [join(dir, 'x'), join(dir, 'y')]
  const { g, repo } = setup(dir, x)
  repo.putImage({ vm: 'a', disk: 'vda', file: x, format: 'qcow2', backing: y, createdByQmpd: true })
  repo.putImage({ vm: 'a', disk: 'vda', file: y, format: 'qcow2', backing: x, createdByQmpd: true })
  t.same([...neededFiles(g, 'a')].sort(), [x, y].sort())
})

t.test('removeIfUnneeded deletes only an unneeded file qmpd created that nothing is layered on', async (t) => {
  const dir = t.testdir()
  const base = file(dir, 'base.qcow2')
  const mid = file(dir, 'mid.qcow2')
  const top = file(dir, 'top.qcow2')
  const user = file(dir, 'user.qcow2')
  const { g, repo } = setup(dir, base)
  repo.putImage({ vm: 'a', disk: 'vda', file: base, format: 'qcow2', backing: null, createdByQmpd: false })
  repo.putImage({ vm: 'a', disk: 'vda', file: mid, format: 'qcow2', backing: base, createdByQmpd: true })
  repo.putImage({ vm: 'a', disk: 'vda', file: top, format: 'qcow2', backing: mid, createdByQmpd: true })
  repo.putImage({ vm: 'a', disk: 'vda', file: user, format: 'qcow2', backing: null, createdByQmpd: false })
  t.notOk(removeIfUnneeded(g, 'a', base, { log }), 'the active layer stays')
  t.notOk(removeIfUnneeded(g, 'a', user, { log }), 'a file qmpd did not create stays')
  t.notOk(removeIfUnneeded(g, 'a', mid, { log }), 'a file another image is layered on stays')
  t.notOk(removeIfUnneeded(g, 'a', join(dir, 'unknown'), { log }), 'a file the graph does not know stays')
  t.ok(existsSync(mid))
  t.ok(removeIfUnneeded(g, 'a', top, { log }), 'an unneeded top goes')
  t.notOk(existsSync(top))
  t.notOk(repo.images('a').some((i) => i.file === top), 'and its row')
})

t.test('removeGarbage removes a dropped chain top first, and leaves what is needed', async (t) => {
  const dir = t.testdir()
  const base = file(dir, 'base.qcow2')
  const mid = file(dir, 'mid.qcow2')
  const top = file(dir, 'top.qcow2')
  const kept = file(dir, 'kept.qcow2')
  const { g, repo } = setup(dir, base)
  repo.putImage({ vm: 'a', disk: 'vda', file: base, format: 'qcow2', backing: null, createdByQmpd: false })
  repo.putImage({ vm: 'a', disk: 'vda', file: mid, format: 'qcow2', backing: base, createdByQmpd: true })
  repo.putImage({ vm: 'a', disk: 'vda', file: top, format: 'qcow2', backing: mid, createdByQmpd: true })
  repo.putImage({ vm: 'a', disk: 'vda', file: kept, format: 'qcow2', backing: base, createdByQmpd: true })
  repo.put(snapshotOn('s', kept) as never)
  t.same(removeGarbage(g, 'a', { log }).sort(), [mid, top].sort())
  t.same(repo.images('a').map((i) => i.file).sort(), [base, kept].sort())
  t.ok(existsSync(kept) && existsSync(base))
})

t.test('images() refuses a row that does not fit the schema', async (t) => {
  const { repo } = setup(t.testdir(), '/x')
  repo.db.prepare("INSERT INTO images (vm, disk, file, format, backing, created_by_qmpd) VALUES ('a', 'vda', '/f', 'vmdk', NULL, 0)").run()
  t.throws(() => repo.images('a'), /format/)
})
