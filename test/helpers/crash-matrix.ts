// The crash matrix (run by test/ops/crash-*.test.ts, one file per family of operations): every journaled operation is run once with every fail point traced, then once
// per point with the daemon SIGKILLed there (and once with the VM's QEMU killed there). A fresh
// daemon on the same state directory must then: serve, and have ended the job failed
// (INTERRUPTED) or succeeded; find store, QEMU and files in agreement (GET …/check); revert every
// snapshot that existed before byte-exact (disks from outside, RAM consistent with them), and the
// interrupted one exactly or not at all; leave no orphan QEMU. QMPD_CRASH_FULL=1 (npm run
// test:crash) runs every point of every operation; otherwise the riskiest points of each.
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import type { Test } from 'tap'
import type { FailAction } from '../../src/ops/failpoints.ts'
import { qemusUnder, reapQemusUnder, revertExact, snapshotRefs, startChildDaemon } from './crash.ts'
import type { Scenario } from './crash-scenarios.ts'
import { startTestDaemon, type TestDaemon } from './daemon.ts'
import { requireQemu } from './qemu.ts'

const FULL = process.env['QMPD_CRASH_FULL'] === '1'
const ONLY = process.env['QMPD_CRASH_ONLY']
/**
 * QMPD_CRASH_SAMPLE=N (not with FULL): at most N of a scenario's riskiest points get a daemon-kill
 * trial, spread over them (first and last first). The second pass of `npm test` (QEMU 10) uses it:
 * the journal and recovery are the same code on both QEMUs, so that pass tries each scenario at its
 * first, last (and middle) riskiest points, and the first with QEMU killed, to keep both passes
 * inside CI's time.
 */
const SAMPLE = Number(process.env['QMPD_CRASH_SAMPLE'] ?? 0)
if (!Number.isInteger(SAMPLE) || SAMPLE < 0) throw new Error(`QMPD_CRASH_SAMPLE must be a whole number >= 0, not ${process.env['QMPD_CRASH_SAMPLE']}`)

/** At most `n` of `points`, evenly spread, the first and the last among them; all when n is 0. */
export function spread<T>(points: T[], n: number): T[] {
  if (n <= 0 || points.length <= n) return points
  if (n === 1) return [points[0]!]
  const picks = new Set<number>()
  for (let i = 0; i < n; i++) picks.add(Math.round((i * (points.length - 1)) / (n - 1)))
  return [...picks].sort((a, b) => a - b).map((i) => points[i]!)
}

/** Runs the scenario's operation with every fail point traced; returns the points it passed. */
async function tracePoints(t: Test, sc: Scenario): Promise<string[]> {
  const dir = t.testdir()
  t.teardown(() => reapQemusUnder(dir))
  const td = await startTestDaemon(t, { stateDir: dir })
  const setup = await sc.setup(td)
  await td.close()
  const trace = join(dir, 'trace.txt')
  const child = await startChildDaemon(t, dir, { trace })
  const req = sc.request(setup)
  const res = await child.api(req.method, sc.jobOp ? withWait(req.path) : req.path, req.body)
  t.equal(res.status, sc.jobOp ? 200 : 204, `${sc.name} runs to the end without a crash: ${JSON.stringify(res.body?.error ?? res.body?.state)}`)
  const seen = readFileSync(trace, 'utf8').split('\n').filter((l) => l.startsWith(`${sc.op}.`))
  return [...new Set(seen)]
}

function withWait(path: string): string {
  return `${path}${path.includes('?') ? '&' : '?'}wait=true&timeoutSec=120`
}

/** One trial: crash at `point`, restart, judge. */
async function trial(t: Test, sc: Scenario, point: string, action: FailAction): Promise<void> {
  const dir = t.testdir()
  t.teardown(() => reapQemusUnder(dir))
  const td1 = await startTestDaemon(t, { stateDir: dir })
  const setup = await sc.setup(td1)
  const before = await snapshotRefs(td1, sc.vm)
  const qmpdFiles = sc.removesVm ? createdFiles(td1, sc.vm) : []
  await td1.close()

  const child = await startChildDaemon(t, dir, { point, action })
  const req = sc.request(setup)
  const answer = child.api(req.method, sc.jobOp ? withWait(req.path) : req.path, req.body).catch((err: Error) => ({ status: 0, body: err.message }))
  if (action === 'kill-daemon') {
    const end = await child.ended(90_000)
    if (!t.equal(end?.signal, 'SIGKILL', `the daemon died at ${point}`)) {
      t.comment(JSON.stringify(await answer).slice(0, 2000))
      return
    }
  } else {
    const res = await answer
    t.comment(`with QEMU killed at ${point}: ${res.status} ${String(JSON.stringify(res.body?.error ?? res.body?.state ?? res.body ?? '')).slice(0, 300)}`)
    child.child.kill('SIGTERM')
    await child.ended(20_000)
  }

  const td = await startTestDaemon(t, { stateDir: dir })
  await td.daemon.jobs.drain()
  if (sc.removesVm) {
    // Deleting a VM is rolled forward: once asked for, it happens, files and all.
    t.equal((await td.api('GET', `/v1/vms/${sc.vm}`)).status, 404, 'the VM is gone')
    t.same(qmpdFiles.filter((f) => existsSync(f)), [], 'and so is every file qmpd made for it')
    t.same(qemusUnder(dir), [], 'no QEMU runs')
    return
  }
  const jobs = (await td.api('GET', `/v1/jobs?vm=${sc.vm}`)).body.jobs as Array<{ op: string; state: string; error?: { code: string } }>
  const job = jobs.find((j) => j.op === sc.jobOp)
  t.ok(job, `the ${sc.jobOp} job is in the history`)
  if (action === 'kill-daemon') {
    t.ok(job?.state === 'succeeded' || (job?.state === 'failed' && job.error?.code === 'INTERRUPTED'), `the job ended succeeded or INTERRUPTED (${job?.state} ${job?.error?.code ?? ''})`)
  } else {
    t.ok(job?.state === 'succeeded' || job?.state === 'failed', `the job ended (${job?.state} ${job?.error?.code ?? ''})`)
  }
  const check = await td.api('GET', `/v1/vms/${sc.vm}/check`)
  t.equal(check.status, 200, 'check answers')
  t.same(check.body?.problems ?? check.body, [], 'store, QEMU and files agree')

  if (sc.after) await sc.after(t, td, setup)

  const now = await snapshotRefs(td, sc.vm)
  for (const ref of before) {
    const cur = now.find((s) => s.name === ref.name)
    if (!cur) {
      t.ok(sc.deletes === ref.name, `snapshot ${ref.name} still exists (or is the one being deleted)`)
      continue
    }
    for (const [id, bytes] of ref.disks) t.ok(cur.disks.get(id)?.equals(bytes), `snapshot ${ref.name}: disk ${id} holds what it held before the crash`)
  }
  for (const ref of [...before.filter((b) => now.some((n) => n.name === b.name)), ...now.filter((n) => !before.some((b) => b.name === n.name))]) {
    t.same(await revertExact(td, sc.vm, ref), [], `snapshot ${ref.name} reverts exactly`)
  }
  const recorded = td.daemon.vms.record(sc.vm).runtime.pid
  t.same(qemusUnder(dir).filter((p) => p !== recorded), [], 'no QEMU runs that the store does not know of')
}

/** Every file qmpd made for the VM: images it created, RAM state files, created files. */
function createdFiles(td: TestDaemon, vm: string): string[] {
  const rt = td.daemon.vms.record(vm).runtime
  const images = td.daemon.snapshots.repo.images(vm).filter((i) => i.createdByQmpd).map((i) => i.file)
  const states = td.daemon.snapshots.repo.list(vm).flatMap((s) => (s.vmstateFile ? [s.vmstateFile] : []))
  return [...new Set([...rt.createdFiles, ...images, ...states])]
}

const riskiest = (sc: Scenario, points: string[]): string[] => (FULL ? points : points.filter((p) => sc.risky.some((r) => p.startsWith(`${sc.op}.${r}`))))

/**
 * Runs the matrix of `scenarios` as subtests of `t`: QMPD_CRASH_FULL=1 (npm run test:crash) every
 * fail point, with the daemon and with QEMU killed at each; otherwise the scenario's riskiest
 * points with the daemon killed and the first of them with QEMU killed. QMPD_CRASH_ONLY=REGEX
 * narrows to the scenarios whose name matches.
 */
export function runMatrix(t: Test, scenarios: Scenario[]): void {
  t.before(() => {
    requireQemu(t)
  })
  for (const sc of scenarios) {
    if (ONLY && !new RegExp(ONLY).test(sc.name)) continue
    t.test(sc.name, async (t) => {
      const points = await tracePoints(t, sc)
      t.ok(points.length >= 2, `${sc.name} passes fail points (${points.join(', ')})`)
      for (const point of FULL ? riskiest(sc, points) : spread(riskiest(sc, points), SAMPLE)) {
        await t.test(`daemon killed at ${point}`, (t) => trial(t, sc, point, 'kill-daemon'))
      }
      // An operation on a VM that is off has no QEMU to kill.
      for (const point of sc.offline ? [] : FULL ? points : riskiest(sc, points).slice(0, 1)) {
        await t.test(`QEMU killed at ${point}`, (t) => trial(t, sc, point, 'kill-qemu'))
      }
    })
  }
}
