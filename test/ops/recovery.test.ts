// The crash-recovery dispatcher and the operation journal on their own: an in-memory store, rules
// that are plain functions, no QEMU.
import pino from 'pino'
import t from 'tap'
import { Journal } from '../../src/ops/journal.ts'
import { Recovery, type RecoveryOutcome } from '../../src/ops/recovery.ts'
import { openDb } from '../../src/store/db.ts'
import { JournalRepo, type JournalEntry } from '../../src/store/journal.ts'

const log = pino({ level: 'silent' })

function setup() {
  const repo = new JournalRepo(openDb(':memory:'))
  const notes: Array<{ job: string; outcome: RecoveryOutcome }> = []
  const recovery = new Recovery(repo, log, (job, outcome) => notes.push({ job, outcome }))
  return { repo, recovery, notes, journal: new Journal(repo) }
}

t.test('each pending entry goes to its rule; a success removes it and notes the job', async (t) => {
  const { repo, recovery, notes } = setup()
  repo.add({ id: 'e1', vm: 'a', op: 'op-a', job: 'j1', body: { n: 1 } })
  repo.add({ id: 'e2', vm: 'b', op: 'op-b', body: { n: 2 } })
  const seen: JournalEntry[] = []
  recovery.register('op-a', async (e) => (seen.push(e), { action: 'forward', detail: 'finished', result: { ok: true } }))
  recovery.register('op-b', async (e) => (seen.push(e), { action: 'back', detail: 'undone' }))
  t.same(recovery.ops().sort(), ['op-a', 'op-b'])
  const report = await recovery.run()
  t.same(seen.map((e) => [e.id, e.body]), [['e1', { n: 1 }], ['e2', { n: 2 }]], 'rules get the entry with its parsed body, oldest first')
  t.same(report.map((r) => r.outcome?.action), ['forward', 'back'])
  t.same(repo.pending(), [], 'both entries are gone')
  t.same(notes, [{ job: 'j1', outcome: { action: 'forward', detail: 'finished', result: { ok: true } } }], 'only the entry with a job notes one')
})

t.test('an entry whose rule throws stays for the next start; one without a rule too', async (t) => {
  const { repo, recovery, notes } = setup()
  repo.add({ id: 'bad', vm: 'a', op: 'op-a', job: 'j1', body: {} })
  repo.add({ id: 'orphan', vm: 'a', op: 'unknown-op', body: {} })
  recovery.register('op-a', async () => {
    throw new Error('QEMU says no')
  })
  const report = await recovery.run()
  t.match(report, [{ entry: { id: 'bad' }, error: { message: 'QEMU says no' } }, { entry: { id: 'orphan' }, error: { message: /no recovery rule for unknown-op/ } }])
  t.same(repo.pending().map((e) => e.id), ['bad', 'orphan'], 'both stay in the journal')
  t.same(notes, [], 'no job is noted')
})

t.test('a rule is registered once per operation', async (t) => {
  const { recovery } = setup()
  recovery.register('x', async () => ({ action: 'back', detail: '' }))
  t.throws(() => recovery.register('x', async () => ({ action: 'back', detail: '' })), /registered twice/)
})

t.test('the journal records an operation, each step it reaches, and forgets it when it ends', async (t) => {
  const { repo, journal } = setup()
  const o = journal.begin({ vm: 'a', op: 'snapshot-create', job: 'j9', body: { plan: 1 } })
  t.match(repo.pending(), [{ id: o.id, vm: 'a', op: 'snapshot-create', job: 'j9', body: { plan: 1 } }])
  t.notOk('step' in repo.pending()[0]!, 'no step before the first one')
  t.equal(o.pointName('stop', 'after'), 'snapshot-create.stop.after')
  t.equal(await o.step('stop', () => 42), 42, 'a step returns what it ran')
  t.equal(repo.pending()[0]!.step, 'stop')
  await o.step('transaction', async () => undefined, { body: { plan: 2 } })
  t.match(repo.pending()[0], { step: 'transaction', body: { plan: 2 } }, 'a step may record a new body')
  await o.point('migrating')
  await t.rejects(o.step('boom', () => Promise.reject(new Error('step failed'))), /step failed/)
  t.equal(repo.pending()[0]!.step, 'boom', 'a failed step stays recorded')
  repo.tx(() => o.end())
  t.same(repo.pending(), [], 'ended: forgotten')
  await t.rejects(o.step('late', () => 1), /already ended/)
})

t.test('an entry begun withFirstStep is written by its first step, in the same statement', async (t) => {
  const { repo, journal } = setup()
  const o = journal.begin({ vm: 'a', op: 'snapshot-create', job: 'j1', body: { plan: 1 }, withFirstStep: true })
  t.same(repo.pending(), [], 'nothing written at begin')
  let seen: JournalEntry[] = []
  await o.step('reserve', () => {
    seen = repo.pending()
  })
  t.match(seen, [{ id: o.id, vm: 'a', op: 'snapshot-create', job: 'j1', step: 'reserve', body: { plan: 1 } }], 'the entry and its first step exist when the step runs')
  await o.step('transaction', () => undefined)
  t.equal(repo.pending()[0]!.step, 'transaction', 'later steps update it')
  repo.tx(() => o.end())
  t.same(repo.pending(), [])
  const never = journal.begin({ vm: 'a', op: 'x', body: null, withFirstStep: true })
  never.end()
  t.same(repo.pending(), [], 'ended before any step: nothing was ever written')
  const first = journal.begin({ vm: 'a', op: 'x', body: { v: 1 }, withFirstStep: true })
  await first.step('s', () => undefined, { body: { v: 2 } })
  t.match(repo.pending()[0], { step: 's', body: { v: 2 } }, "the first step's own body is the one written")
})

t.test('commitStep records the step inside its transaction: both happen or neither', async (t) => {
  const { repo, journal } = setup()
  const o = journal.begin({ vm: 'a', op: 'snapshot-create', body: null })
  await o.step('transaction', () => undefined)
  await t.rejects(
    o.commitStep('commit', () => {
      t.equal(repo.pending()[0]!.step, 'commit', 'recorded before the metadata is written')
      throw new Error('metadata refused')
    }),
    /metadata refused/,
  )
  t.equal(repo.pending()[0]!.step, 'transaction', 'rolled back with the transaction')
  t.equal(await o.commitStep('commit', () => (o.end(), 7)), 7, 'returns what it ran')
  t.same(repo.pending(), [], 'the entry ended in the same transaction')
  await t.rejects(o.commitStep('again', () => 1), /already ended/)
})

t.test('pending() filters by VM; deleteAllFor forgets a VM', async (t) => {
  const { repo } = setup()
  repo.add({ id: '1', vm: 'a', op: 'x', body: null })
  repo.add({ id: '2', vm: 'b', op: 'x', body: null })
  t.same(repo.pending('b').map((e) => e.id), ['2'])
  repo.deleteAllFor('a')
  t.same(repo.pending().map((e) => e.id), ['2'])
  repo.setStep('2', 's')
  t.equal(repo.pending()[0]!.step, 's')
  t.throws(() => repo.tx(() => {
    repo.done('2')
    throw new Error('rollback')
  }))
  t.same(repo.pending().map((e) => e.id), ['2'], 'a rolled-back end keeps the entry')
})
