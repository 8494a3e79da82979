// Labels of VMs (no QEMU needed): validation, ?label= filters on the paged list, and labels kept
// across a daemon restart as part of the stored definition.
import t from 'tap'
import { startTestDaemon } from '../helpers/daemon.ts'

const names = (res: { body: { vms: Array<{ name: string }> } }) => res.body.vms.map((v) => v.name)

t.test('labels are validated, shown, filtered (AND, has-key, paged) and survive a restart', async (t) => {
  const dir = t.testdir()
  const a = await startTestDaemon(t, { stateDir: dir })
  const bad: Array<[string, unknown]> = [
    ['key with a space', { 'a b': 'x' }],
    ['key too long', { ['k'.repeat(64)]: 'x' }],
    ['empty key', { '': 'x' }],
    ['value too long', { k: 'v'.repeat(64) }],
    ['value not a string', { k: 1 }],
    ['65 labels', Object.fromEntries(Array.from({ length: 65 }, (_, i) => [`k${i}`, 'v']))],
  ]
  for (const [what, labels] of bad) {
    const res = await a.api('POST', '/v1/vms', { name: 'bad', labels })
    t.equal(res.status, 400, what)
    t.equal(res.body.error.code, 'INVALID_INPUT', what)
    t.match(res.body.error.message, /labels/, what)
  }
  t.equal((await a.api('GET', '/v1/vms/bad')).status, 404, 'refused definitions stored nothing')
  const max = Object.fromEntries(Array.from({ length: 64 }, (_, i) => [`k${i}`, 'v'.repeat(63)]))
  t.equal((await a.api('POST', '/v1/vms', { name: 'max', labels: max })).status, 201, '64 labels of 63 characters are fine')
  for (const [name, labels] of [
    ['a1', { 'nomad/job': 'web', 'nomad/alloc': '1' }],
    ['a2', { 'nomad/job': 'web', 'nomad/alloc': '2' }],
    ['b1', { 'nomad/job': 'db', 'nomad/alloc': '1' }],
    ['plain', undefined],
  ] as const) {
    const res = await a.api('POST', '/v1/vms', { name, ...(labels ? { labels } : {}) })
    t.equal(res.status, 201, name)
    if (labels) t.same(res.body.definition.labels, labels, `${name}: labels shown in the answer`)
  }
  const check = async (td: typeof a, when: string) => {
    t.same(names(await td.api('GET', '/v1/vms?label=nomad/job=web')), ['a1', 'a2'], `${when}: key=value`)
    t.same(names(await td.api('GET', '/v1/vms?label=nomad/job=web&label=nomad/alloc=2')), ['a2'], `${when}: repeated = AND`)
    t.same(names(await td.api('GET', '/v1/vms?label=nomad/alloc')), ['a1', 'a2', 'b1'], `${when}: has key`)
    t.same(names(await td.api('GET', '/v1/vms?label=nomad/job=nope')), [], `${when}: no match`)
    t.same(names(await td.api('GET', '/v1/vms?label=k0')), ['max'], `${when}: has key k0`)
    const p1 = await td.api('GET', '/v1/vms?label=nomad/alloc&limit=2')
    t.same(names(p1), ['a1', 'a2'], `${when}: first page of the filtered list`)
    t.equal(p1.body.next, 'a2')
    const p2 = await td.api('GET', `/v1/vms?label=nomad/alloc&limit=2&after=${p1.body.next}`)
    t.same(names(p2), ['b1'], `${when}: second page`)
    t.notOk(p2.body.next, `${when}: no third page`)
    t.same((await td.api('GET', '/v1/vms/a2')).body.definition.labels, { 'nomad/job': 'web', 'nomad/alloc': '2' }, `${when}: GET shows the labels`)
  }
  await check(a, 'before restart')
  const badSel = await a.api('GET', '/v1/vms?label=' + encodeURIComponent('bad key=x'))
  t.equal(badSel.status, 400)
  t.equal(badSel.body.error.code, 'INVALID_INPUT')
  await a.close()
  const b = await startTestDaemon(t, { stateDir: dir })
  await check(b, 'after restart')
})
