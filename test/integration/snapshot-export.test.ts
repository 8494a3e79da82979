// Snapshot export against real QEMU: a middle snapshot (external and internal) exported while the
// guest keeps writing equals that snapshot exactly; bad input changes nothing; a daemon killed
// mid-export leaves no half image under the final name.
import { execFile } from 'node:child_process'
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t, { type Test } from 'tap'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { startChildDaemon } from '../helpers/crash.ts'
import { checkDiskAgainstCounter } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { diskBytes, maxSlot, slotsOf, snap } from '../helpers/snap.ts'

const run = promisify(execFile)

t.before(() => {
  requireQemu(t)
})

async function runOn(t: Test, td: TestDaemon, vm: string, by = 40): Promise<void> {
  const c = (await guestCounters(td, vm)).counter
  t.ok(await eventually(async () => (await guestCounters(td, vm)).counter > c + by, 30_000), 'the guest ran on')
}

/** Exports with ?wait=true; returns the finished job (fails the test on another status). */
async function exportSnap(t: Test, td: TestDaemon, vm: string, name: string, body: Record<string, unknown>): Promise<any> {
  const res = await td.api('POST', `/v1/vms/${vm}/snapshots/${name}/export?wait=true&timeoutSec=120`, body)
  t.equal(res.status, 200, `export ${name} ${JSON.stringify(body)}: ${res.status === 200 ? 'ok' : JSON.stringify(res.body)}`)
  return res.body
}

/** Whether two images read the same guest-visible bytes (qemu-img compare; -U: `a` may be open in QEMU). */
async function sameImage(a: string[], b: string): Promise<boolean> {
  try {
    await run('qemu-img', ['compare', '-U', ...a, b])
    return true
  } catch {
    return false
  }
}

t.test('an exported middle external snapshot equals it while the guest writes on; qcow2 and raw', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'ee', { disks: 1 })
  await op(td, 'ee', 'start')
  const seen: Record<string, Buffer> = {}
  const frozen: Record<string, string> = {}
  for (const name of ['s1', 's2', 's3']) {
    await runOn(t, td, 'ee')
    const r = await snap(td, 'ee', { name, kind: 'external', memory: false })
    frozen[name] = r.snapshot.disks[0].file
    seen[name] = await diskBytes(frozen[name]!)
  }
  t.notSame(seen['s2'], seen['s3'], 's2 and s3 differ (the guest wrote in between)')
  const dir = join(td.stateDir, 'vms', 'ee')
  const t0 = Date.now()
  const job = await exportSnap(t, td, 'ee', 's2', { file: 'out-s2.qcow2' })
  const ms = Date.now() - t0
  t.equal((await td.api('GET', '/v1/vms/ee')).body.state, 'running', 'the VM ran on during the export')
  const out = join(dir, 'out-s2.qcow2')
  t.equal(job.result.file, out, 'a relative file lands in the VM directory')
  t.equal(job.result.forceShare, false, 'a frozen image is read under the normal locks')
  t.same(job.progress, { current: 100, total: 100 }, 'the job reports its progress to the end')
  t.comment(`external export of a 16 MiB disk took ${ms} ms`)
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', out])).stdout)
  t.equal(info.format, 'qcow2')
  t.notOk(info['backing-filename'], 'the export is standalone (its backing chain flattened)')
  t.same(await diskBytes(out), seen['s2'], 'the export reads exactly what s2 froze')
  t.ok(await sameImage([frozen['s2']!], out), 'qemu-img compare: the whole disk of s2 equals the export')
  t.notOk(await sameImage([frozen['s3']!], out), 'and differs from s3 (the comparison can fail)')

  const raw = await exportSnap(t, td, 'ee', 's2', { file: join(dir, 'out-s2.raw'), format: 'raw' })
  t.equal(raw.result.format, 'raw')
  t.same(readFileSync(join(dir, 'out-s2.raw')).subarray(0, seen['s2']!.length), seen['s2'], 'the raw export holds s2 byte for byte')
  t.equal(readFileSync(join(dir, 'out-s2.raw')).length, 16 * 1024 * 1024, 'the raw export has the virtual size')

  // Bad input: clear errors, nothing made, nothing overwritten.
  const before = readFileSync(out)
  const listing = readdirSync(dir).sort()
  const bad: Array<[string, unknown, number, RegExp]> = [
    ['s2', { file: 'out-s2.qcow2' }, 409, /exists/],
    ['s2', { file: '/etc/qmpd-export.qcow2' }, 400, /outside the allowed/],
    ['s2', { file: 'a/../b.qcow2' }, 400, /\.\./],
    ['s2', { file: 'x.qcow2', format: 'vmdk' }, 400, /format/],
    ['s2', { file: 'x.qcow2', disk: 'vdz' }, 404, /no disk vdz/],
    ['s2', { file: 'x.qcow2', bogus: 1 }, 400, /bogus/],
    ['nope', { file: 'x.qcow2' }, 404, /no snapshot nope/],
  ]
  for (const [name, body, status, msg] of bad) {
    const res = await td.api('POST', `/v1/vms/ee/snapshots/${name}/export?wait=true`, body)
    t.equal(res.status, status, `${name} ${JSON.stringify(body)} -> ${status}`)
    t.match(JSON.stringify(res.body.error), msg)
  }
  t.same(readdirSync(dir).sort(), listing, 'no file was made by a refused export')
  t.same(readFileSync(out), before, 'the existing export was not touched')
})

t.test('an exported middle internal snapshot equals the tag, exported live (-U) while the guest writes, and offline', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'ie', { disks: 1 })
  await op(td, 'ie', 'start')
  for (const name of ['i1', 'i2', 'i3']) {
    await runOn(t, td, 'ie')
    await snap(td, 'ie', { name, kind: 'internal', memory: false })
  }
  const dir = join(td.stateDir, 'vms', 'ie')
  const disk = td.daemon.vms.record('ie').runtime.disks[0]!.file
  // The guest writes its slots all through the exports: the active layer's clusters are copied
  // on write under the tag while qemu-img reads it. One export of 16 MiB is quick, so exports
  // run back to back until the guest has done 20 iterations (each writes a slot) meanwhile.
  const c0 = (await guestCounters(td, 'ie')).counter
  const lives: string[] = []
  const t0 = Date.now()
  while (lives.length < 60 && (lives.length < 2 || (await guestCounters(td, 'ie')).counter < c0 + 20)) {
    const file = `live-${lives.length}.qcow2`
    const res = await td.api('POST', `/v1/vms/ie/snapshots/i2/export?wait=true&timeoutSec=120`, { file })
    if (res.status !== 200 || res.body.result.forceShare !== true) {
      t.fail(`live export ${file}: ${JSON.stringify(res.body)}`)
      break
    }
    lives.push(join(dir, file))
  }
  const c1 = (await guestCounters(td, 'ie')).counter
  t.ok(c1 >= c0 + 20, `the guest wrote ${c1 - c0} iterations during ${lives.length} live exports (${Date.now() - t0} ms), each read with -U`)
  await runOn(t, td, 'ie')
  await op(td, 'ie', 'stop', { force: true })
  // Now nothing has the image open: the tag read offline, without -U, is the truth.
  const truth = await diskBytes(disk, { internal: 'i2' })
  const c = maxSlot(slotsOf(truth))
  t.ok(c > 0, 'i2 holds the guest\'s writes')
  t.same(checkDiskAgainstCounter(slotsOf(truth), c, c + 1, 0), [], `i2 is consistent at counter ${c}`)
  const liveFile = lives[0]!
  const differing = []
  for (const f of lives) if (!(await diskBytes(f)).equals(truth)) differing.push(f)
  t.same(differing, [], `every one of the ${lives.length} live exports reads exactly what the tag holds`)
  const whole = join(dir, 'truth.raw')
  await run('qemu-img', ['convert', '-l', 'snapshot.name=i2', '-f', 'qcow2', '-O', 'raw', disk, whole])
  t.ok(await sameImage([whole], liveFile), 'qemu-img compare: the whole first live export equals the tag read offline')
  t.ok(await sameImage([whole], lives.at(-1)!), 'and so does the last')
  t.notSame(await diskBytes(disk), truth, 'the active disk moved on (the export did not just copy it)')
  const off = await exportSnap(t, td, 'ie', 'i2', { file: 'off-i2.raw', format: 'raw' })
  t.equal(off.result.forceShare, false, 'offline: no -U')
  t.same(readFileSync(join(dir, 'off-i2.raw')).subarray(0, truth.length), truth, 'the offline raw export holds i2')
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', liveFile])).stdout)
  t.notOk(info.snapshots, 'the export carries no internal snapshots, only the tag\'s data')
})

t.test('a daemon killed during an export leaves no half image: partial removed (back) or the whole one kept (forward)', async (t) => {
  for (const [point, whole] of [['snapshot-export.convert.after', false], ['snapshot-export.publish.after', true]] as const) {
    const stateDir = join(t.testdir(), point.split('.')[1]!)
    const td = await startTestDaemon(t, { stateDir })
    await defineGuestVm(td, 'ce', { disks: 1 })
    await snap(td, 'ce', { name: 'c1', kind: 'internal' })
    await td.close()
    const child = await startChildDaemon(t, stateDir, { point })
    const res = await child.api('POST', '/v1/vms/ce/snapshots/c1/export', { file: 'out.qcow2' }).catch(() => undefined)
    t.ok(await child.ended(30_000), `the daemon died at ${point}`)
    const jobId: string | undefined = res?.body?.id
    const dir = join(stateDir, 'vms', 'ce')
    t.ok(existsSync(join(dir, 'out.qcow2.qmpd-partial')) || existsSync(join(dir, 'out.qcow2')), 'the export had begun writing')
    const again = await startTestDaemon(t, { stateDir })
    t.notOk(existsSync(join(dir, 'out.qcow2.qmpd-partial')), 'no partial file after recovery')
    t.equal(existsSync(join(dir, 'out.qcow2')), whole, whole ? 'the whole image keeps its name' : 'no file under the final name')
    t.same(again.daemon.repos.journal.pending('ce'), [], 'the journal entry is settled')
    if (jobId) {
      const job = (await again.api('GET', `/v1/jobs/${jobId}`)).body
      t.equal(job.state, whole ? 'succeeded' : 'failed', `the job says what recovery did (${job.state})`)
    }
    if (whole) t.same(await diskBytes(join(dir, 'out.qcow2')), await diskBytes(join(dir, 'disk0.qcow2'), { internal: 'c1' }), 'and it holds c1')
    await again.close()
  }
})
