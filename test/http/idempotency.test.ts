// Idempotency-Key on POST /v1/vms (no QEMU needed: a VM without disks is only stored): replays,
// concurrent retries, reuse with another body or route, keys that survive a restart and expire.
import t from 'tap'
import { startTestDaemon } from '../helpers/daemon.ts'
import { IDEMPOTENCY_TTL_MS } from '../../src/store/idempotency.ts'

const def = (name: string, memoryMiB = 32) => ({ name, memoryMiB, labels: { 'nomad/alloc': 'a1' } })

t.test('the same key and body answer the same VM; another body is 409 and changes nothing', async (t) => {
  const td = await startTestDaemon(t)
  const key = { 'idempotency-key': 'task-7f3a' }
  const first = await td.api('POST', '/v1/vms', def('web'), key)
  t.equal(first.status, 201)
  t.equal(first.headers['location'], '/v1/vms/web')
  t.notOk(first.headers['idempotent-replayed'], 'the first answer is no replay')
  const again = await td.api('POST', '/v1/vms', def('web'), key)
  t.equal(again.status, 201, 'a retry answers 201, not 409 VM_EXISTS')
  t.equal(again.headers['location'], '/v1/vms/web')
  t.equal(again.headers['idempotent-replayed'], 'true')
  t.equal(again.body.name, 'web')
  t.equal(again.body.createdAt, first.body.createdAt, 'the very VM the first request made')
  // The same body with its keys in another order is the same request.
  const reordered = await td.api('POST', '/v1/vms', { labels: { 'nomad/alloc': 'a1' }, memoryMiB: 32, name: 'web' }, key)
  t.equal(reordered.status, 201)
  const other = await td.api('POST', '/v1/vms', def('web', 64), key)
  t.equal(other.status, 409)
  t.equal(other.body.error.code, 'IDEMPOTENCY_KEY_REUSED')
  const otherName = await td.api('POST', '/v1/vms', def('db'), key)
  t.equal(otherName.status, 409)
  t.equal(otherName.body.error.code, 'IDEMPOTENCY_KEY_REUSED')
  const otherRoute = await td.api('POST', '/v1/vms/web/start', {}, key)
  t.equal(otherRoute.status, 409, 'a key is one request, whatever the route')
  t.equal(otherRoute.body.error.code, 'IDEMPOTENCY_KEY_REUSED')
  const list = (await td.api('GET', '/v1/vms')).body.vms
  t.same(list.map((v: { name: string }) => v.name), ['web'], 'one VM, as the first request defined it')
  t.equal(list[0].definition.memoryMiB, 32)
  t.equal(list[0].state, 'shutoff', 'the refused start did not run')
})

t.test('20 concurrent retries with one key make one VM and all answer it', async (t) => {
  const td = await startTestDaemon(t)
  const key = { 'idempotency-key': 'alloc-123/task-web' }
  const answers = await Promise.all(Array.from({ length: 20 }, () => td.api('POST', '/v1/vms', def('one'), key)))
  t.same(answers.map((a) => a.status), Array(20).fill(201), 'every retry answered 201')
  t.equal(answers.filter((a) => a.headers['idempotent-replayed'] === 'true').length, 19, 'one created it, 19 were replays')
  t.same(new Set(answers.map((a) => a.body.createdAt)).size, 1, 'one VM')
  t.equal((await td.api('GET', '/v1/vms')).body.vms.length, 1)
  // Without a key the same burst is one 201 and 19 VM_EXISTS: the key is what made them agree.
  const bare = await Promise.all(Array.from({ length: 20 }, () => td.api('POST', '/v1/vms', def('two'))))
  t.equal(bare.filter((a) => a.status === 201).length, 1)
  t.equal(bare.filter((a) => a.status === 409).length, 19)
})

t.test('a request that created nothing stores no key; bad keys are 400', async (t) => {
  const td = await startTestDaemon(t)
  t.equal((await td.api('POST', '/v1/vms', def('taken'))).status, 201)
  const key = { 'idempotency-key': 'k-1' }
  const refused = await td.api('POST', '/v1/vms', def('taken', 64), key)
  t.equal(refused.status, 409)
  t.equal(refused.body.error.code, 'VM_EXISTS', 'the refusal is the define\'s own')
  t.equal((await td.api('DELETE', '/v1/vms/taken')).status, 204)
  const retried = await td.api('POST', '/v1/vms', def('taken', 64), key)
  t.equal(retried.status, 201, 'the key was not wedged by the failed request')
  t.notOk(retried.headers['idempotent-replayed'])
  const bad = await td.api('POST', '/v1/vms', def('x'), { 'idempotency-key': 'a'.repeat(256) })
  t.equal(bad.status, 400)
  t.equal(bad.body.error.code, 'INVALID_INPUT')
  t.match(bad.body.error.message, /idempotency-key/)
  const spaced = await td.api('POST', '/v1/vms', def('x'), { 'idempotency-key': 'has space' })
  t.equal(spaced.status, 400)
  t.equal((await td.api('GET', '/v1/vms/x')).status, 404, 'refused keys changed nothing')
})

t.test('keys survive a daemon restart and expire after 24 h', async (t) => {
  const dir = t.testdir()
  const a = await startTestDaemon(t, { stateDir: dir })
  t.equal((await a.api('POST', '/v1/vms', def('keep'), { 'idempotency-key': 'restart-1' })).status, 201)
  await a.close()
  const b = await startTestDaemon(t, { stateDir: dir })
  const again = await b.api('POST', '/v1/vms', def('keep'), { 'idempotency-key': 'restart-1' })
  t.equal(again.status, 201)
  t.equal(again.headers['idempotent-replayed'], 'true', 'the new daemon answers the key from the store')
  const { IdempotencyRepo } = await import('../../src/store/idempotency.ts')
  const repo = new IdempotencyRepo(b.daemon.db)
  t.ok(repo.get('restart-1'), 'stored')
  t.ok(repo.get('restart-1', Date.now() + IDEMPOTENCY_TTL_MS - 60_000), 'still there just before 24 h')
  t.equal(repo.get('restart-1', Date.now() + IDEMPOTENCY_TTL_MS + 60_000), undefined, 'gone after 24 h')
  t.equal(repo.get('restart-1'), undefined, 'and deleted from the store')
})

t.test('a key sent twice in one request is 400, not ignored', async (t) => {
  const td = await startTestDaemon(t)
  const res = await td.app.inject({
    method: 'POST',
    url: '/v1/vms',
    headers: { 'content-type': 'application/json', 'idempotency-key': ['k1', 'k2'] },
    payload: JSON.stringify(def('dup')),
  })
  t.equal(res.statusCode, 400)
  t.equal(JSON.parse(res.body).error.code, 'INVALID_INPUT')
  t.equal((await td.api('GET', '/v1/vms/dup')).status, 404, 'nothing defined')
})

t.test('repair opts out: it answers its check report each time, never a replayed job', async (t) => {
  const td = await startTestDaemon(t)
  t.equal((await td.api('POST', '/v1/vms', def('fix'))).status, 201)
  const key = { 'idempotency-key': 'repair-1' }
  for (const n of [1, 2]) {
    const r = await td.api('POST', '/v1/vms/fix/repair', {}, key)
    t.equal(r.status, 200, `repair ${n}`)
    t.equal(r.headers['idempotent-replayed'], undefined, `repair ${n} is no replay`)
    t.type(r.body.problems, Array, `repair ${n} answers the check report`)
  }
})
