// PATCH's pure parts: RFC 7386 merge, the schema and name checks, and the runtime disks that follow.
import t from 'tap'
import { VmDefinition } from '../../src/vm/definition.ts'
import { mergePatch } from '../../src/vm/merge-patch.ts'
import { disksAfterPatch, patchedDefinition } from '../../src/vm/patch.ts'

const base = VmDefinition.parse({ name: 'web', memoryMiB: 64, kernel: '/k', append: 'console=ttyS0', disks: [{ id: 'vda', file: '/s/a.qcow2' }] })

t.test('merges as RFC 7386 appendix A says', async (t) => {
  // A few of the RFC's own examples.
  t.same(mergePatch({ a: 'b' }, { a: 'c' }), { a: 'c' })
  t.same(mergePatch({ a: 'b' }, { b: 'c' }), { a: 'b', b: 'c' })
  t.same(mergePatch({ a: 'b' }, { a: null }), {})
  t.same(mergePatch({ a: [{ b: 'c' }] }, { a: [1] }), { a: [1] })
  t.same(mergePatch({ a: { b: 'c' } }, { a: { b: 'd', c: null } }), { a: { b: 'd' } })
  t.same(mergePatch(['a', 'b'], ['c', 'd']), ['c', 'd'])
  t.same(mergePatch({ a: 'foo' }, 'bar'), 'bar')
  t.same(mergePatch({}, { a: { bb: { ccc: null } } }), { a: { bb: {} } })
  const target = { a: { b: 1 } }
  mergePatch(target, { a: { b: 2 } })
  t.same(target, { a: { b: 1 } }, 'the target is not modified')
})

t.test('a __proto__ member is data, not a prototype', async (t) => {
  const out = mergePatch({}, JSON.parse('{"__proto__": {"polluted": true}}')) as Record<string, unknown>
  t.equal(Object.getPrototypeOf(out), Object.prototype)
  t.same(Object.keys(out), ['__proto__'])
  t.throws(() => patchedDefinition(base, JSON.parse('{"__proto__": {"memoryMiB": 1}}')), { code: 'INVALID_INPUT' }, 'and the strict schema refuses it')
})

t.test('patches through the define schema: set, remove, defaults kept', async (t) => {
  const d = patchedDefinition(base, { memoryMiB: 256, append: null, cpus: 2 })
  t.equal(d.memoryMiB, 256)
  t.equal(d.cpus, 2)
  t.equal(d.append, undefined, 'null removed append')
  t.equal(d.kernel, '/k', 'untouched members stay')
  t.equal(d.disks[0]!.format, 'qcow2')
  t.same(patchedDefinition(base, {}), base, 'an empty patch changes nothing')
  t.same(patchedDefinition(base, { name: 'web' }), base, 'the same name is no change')
})

t.test('refuses with INVALID_INPUT what define would refuse, and renames', async (t) => {
  const bad: Array<[string, unknown]> = [
    ['memory too small', { memoryMiB: 1 }],
    ['memory not a number', { memoryMiB: 'lots' }],
    ['unknown member', { colour: 'red' }],
    ['duplicate disk ids', { disks: [{ id: 'vda', file: 'a' }, { id: 'vda', file: 'b' }] }],
    ['a .. segment', { disks: [{ id: 'vda', file: '../x' }] }],
    ['initrd without kernel', { kernel: null, initrd: '/i' }],
    ['removing a required member', { name: null }],
    ['a rename', { name: 'other' }],
    ['not an object', [1, 2]],
    ['null', null],
  ]
  for (const [what, patch] of bad) {
    t.throws(() => patchedDefinition(base, patch), { name: 'QmpdError', code: 'INVALID_INPUT' }, what)
  }
})

t.test('runtime disks: kept where id and file stay, fresh where new or changed, gone when removed', async (t) => {
  const before = VmDefinition.parse({ name: 'v', disks: [{ id: 'vda', file: '/a' }, { id: 'vdb', file: '/b' }, { id: 'vdc', file: '/c' }] })
  const active = [
    { id: 'vda', file: '/a-s1.qcow2', format: 'qcow2' as const, gen: 3 },
    { id: 'vdb', file: '/b', format: 'qcow2' as const, gen: 0 },
    { id: 'vdc', file: '/c', format: 'qcow2' as const, gen: 1 },
  ]
  const after = VmDefinition.parse({ name: 'v', disks: [{ id: 'vda', file: '/a' }, { id: 'vdc', file: '/c2', format: 'raw' }, { id: 'vdd', file: '/d', sizeMiB: 8 }] })
  t.same(disksAfterPatch(before, after, active), [
    { id: 'vda', file: '/a-s1.qcow2', format: 'qcow2', gen: 3 },
    { id: 'vdc', file: '/c2', format: 'raw', gen: 2 },
    { id: 'vdd', file: '/d', format: 'qcow2', gen: 0 },
  ])
})

t.test('a NIC named again without a MAC keeps the one it had; a new NIC gets none here (resolve assigns it)', async (t) => {
  const withNic = VmDefinition.parse({ ...base, nics: [{ id: 'net0', mac: '52:54:00:12:34:56', user: {} }] })
  const after = patchedDefinition(withNic, { nics: [{ id: 'net0', user: { hostfwd: [{ proto: 'tcp', hostPort: 8080, guestPort: 80 }] } }, { id: 'net1', user: {} }] })
  t.equal(after.nics![0]!.mac, '52:54:00:12:34:56')
  t.equal(after.nics![1]!.mac, undefined)
  const renamed = patchedDefinition(withNic, { nics: [{ id: 'lan', user: {} }] })
  t.equal(renamed.nics![0]!.mac, undefined, 'another id is another NIC')
})

t.test('vnc is replaced whole: a socket becomes a port without naming unix: null', async (t) => {
  const withVnc = VmDefinition.parse({ ...base, vnc: { unix: true } })
  t.same(patchedDefinition(withVnc, { vnc: { port: 5901 } }).vnc, { port: 5901 })
  t.equal(patchedDefinition(withVnc, { vnc: null }).vnc, undefined, 'null removes it')
})
