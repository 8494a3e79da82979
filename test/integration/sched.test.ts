// What a scheduler's driver reads, against real QEMU under TCG: /wait across a stop, a kill -9 and
// daemon restarts; /stats as the boot-sector guest writes; a retried snapshot request (same
// Idempotency-Key) taking one snapshot; /v1/host against what this machine has.
import { execFileSync } from 'node:child_process'
import { readFileSync, statfsSync } from 'node:fs'
import t from 'tap'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

t.test('wait answers at once, across a stop, across a kill -9 (SIGKILL), and times out with timedOut', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'w')
  const now = await td.api('GET', '/v1/vms/w/wait?state=shutoff&timeoutSec=5')
  t.equal(now.status, 200)
  t.match(now.body, { state: 'shutoff', timedOut: false, exit: null }, 'already shutoff: at once, never exited')
  const bad = await td.api('GET', '/v1/vms/w/wait?state=sleeping')
  t.equal(bad.status, 400, 'an unknown state is 400')
  t.equal((await td.api('GET', '/v1/vms/nope/wait?state=shutoff')).status, 404)

  const running = td.api('GET', '/v1/vms/w/wait?state=running&timeoutSec=60')
  await op(td, 'w', 'start')
  t.match((await running).body, { state: 'running', timedOut: false }, 'a wait for running answered by the start')

  const t0 = Date.now()
  const short = await td.api('GET', '/v1/vms/w/wait?state=shutoff&timeoutSec=1')
  t.match(short.body, { state: 'running', timedOut: true }, 'timeout: 200 with timedOut and the state now')
  t.ok(Date.now() - t0 >= 900, `waited the timeout (${Date.now() - t0} ms)`)

  const stopped = td.api('GET', '/v1/vms/w/wait?state=shutoff,crashed&timeoutSec=60')
  await op(td, 'w', 'stop', { force: true })
  const s = (await stopped).body
  t.match(s, { state: 'shutoff', timedOut: false }, 'stop force: shutoff')
  t.ok(s.exit && typeof s.exit.at === 'string', 'with the exit record')
  t.ok(Date.parse(s.exit.at) >= t0, 'of this exit')

  await op(td, 'w', 'start')
  const pid = (await td.api('GET', '/v1/vms/w')).body.pid as number
  t.ok(pid > 0)
  const crash = td.api('GET', '/v1/vms/w/wait?state=crashed&timeoutSec=60')
  await new Promise((r) => setTimeout(r, 200)) // the wait is in place before the kill
  const killedAt = Date.now()
  process.kill(pid, 'SIGKILL')
  const c = (await crash).body
  t.match(c, { state: 'crashed', timedOut: false, exit: { code: null, signal: 'SIGKILL' } }, 'kill -9: crashed by SIGKILL')
  t.match(c.reason, /SIGKILL/)
  t.ok(Date.parse(c.exit.at) >= killedAt - 1000, 'exit.at is the time of the kill')
})

t.test('a daemon restart in the middle of a wait: the poll is answered, the client re-polls the next daemon', async (t) => {
  const stateDir = t.testdir()
  const a = await startTestDaemon(t, { stateDir })
  await defineGuestVm(a, 'r')
  await op(a, 'r', 'start')
  const pid = (await a.api('GET', '/v1/vms/r')).body.pid as number
  const pending = a.api('GET', '/v1/vms/r/wait?state=shutoff,crashed&timeoutSec=600')
  await new Promise((r) => setTimeout(r, 200))
  const t0 = Date.now()
  await a.close()
  const cut = await pending
  t.equal(cut.status, 200)
  t.match(cut.body, { state: 'running', timedOut: true }, 'the closing daemon answers the poll instead of holding its close')
  t.ok(Date.now() - t0 < 15_000, `close was not held by the 600 s poll (${Date.now() - t0} ms)`)

  const b = await startTestDaemon(t, { stateDir })
  const repoll = b.api('GET', '/v1/vms/r/wait?state=shutoff,crashed&timeoutSec=60')
  await new Promise((r) => setTimeout(r, 200))
  t.ok((await guestCounters(b, 'r')).counter > 0, 'the guest ran on, re-attached')
  await op(b, 'r', 'stop', { force: true })
  const after = (await repoll).body
  t.match(after, { state: 'shutoff', timedOut: false }, 're-poll on the new daemon: answered by the stop')
  t.ok(after.exit?.at, 'with an exit record')
  t.equal((await b.api('GET', '/v1/vms/r')).body.pid, undefined)
  t.ok(pid > 0)

  // QEMU killed while no daemon runs: the next daemon's answer says so, with an exit record.
  await op(b, 'r', 'start')
  const pid2 = (await b.api('GET', '/v1/vms/r')).body.pid as number
  await b.close()
  const killedAt = Date.now()
  process.kill(pid2, 'SIGKILL')
  t.ok(await eventually(() => {
    try {
      process.kill(pid2, 0)
      return false
    } catch {
      return true
    }
  }), 'QEMU is gone')
  const c = await startTestDaemon(t, { stateDir })
  const late = (await c.api('GET', '/v1/vms/r/wait?state=shutoff,crashed&timeoutSec=10')).body
  t.equal(late.timedOut, false, 'answered at once')
  t.match(late, { reason: 'QEMU exited while qmpd was not running' }, 'the reason says when it died')
  t.ok(Date.parse(late.exit.at) >= killedAt, 'the exit record was rebuilt at re-attach (not the previous exit)')
})

t.test('stats change as the guest writes; a stopped VM answers space and nulls', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 's', { disks: 2 })
  const off = await td.api('GET', '/v1/vms/s/stats')
  t.equal(off.status, 200)
  t.match(off.body, { vm: 's', state: 'shutoff', cpuSeconds: null, rssBytes: null, disks: null, net: null, downtime: { totalMs: 0, count: 0 }, snapshotSpace: { bytes: 0, files: [] } })
  await op(td, 's', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 's')).counter > 5, 30_000))
  const s1 = (await td.api('GET', '/v1/vms/s/stats')).body
  t.same(s1.disks.map((d: { disk: string }) => d.disk).sort(), ['vda', 'vdb'], 'one entry per guest disk')
  t.same(s1.net, [], 'no NICs yet: an empty list')
  t.ok(s1.rssBytes > 16 * 1024 * 1024, `RSS ${s1.rssBytes} bytes`)
  const c1 = (await guestCounters(td, 's')).counter
  t.ok(await eventually(async () => (await guestCounters(td, 's')).counter > c1 + 20, 30_000), 'the guest wrote on')
  const s2 = (await td.api('GET', '/v1/vms/s/stats')).body
  for (const id of ['vda', 'vdb']) {
    const d1 = s1.disks.find((d: { disk: string }) => d.disk === id)
    const d2 = s2.disks.find((d: { disk: string }) => d.disk === id)
    t.ok(d2.wrOps >= d1.wrOps + 20, `${id}: write ops ${d1.wrOps} -> ${d2.wrOps}`)
    t.ok(d2.wrBytes >= d1.wrBytes + 20 * 512, `${id}: written bytes ${d1.wrBytes} -> ${d2.wrBytes}`)
  }
  t.ok(s2.cpuSeconds > s1.cpuSeconds, `CPU time ${s1.cpuSeconds} -> ${s2.cpuSeconds} s`)
  // Compare with /proc directly (utime + stime in ticks of 100 Hz), read right before and after.
  const pid = (await td.api('GET', '/v1/vms/s')).body.pid as number
  const procCpu = (): number => {
    const f = readFileSync(`/proc/${pid}/stat`, 'latin1')
    const fields = f.slice(f.lastIndexOf(')') + 2).split(' ')
    return (Number(fields[11]) + Number(fields[12])) / 100
  }
  const before = procCpu()
  const between = (await td.api('GET', '/v1/vms/s/stats')).body.cpuSeconds as number
  const after = procCpu()
  t.ok(between >= before - 0.011 && between <= after + 0.011, `/proc said ${before} s, then stats ${between} s, then /proc ${after} s`)

  // A snapshot with memory: its RAM state file and overlays count as snapshot space, its pause as downtime.
  const snap = await op(td, 's', 'snapshots', { name: 'm1', kind: 'external', memory: true })
  const downtimeMs = (snap.result as { downtimeMs: number }).downtimeMs
  const s3 = (await td.api('GET', '/v1/vms/s/stats')).body
  t.equal(s3.downtime.count, 1)
  t.equal(s3.downtime.totalMs, downtimeMs, `downtime ${downtimeMs} ms, from the job`)
  t.ok(s3.snapshotSpace.files.length >= 3, `files: ${s3.snapshotSpace.files.map((x: { file: string }) => x.file.split('/').pop()).join(', ')}`)
  t.ok(s3.snapshotSpace.bytes > 32 * 1024, `snapshot space ${s3.snapshotSpace.bytes} bytes`)
  t.equal(s3.snapshotSpace.bytes, s3.snapshotSpace.files.reduce((a: number, x: { bytes: number }) => a + x.bytes, 0))
  await op(td, 's', 'stop', { force: true })
  const s4 = (await td.api('GET', '/v1/vms/s/stats')).body
  t.match(s4, { cpuSeconds: null, disks: null, downtime: { count: 1 } }, 'stopped: nulls, downtime kept')
  t.equal(s4.snapshotSpace.files.length, s3.snapshotSpace.files.length, 'stopped: space still counted')
})

t.test('a retried snapshot request with one Idempotency-Key takes one snapshot', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'i')
  const key = { 'idempotency-key': 'snap-retry-1' }
  const startKey = { 'idempotency-key': 'start-1' }
  const st1 = await td.api('POST', '/v1/vms/i/start?wait=true&timeoutSec=120', {}, startKey)
  t.equal(st1.status, 200)
  const st2 = await td.api('POST', '/v1/vms/i/start?wait=true&timeoutSec=120', {}, startKey)
  t.equal(st2.status, 200, 'a retried start is the first start, not 409 "already running"')
  t.equal(st2.body.id, st1.body.id)
  const body = { name: 'once', kind: 'external', memory: false }
  const answers = await Promise.all(Array.from({ length: 5 }, () => td.api('POST', '/v1/vms/i/snapshots', body, key)))
  t.same(answers.map((a) => a.status), Array(5).fill(202))
  const ids = new Set(answers.map((a) => a.body.id))
  t.equal(ids.size, 1, 'five concurrent retries: one job')
  t.same(new Set(answers.map((a) => a.headers['location'])).size, 1, 'one Location')
  const done = await td.api('POST', '/v1/vms/i/snapshots?wait=true&timeoutSec=120', body, key)
  t.equal(done.status, 200, 'a retry with ?wait=true waits for that same job')
  t.equal(done.body.id, [...ids][0])
  t.equal(done.body.state, 'succeeded')
  const snaps = (await td.api('GET', '/v1/vms/i/snapshots')).body.snapshots
  t.same(snaps.map((s: { name: string }) => s.name), ['once'], 'one snapshot')
  const jobs = (await td.api('GET', '/v1/jobs?vm=i')).body
  const list = (Array.isArray(jobs) ? jobs : jobs.jobs) as Array<{ op: string }>
  t.equal(list.filter((j) => j.op.startsWith('snapshot')).length, 1, 'one snapshot job in the history')
  const other = await td.api('POST', '/v1/vms/i/snapshots', { ...body, name: 'twice' }, key)
  t.equal(other.status, 409)
  t.equal(other.body.error.code, 'IDEMPOTENCY_KEY_REUSED')
  await op(td, 'i', 'stop', { force: true })
})

t.test('the host fingerprint matches this machine', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'h1')
  const t0 = performance.now()
  const res = await td.api('GET', '/v1/host')
  const coldMs = performance.now() - t0
  t.equal(res.status, 200, JSON.stringify(res.body).slice(0, 300))
  const h = res.body
  const line = execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).split('\n')[0]!.trim()
  t.equal(h.qemu.versionLine, line)
  t.equal(h.qemu.version, /version (\d+\.\d+\.\d+)/.exec(line)![1])
  t.equal(`${h.qemu.qmpVersion.major}.${h.qemu.qmpVersion.minor}.${h.qemu.qmpVersion.micro}`, h.qemu.version, 'the probe QEMU reports the same version')
  t.equal(h.qemu.commands['blockdev-snapshot'], true)
  t.equal(h.qemu.commands['query-blockstats'], true)
  t.ok(h.qemu.migrationCapabilities.includes('background-snapshot'), 'background-snapshot (QEMU >= 6.0)')
  if (h.qemu.qmpVersion.major < 9) t.notOk(h.qemu.migrationCapabilities.includes('mapped-ram'), 'no mapped-ram before QEMU 9.0')
  t.equal(h.qemu.capabilities['background-snapshot'], true, 'the capability summary says so too')
  t.equal(h.qemu.capabilities['mapped-ram'], h.qemu.migrationCapabilities.includes('mapped-ram'), 'the summary agrees with the capability list')
  t.equal(h.qemu.capabilities['snapshot-access'], true, 'blockdev driver snapshot-access (QEMU >= 7.0)')
  t.match(h.accel, { configured: 'tcg', resolved: 'tcg' })
  t.ok(h.accel.usable.includes('tcg'))
  const fs = statfsSync(td.stateDir)
  const free = fs.bavail * fs.bsize
  t.ok(Math.abs(h.storage.stateDir.freeBytes - free) <= free * 0.03, `free ${h.storage.stateDir.freeBytes} within 3% of statfs ${free}`)
  t.equal(h.storage.stateDir.totalBytes, fs.blocks * fs.bsize)
  t.same(h.vmCounts, { total: 1, byState: { shutoff: 1 } })
  t.equal(h.qmpd.version, (await td.api('GET', '/healthz')).body.version)
  t.ok(h.qmpd.uptimeSec >= 0)
  const t1 = performance.now()
  const warm = (await td.api('GET', '/v1/host')).body
  const warmMs = performance.now() - t1
  t.equal(warm.qemu.probedAt, h.qemu.probedAt, 'the probe is cached')
  t.comment(`warm answer in ${warmMs.toFixed(1)} ms (cold: ${coldMs.toFixed(0)} ms)`)
})
