// A daemon SIGKILLed while it stores a keyed define (fail points inside and right after the
// transaction that writes the VM row and its Idempotency-Key): the retry on the next daemon
// gets one VM, created anew or replayed, never a wedged key or a second VM. No QEMU needed.
import t from 'tap'
import { startChildDaemon } from '../helpers/crash.ts'
import { startTestDaemon } from '../helpers/daemon.ts'

for (const [point, replayed] of [
  ['idempotency.key.before', false],
  ['idempotency.key.after', true],
] as const) {
  t.test(`killed at ${point}: the retry answers one VM (${replayed ? 'replayed' : 'created anew'})`, async (t) => {
    const stateDir = t.testdir()
    const body = { name: 'crashy', memoryMiB: 32, labels: { 'nomad/task-id': 'a1b2/web/c3d4' } }
    const key = { 'idempotency-key': 'a1b2/web/c3d4:define' }
    const child = await startChildDaemon(t, stateDir, { point })
    const died = await child.api('POST', '/v1/vms', body, key).then(
      (r) => `answered ${r.status}`,
      () => 'no answer',
    )
    t.equal(died, 'no answer', 'the daemon died before it answered')
    t.match(await child.ended(10_000), { signal: 'SIGKILL' }, `killed at ${point}`)

    const td = await startTestDaemon(t, { stateDir })
    const before = (await td.api('GET', '/v1/vms')).body.vms.map((v: { name: string }) => v.name)
    t.same(before, replayed ? ['crashy'] : [], replayed ? 'the VM row committed with its key' : 'nothing committed: no VM row')
    const retry = await td.api('POST', '/v1/vms', body, key)
    t.equal(retry.status, 201, 'the retry is answered 201, not VM_EXISTS or a wedged key')
    t.equal(retry.headers['idempotent-replayed'], replayed ? 'true' : undefined, replayed ? 'the key was stored: a replay' : 'no key was stored: created now')
    const again = await td.api('POST', '/v1/vms', body, key)
    t.equal(again.status, 201)
    t.equal(again.headers['idempotent-replayed'], 'true', 'from now on the key replays')
    t.same((await td.api('GET', '/v1/vms')).body.vms.map((v: { name: string }) => v.name), ['crashy'], 'one VM')
    t.same((await td.api('GET', '/v1/vms/crashy')).body.definition.labels, body.labels)
  })
}
