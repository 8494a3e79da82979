import { pino } from 'pino'
import t from 'tap'
import { EventBus } from '../../src/events/bus.ts'
import { QmpCommandError } from '../../src/errors.ts'
import { JobManager } from '../../src/jobs/manager.ts'
import { openDb } from '../../src/store/db.ts'
import { JobRepo } from '../../src/store/jobs.ts'

function setup(file = ':memory:') {
  const db = openDb(file)
  const bus = new EventBus()
  const jobs = new JobManager(new JobRepo(db), bus, pino({ level: 'silent' }))
  return { db, bus, jobs }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

t.test('runs one VM\'s jobs in submission order, one at a time', async (t) => {
  const { jobs } = setup()
  const log: string[] = []
  let running = 0
  let maxRunning = 0
  const ids = [1, 2, 3, 4].map((n) =>
    jobs.submit({
      vm: 'a',
      op: `op${n}`,
      params: {},
      run: async () => {
        running++
        maxRunning = Math.max(maxRunning, running)
        log.push(`start${n}`)
        await sleep(20 - n * 4)
        log.push(`end${n}`)
        running--
        return n
      },
    }).id,
  )
  const done = await Promise.all(ids.map((id) => jobs.wait(id, 5000)))
  t.same(log, ['start1', 'end1', 'start2', 'end2', 'start3', 'end3', 'start4', 'end4'])
  t.equal(maxRunning, 1)
  t.same(done.map((j) => j.result), [1, 2, 3, 4])
  t.ok(done.every((j) => j.state === 'succeeded'))
})

t.test('different VMs run in parallel', async (t) => {
  const { jobs } = setup()
  let concurrent = 0
  let peak = 0
  const run = async () => {
    concurrent++
    peak = Math.max(peak, concurrent)
    await sleep(50)
    concurrent--
  }
  const a = jobs.submit({ vm: 'a', op: 'x', params: {}, run })
  const b = jobs.submit({ vm: 'b', op: 'x', params: {}, run })
  await Promise.all([jobs.wait(a.id, 5000), jobs.wait(b.id, 5000)])
  t.equal(peak, 2, 'both VMs\' jobs ran at the same time')
})

t.test('a queued job can be cancelled and never runs; a running one only when it allows it', async (t) => {
  const { jobs } = setup()
  let release!: () => void
  const gate = new Promise<void>((r) => (release = r))
  let secondRan = false
  const first = jobs.submit({ vm: 'a', op: 'slow', params: {}, run: () => gate })
  const second = jobs.submit({ vm: 'a', op: 'never', params: {}, run: async () => void (secondRan = true) })
  await sleep(5)
  t.equal(jobs.get(first.id)?.state, 'running')
  t.throws(() => jobs.cancel(first.id), { code: 'INVALID_STATE' }, 'running non-cancellable job refuses')
  const c = jobs.cancel(second.id)
  t.equal(c.state, 'cancelled')
  release()
  await jobs.wait(first.id, 5000)
  await jobs.drain()
  t.notOk(secondRan, 'the cancelled job never ran')
  t.equal(jobs.get(second.id)?.state, 'cancelled')
  t.throws(() => jobs.cancel(second.id), { code: 'INVALID_STATE' }, 'cancelling a finished job is refused')
  t.throws(() => jobs.cancel('00000000-0000-4000-8000-000000000000'), { code: 'JOB_NOT_FOUND' })

  const abortable = jobs.submit({
    vm: 'b',
    op: 'abortable',
    params: {},
    cancellableWhileRunning: true,
    run: (ctx) => new Promise((_, reject) => ctx.signal.addEventListener('abort', () => reject(ctx.signal.reason))),
  })
  await sleep(5)
  jobs.cancel(abortable.id)
  const ended = await jobs.wait(abortable.id, 5000)
  t.equal(ended.state, 'cancelled')
})

t.test('a failing job stores code, message and QEMU\'s error class', async (t) => {
  const { jobs } = setup()
  const j = jobs.submit({
    vm: 'a',
    op: 'boom',
    params: { x: 1 },
    run: async () => {
      throw new QmpCommandError('block-commit', 'GenericError', 'Node is busy')
    },
  })
  const done = await jobs.wait(j.id, 5000)
  t.equal(done.state, 'failed')
  t.equal(done.error?.code, 'QMP_COMMAND_FAILED')
  t.equal(done.error?.qmpClass, 'GenericError')
  t.match(done.error?.message, /Node is busy/)
})

t.test('progress is visible while running and history survives a restart; unfinished jobs become INTERRUPTED', async (t) => {
  const file = `${t.testdir()}/q.db`
  const { db, jobs } = setup(file)
  let release!: () => void
  const gate = new Promise<void>((r) => (release = r))
  const j = jobs.submit({
    vm: 'a',
    op: 'long',
    params: {},
    run: async (ctx) => {
      ctx.setProgress(5, 10)
      await gate
    },
  })
  await sleep(5)
  t.same(jobs.get(j.id)?.progress, { current: 5, total: 10 })
  const queued = jobs.submit({ vm: 'a', op: 'later', params: {}, run: async () => {} })
  // Simulate a daemon that dies here: reopen the same store with a new manager.
  const second = setup(file)
  const recovered = second.jobs.recoverInterrupted()
  t.same(recovered.map((r) => r.id).sort(), [j.id, queued.id].sort())
  const after = second.jobs.get(j.id)
  t.equal(after?.state, 'failed')
  t.equal(after?.error?.code, 'INTERRUPTED')
  release()
  await jobs.drain()
  db.close()
  second.db.close()
})

t.test('QEMU refusing a job control because the job moved on is 409 INVALID_STATE, not 502', async (t) => {
  // The fuzz test met this with real QEMU: POST /v1/jobs/{id}/resume while qmpd still showed the
  // job paused and QEMU no longer did ("Can't resume a job that was not paused").
  const { jobs } = setup()
  let release!: () => void
  const job = jobs.submit({
    vm: 'a',
    op: 'mirror',
    params: {},
    run: async (ctx) => {
      ctx.setControls({
        resume: () => Promise.reject(new QmpCommandError('job-resume', 'GenericError', 'Can\'t resume a job that was not paused')),
      })
      ctx.setPhase('paused')
      await new Promise<void>((r) => (release = r))
    },
  })
  while (jobs.get(job.id)?.state !== 'paused') await sleep(5)
  const refused = await jobs.control(job.id, 'resume').catch((e: unknown) => e)
  t.match(refused, { code: 'INVALID_STATE', data: { job: job.id, qmpClass: 'GenericError' } })
  t.match((refused as Error).message, /QEMU says: Can't resume a job that was not paused/)
  release()
  await jobs.wait(job.id, 5000)
})
