// Crash tests of the two journaled ways to make a VM from another's data: `vm-clone` (linked and
// full clones of an external disk snapshot, a fork of an internal checkpoint) and `vm-from-backup`.
// The `qmpd serve` child is SIGKILLed at a step's fail point; the next daemon must leave the new VM
// defined completely (disks readable and holding the source's instant, the linked clone's pin, the
// fork's own record) or not at all (no record, no file), and the source and its snapshot untouched.
// Short by default (the riskiest points); QMPD_CRASH_FULL=1 runs every step boundary.
import { execFile } from 'node:child_process'
import { existsSync, mkdirSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t, { type Test } from 'tap'
import { qemusUnder, reapQemusUnder, startChildDaemon } from '../helpers/crash.ts'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { diskBytes, snap } from '../helpers/snap.ts'

const FULL = process.env['QMPD_CRASH_FULL'] === '1'

t.before(() => {
  requireQemu(t)
})

/** What the source held before the crash: per disk of the new VM, the file it reads and its bytes. */
interface Setup {
  body: Record<string, unknown>
  /** The source's images the operation reads (frozen images, tagged images, backup files) and their bytes. */
  sources: Array<{ id: string; file: string; internal?: string; bytes: Buffer }>
}

interface Case {
  name: string
  op: 'vm-clone' | 'vm-from-backup'
  source: string
  clone: string
  steps: string[]
  risky: string[]
  /** The step whose `.after` makes the VM exist: from there on recovery rolls forward. */
  definedFrom: string
  setup(td: TestDaemon): Promise<Setup>
  /** Extra judgement of a VM that exists after the restart. */
  defined?(t: Test, td: TestDaemon, s: Setup): Promise<void>
}

async function advance(td: TestDaemon, vm: string, by: number): Promise<void> {
  const c = (await guestCounters(td, vm)).counter
  if (!(await eventually(async () => (await guestCounters(td, vm)).counter > c + by, 60_000))) throw new Error(`${vm}: the guest does not write`)
}

async function imageCheck(file: string): Promise<string> {
  try {
    await promisify(execFile)('qemu-img', ['check', '-U', file])
    return 'ok'
  } catch (err) {
    return String((err as { stdout?: string }).stdout ?? err)
  }
}

async function externalSnapshot(td: TestDaemon, vm: string): Promise<Setup['sources']> {
  await defineGuestVm(td, vm, { disks: 2 })
  await op(td, vm, 'start')
  await advance(td, vm, 20)
  const r = await snap(td, vm, { name: 's1', kind: 'external', memory: false })
  // The source runs on past the snapshot, so its active layer differs from what the clone must hold.
  await advance(td, vm, 20)
  const out: Setup['sources'] = []
  for (const d of r.snapshot.disks as Array<{ id: string; file: string }>) out.push({ id: d.id, file: d.file, bytes: await diskBytes(d.file) })
  return out
}

const linked: Case = {
  name: 'linked clone of an external snapshot',
  op: 'vm-clone',
  source: 'ls',
  clone: 'lc',
  steps: ['files', 'define', 'record', 'pin'],
  risky: ['vm-clone.files.after', 'vm-clone.define.after'],
  definedFrom: 'define',
  setup: async (td) => ({ body: { name: 'lc', clone: { vm: 'ls', snapshot: 's1', linked: true } }, sources: await externalSnapshot(td, 'ls') }),
  defined: async (t, td) => {
    t.ok(td.daemon.repos.snapshots.get('ls', 's1')?.clones?.includes('lc'), 'the source snapshot pins the linked clone')
    const del = await td.api('DELETE', '/v1/vms/ls/snapshots/s1?wait=true')
    t.equal(del.status, 409, 'so deleting it is refused')
  },
}

const full: Case = {
  ...linked,
  name: 'full clone of an external snapshot',
  source: 'fs',
  clone: 'fc',
  risky: ['vm-clone.files.after'],
  setup: async (td) => ({ body: { name: 'fc', clone: { vm: 'fs', snapshot: 's1', linked: false } }, sources: await externalSnapshot(td, 'fs') }),
  defined: async (t, td) => {
    t.notOk(td.daemon.repos.snapshots.get('fs', 's1')?.clones?.includes('fc'), 'a full clone pins nothing')
    for (const d of td.daemon.vms.record('fc').runtime.disks) {
      const info = JSON.parse((await promisify(execFile)('qemu-img', ['info', '-U', '--output=json', d.file])).stdout) as { 'backing-filename'?: string }
      t.notOk(info['backing-filename'], `full clone disk ${d.id} stands alone`)
    }
  },
}

const fork: Case = {
  name: 'fork of an internal checkpoint',
  op: 'vm-clone',
  source: 'ks',
  clone: 'kf',
  steps: ['files', 'define', 'record', 'pin'],
  risky: ['vm-clone.define.after'],
  definedFrom: 'define',
  setup: async (td) => {
    await defineGuestVm(td, 'ks', { disks: 2 })
    await op(td, 'ks', 'start')
    await advance(td, 'ks', 20)
    await snap(td, 'ks', { name: 'cp', kind: 'internal', memory: true })
    await advance(td, 'ks', 20)
    await op(td, 'ks', 'stop', { force: true })
    const sources: Setup['sources'] = []
    for (const d of td.daemon.vms.record('ks').runtime.disks) sources.push({ id: d.id, file: d.file, internal: 'cp', bytes: await diskBytes(d.file, { internal: 'cp' }) })
    return { body: { name: 'kf', clone: { vm: 'ks', snapshot: 'cp' } }, sources }
  },
  defined: async (t, td) => {
    const own = td.daemon.repos.snapshots.get('kf', 'cp')
    t.ok(own, 'the fork has the checkpoint as its own snapshot record')
    t.same(own?.disks.map((d) => d.file).sort(), td.daemon.vms.record('kf').runtime.disks.map((d) => d.file).sort(), 'whose disks are the fork\'s copies')
  },
}

const fromBackup: Case = {
  name: 'new VM from an incremental backup point',
  op: 'vm-from-backup',
  source: 'bs',
  clone: 'bn',
  steps: ['files', 'define'],
  risky: ['vm-from-backup.files.after', 'vm-from-backup.define.after'],
  definedFrom: 'define',
  setup: async (td) => {
    await defineGuestVm(td, 'bs', { disks: 2 })
    await op(td, 'bs', 'start')
    await advance(td, 'bs', 20)
    const dir = join(td.stateDir, 'vms', 'bs', 'backups')
    mkdirSync(dir)
    await op(td, 'bs', 'backups', { mode: 'full', dir })
    await advance(td, 'bs', 20)
    const inc = (await op(td, 'bs', 'backups', { mode: 'incremental', dir })).result as { point: { id: string; mode: string; disks: Array<{ id: string; file: string }> } }
    if (inc.point.mode !== 'incremental') throw new Error(`the second backup is ${inc.point.mode}`)
    const sources: Setup['sources'] = []
    // qemu-img reads through the point's chain: the bytes the new VM's disks must hold.
    for (const d of inc.point.disks) sources.push({ id: d.id, file: d.file, bytes: await diskBytes(d.file) })
    return { body: { name: 'bn', from: { backup: { vm: 'bs', id: inc.point.id } } }, sources }
  },
}

function pointsOf(c: Case): string[] {
  return FULL ? c.steps.flatMap((s) => [`${c.op}.${s}.before`, `${c.op}.${s}.after`]) : c.risky
}

/** True when a kill at `point` comes after the new VM was defined. */
function isDefinedAt(c: Case, point: string): boolean {
  const [, step, when] = point.split('.')
  const i = c.steps.indexOf(step!)
  const d = c.steps.indexOf(c.definedFrom)
  return i > d || (i === d && when === 'after')
}

async function trial(t: Test, c: Case, point: string): Promise<void> {
  const dir = t.testdir()
  t.teardown(() => reapQemusUnder(dir))
  const td1 = await startTestDaemon(t, { stateDir: dir })
  const s = await c.setup(td1)
  await td1.close()

  const t0 = performance.now()
  const child = await startChildDaemon(t, dir, { point })
  const answer = child.api('POST', '/v1/vms', s.body).catch((err: Error) => ({ status: 0, body: err.message }))
  const end = await child.ended(120_000)
  if (!t.equal(end?.signal, 'SIGKILL', `the daemon died at ${point}`)) {
    t.comment(JSON.stringify(await answer).slice(0, 2000))
    return
  }

  const td = await startTestDaemon(t, { stateDir: dir })
  await td.daemon.jobs.drain()
  const jobs = (await td.api('GET', `/v1/jobs?vm=${c.source}`)).body.jobs as Array<{ op: string; state: string; error?: { code: string } }>
  const job = jobs.find((j) => j.op === c.op)
  t.ok(job?.state === 'succeeded' || (job?.state === 'failed' && job.error?.code === 'INTERRUPTED'), `the ${c.op} job ended succeeded or INTERRUPTED (${job?.state} ${job?.error?.code ?? ''})`)

  // The source and what the operation read from it are untouched.
  for (const x of s.sources) {
    t.ok((await diskBytes(x.file, x.internal ? { internal: x.internal } : {})).equals(x.bytes), `source ${x.id} (${x.file.slice(dir.length)}${x.internal ? `@${x.internal}` : ''}) holds what it held before`)
    t.equal(await imageCheck(x.file), 'ok', `qemu-img check of source ${x.id} finds nothing`)
  }
  const srcCheck = await td.api('GET', `/v1/vms/${c.source}/check`)
  t.same(srcCheck.body?.problems ?? srcCheck.body, [], 'the source: store, QEMU and files agree')

  const vmDir = join(dir, 'vms', c.clone)
  const got = await td.api('GET', `/v1/vms/${c.clone}`)
  if (isDefinedAt(c, point)) {
    t.equal(got.status, 200, `killed after the define: ${c.clone} is kept`)
    if (got.status !== 200) return
    const disks = td.daemon.vms.record(c.clone).runtime.disks
    t.same(disks.map((d) => d.id), s.sources.map((x) => x.id), 'with every disk of the source')
    for (const d of disks) {
      const from = s.sources.find((x) => x.id === d.id)!
      t.ok(existsSync(d.file), `disk ${d.id} is present`)
      t.equal(await imageCheck(d.file), 'ok', `qemu-img check of disk ${d.id} finds nothing`)
      t.ok((await diskBytes(d.file, from.internal ? { internal: from.internal } : {})).equals(from.bytes), `disk ${d.id} holds the source's instant`)
    }
    const check = await td.api('GET', `/v1/vms/${c.clone}/check`)
    t.same(check.body?.problems ?? check.body, [], `${c.clone}: store, QEMU and files agree`)
    if (c.defined) await c.defined(t, td, s)
  } else {
    t.equal(got.status, 404, `killed before the define: there is no ${c.clone}`)
    t.same(existsSync(vmDir) ? readdirSync(vmDir) : [], [], 'and no file of it')
    // What recovery left does not stand in the way: the same request now makes the VM.
    const again = await td.api('POST', '/v1/vms', s.body)
    t.equal(again.status, 201, `the same request then defines ${c.clone} ${JSON.stringify(again.body?.error ?? '')}`)
    for (const d of again.status === 201 ? td.daemon.vms.record(c.clone).runtime.disks : []) {
      const from = s.sources.find((x) => x.id === d.id)!
      t.ok((await diskBytes(d.file, from.internal ? { internal: from.internal } : {})).equals(from.bytes), `and its disk ${d.id} holds the source's instant`)
    }
  }
  const recorded = td.daemon.vms.record(c.source).runtime.pid
  t.same(qemusUnder(dir).filter((p) => p !== recorded), [], 'no QEMU runs that the store does not know of')
  t.comment(`${point}: crash + restart + judgement ${Math.round(performance.now() - t0)} ms`)
}

for (const c of [linked, full, fork, fromBackup]) {
  t.test(c.name, async (t) => {
    for (const point of pointsOf(c)) await t.test(`daemon killed at ${point}`, (t) => trial(t, c, point))
  })
}
