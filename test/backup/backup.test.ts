// Push-mode backups against real QEMU while the guest writes: a full and two incremental points of
// two disks, each restored and read back by sectors; bitmaps across a clean QEMU restart; after
// QEMU is killed the next incremental is reported as full, with the reason; external snapshots
// (live and offline) between two backups keep the chain incremental (the overlay gets the bitmap);
// a differential point backed by the full alone.
import { execFile } from 'node:child_process'
import { mkdirSync, readdirSync, mkdtempSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t, { type Test } from 'tap'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { checkDiskAgainstCounter } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { diskBytes, slotsOf } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

/** The guest counters c in [lo, hi] at which disk `i`'s bytes are exactly what the guest had written. */
async function instantsOf(file: string, i: number, lo: number, hi: number): Promise<number[]> {
  const slots = slotsOf(await diskBytes(file))
  const out: number[] = []
  for (let c = lo; c <= hi; c++) {
    if (checkDiskAgainstCounter(slots, c, c, i).length === 0 || checkDiskAgainstCounter(slots, c, c + 1, i).length === 0) out.push(c)
  }
  return out
}

/** Writes `pattern` over 64 KiB at `offset` of the running disk through QEMU's block layer (HMP qemu-io): the bitmaps see it. */
async function hostWrite(td: TestDaemon, vm: string, disk: string, offset: string, pattern: number): Promise<void> {
  const qmp = td.daemon.vms.qmp(vm)
  // The qdev path of the virtio backend (the -device id names the PCI proxy, which has no drive).
  const qdev = (await qmp.execute('query-block')).find((b) => b.qdev?.startsWith(`/machine/peripheral/${disk}/`))?.qdev
  if (!qdev) throw new Error(`no block device for ${disk}`)
  const out = await qmp.execute('human-monitor-command', { 'command-line': `qemu-io -d ${qdev} "write -P ${pattern} ${offset} 64k"` })
  // qemu-io prints its "wrote ..." line to QEMU's stdout; the monitor answers only errors.
  if (out.trim() && !/wrote 65536/.test(out)) throw new Error(`qemu-io write on ${disk}: ${out}`)
}

/** Whether the 64 KiB at `offset` of image `file` (with its backing chain) are all `pattern`. */
async function holds(file: string, offset: number, pattern: number): Promise<boolean> {
  const dir = mkdtempSync(join(tmpdir(), 'qmpd-holds-'))
  try {
    await promisify(execFile)('qemu-img', ['convert', '-U', '-O', 'raw', file, join(dir, 'out.raw')])
    const bytes = readFileSync(join(dir, 'out.raw')).subarray(offset, offset + 65536)
    if (bytes.length !== 65536) throw new Error(`${file} is shorter than ${offset + 65536} bytes`)
    return bytes.every((b) => b === pattern)
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

async function advance(td: TestDaemon, vm: string, by: number): Promise<void> {
  const c = (await guestCounters(td, vm)).counter
  if (!(await eventually(async () => (await guestCounters(td, vm)).counter > c + by, 60_000))) throw new Error('the guest does not write')
}

/**
 * Takes a backup while the guest writes, restores every disk of the point and checks that all of
 * them read back the disk at one instant between the request and the job's end.
 */
async function backupAndCheck(t: Test, td: TestDaemon, vm: string, body: Record<string, unknown>, label: string): Promise<any> {
  const lo = (await guestCounters(td, vm)).counter
  const t0 = performance.now()
  const r = await td.api('POST', `/v1/vms/${vm}/backups?wait=true&timeoutSec=300`, body)
  const ms = Math.round(performance.now() - t0)
  t.equal(r.status, 200, `${label}: backup succeeded ${JSON.stringify(r.body?.error ?? '')}`)
  const hi = (await guestCounters(td, vm)).counter
  t.ok(hi > lo, `${label}: the guest kept writing during the backup (counter ${lo} -> ${hi}, ${ms} ms)`)
  const point = r.body.result.point
  let common: number[] | undefined
  for (const [i, d] of point.disks.entries()) {
    const out = join(td.stateDir, 'vms', vm, `restored-${point.id}-${d.id}.qcow2`)
    const rr = await td.api('POST', `/v1/vms/${vm}/backups/${point.id}/restore?wait=true`, { file: out, disk: d.id })
    t.equal(rr.status, 200, `${label}: restore of ${d.id}`)
    const at = await instantsOf(out, i, lo, hi)
    t.ok(at.length > 0, `${label}: disk ${d.id} restored from ${point.id} holds exactly the disk at one instant in [${lo}, ${hi}] (${at.join(',')})`)
    common = common ? common.filter((c) => at.includes(c)) : at
  }
  t.ok(common && common.length > 0, `${label}: every disk of the point is from the same instant (${common?.join(',')})`)
  return { point, ms, instant: common?.[0] ?? -1 }
}

t.test('a full and two incremental backups while the guest writes, each point restored exactly; a killed QEMU makes the next one full, and says so', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'bk', { disks: 2 })
  const dir = join(td.stateDir, 'vms', 'bk', 'backups')
  mkdirSync(dir)
  await op(td, 'bk', 'start')
  await advance(td, 'bk', 70)

  const full = await backupAndCheck(t, td, 'bk', { mode: 'full', dir }, 'full')
  t.match(full.point, { mode: 'full', requested: 'full' })
  t.notOk(full.point.reason, 'a requested full has no fallback reason')
  t.same(full.point.disks.map((d: any) => d.backing), [null, null], 'full points stand alone')

  await advance(td, 'bk', 100)
  const inc1 = await backupAndCheck(t, td, 'bk', { mode: 'incremental', dir }, 'incremental 1')
  t.match(inc1.point, { mode: 'incremental', requested: 'incremental' })
  t.same(inc1.point.disks.map((d: any) => d.backing), full.point.disks.map((d: any) => d.file), 'each incremental file is backed by the previous point')
  t.ok(inc1.instant > full.instant, 'the incremental point is later than the full one')
  for (const [i, d] of inc1.point.disks.entries()) {
    t.ok(d.copiedBytes < full.point.disks[i].copiedBytes, `disk ${d.id}: the incremental copied ${d.copiedBytes} bytes, the full ${full.point.disks[i].copiedBytes}`)
  }

  // An external snapshot and a commit back between two backups: QEMU marks the base's bitmap for
  // every cluster the commit writes, so the chain goes on incrementally and the point is exact.
  t.equal((await td.api('POST', '/v1/vms/bk/snapshots?wait=true', { name: 'e1', kind: 'external', memory: false })).status, 200, 'external snapshot e1')
  await advance(td, 'bk', 70)
  t.equal((await td.api('DELETE', '/v1/vms/bk/snapshots/e1?wait=true&metadataOnly=true')).status, 200, 'forget e1 (its overlay stays the active layer)')
  for (const disk of ['vda', 'vdb']) {
    const c = await td.api('POST', `/v1/vms/bk/disks/${disk}/commit?wait=true`, {})
    t.equal(c.status, 200, `active commit of ${disk} back into its base`)
    t.equal(c.body.result?.pivoted, true)
  }
  await advance(td, 'bk', 70)
  const inc1b = await backupAndCheck(t, td, 'bk', { mode: 'incremental', dir }, 'incremental after a snapshot and a commit')
  t.match(inc1b.point, { mode: 'incremental', requested: 'incremental' }, 'the snapshot and commit did not break the chain')
  t.same(inc1b.point.disks.map((d: any) => d.backing), inc1.point.disks.map((d: any) => d.file))

  // An external snapshot between two backups, its overlay still active at the next one: the
  // snapshot's transaction gave the overlay the chain's bitmap, the backup merges the base's bits
  // (written before the snapshot) into it and runs incremental. A host write on each side of the
  // snapshot, at offsets the guest never writes, proves both are in the point.
  for (const disk of ['vda', 'vdb']) await hostWrite(td, 'bk', disk, '4M', 0xa1)
  t.equal((await td.api('POST', '/v1/vms/bk/snapshots?wait=true', { name: 'e2', kind: 'external', memory: false })).status, 200, 'external snapshot e2')
  for (const disk of ['vda', 'vdb']) await hostWrite(td, 'bk', disk, '8M', 0xb2)
  await advance(td, 'bk', 70)
  const onOverlay = await backupAndCheck(t, td, 'bk', { mode: 'incremental', dir }, 'incremental on a new overlay')
  t.match(onOverlay.point, { mode: 'incremental', requested: 'incremental' }, 'reported incremental, not full')
  t.notOk(onOverlay.point.reason, 'no fallback reason')
  t.same(onOverlay.point.disks.map((d: any) => d.backing), inc1b.point.disks.map((d: any) => d.file), 'backed by the previous point')
  t.same(onOverlay.point.disks.map((d: any) => d.merged), inc1b.point.disks.map((d: any) => [d.layer]), 'the base layer\'s bitmap was merged, and recorded')
  t.ok(onOverlay.point.disks.every((d: any, i: number) => d.layer !== inc1b.point.disks[i].layer), 'the point records the overlay as its layer')
  for (const d of onOverlay.point.disks) {
    const restored = join(td.stateDir, 'vms', 'bk', `restored-${onOverlay.point.id}-${d.id}.qcow2`)
    t.ok(await holds(restored, 4 << 20, 0xa1), `${d.id}: the write before the snapshot (in the base layer) is in the point`)
    t.ok(await holds(restored, 8 << 20, 0xb2), `${d.id}: the write after the snapshot (in the overlay) is in the point`)
    const size = statSync(d.file).size
    t.ok(size < 1 << 20 && d.copiedBytes < full.point.disks[0].copiedBytes, `${d.id}: the incremental file is small (${size} bytes, ${d.copiedBytes} copied; the full copied ${full.point.disks[0].copiedBytes})`)
  }
  // The next one has nothing left to merge: the base's bits are not merged twice.
  await advance(td, 'bk', 70)
  const onOverlay2 = await backupAndCheck(t, td, 'bk', { mode: 'incremental', dir }, 'second incremental on the overlay')
  t.match(onOverlay2.point, { mode: 'incremental', requested: 'incremental' })
  t.ok(onOverlay2.point.disks.every((d: any) => d.merged === undefined), 'nothing merged the second time')
  t.ok(onOverlay2.point.disks.every((d: any, i: number) => d.copiedBytes < onOverlay.point.disks[i].copiedBytes), 'and it copied less than the merged one (only the guest\'s slots)')

  await op(td, 'bk', 'stop', { force: true })
  await op(td, 'bk', 'start')
  await advance(td, 'bk', 100)
  const inc2 = await backupAndCheck(t, td, 'bk', { mode: 'incremental', dir }, 'incremental 2 (after a clean QEMU restart)')
  t.match(inc2.point, { mode: 'incremental', requested: 'incremental' })
  t.same(inc2.point.disks.map((d: any) => d.backing), onOverlay2.point.disks.map((d: any) => d.file), 'backed by the point before the restart (the overlay\'s bitmap was stored)')
  // (The guest booted again: its counter restarted, so this instant is not comparable with inc1's.)

  // Restoring an earlier point still gives that point's instant, not a later one.
  const again = join(dir, 'again-full.qcow2')
  t.equal((await td.api('POST', `/v1/vms/bk/backups/${full.point.id}/restore?wait=true`, { file: again, disk: 'vda' })).status, 200)
  t.ok((await instantsOf(again, 0, full.instant, full.instant)).length === 1, 'the full point restored after two incrementals still holds its own instant')

  const list = await td.api('GET', '/v1/vms/bk/backups')
  t.equal(list.status, 200)
  t.equal(list.body.chains.length, 1, 'one chain for the directory')
  const chain = list.body.chains[0]
  t.same(chain.points.map((p: any) => p.id), [full.point.id, inc1.point.id, inc1b.point.id, onOverlay.point.id, onOverlay2.point.id, inc2.point.id])
  t.same(chain.bitmaps.map((b: any) => b.state), ['active', 'active'], 'both bitmaps active')
  t.ok(chain.sizeBytes > 0)

  // QEMU killed: the bitmaps loaded at start were in use and are inconsistent when reopened.
  const pid = td.daemon.vms.record('bk').runtime.pid!
  process.kill(pid, 'SIGKILL')
  t.ok(await eventually(async () => (await td.api('GET', '/v1/vms/bk')).body.state === 'crashed', 20_000), 'the VM is crashed')
  await op(td, 'bk', 'start')
  const states = (await td.api('GET', '/v1/vms/bk/backups')).body.chains[0].bitmaps.map((b: any) => b.state)
  t.same(states, ['inconsistent', 'inconsistent'], 'GET shows the bitmaps inconsistent')
  await advance(td, 'bk', 70)
  const after = await backupAndCheck(t, td, 'bk', { mode: 'incremental', dir }, 'after kill')
  t.match(after.point, { mode: 'full', requested: 'incremental', reason: /bitmap inconsistent after unclean exit/ }, 'the incremental became full and says why')
  t.same(after.point.disks.map((d: any) => d.backing), [null, null], 'and it stands alone')
  const states2 = (await td.api('GET', '/v1/vms/bk/backups')).body.chains[0].bitmaps.map((b: any) => b.state)
  t.same(states2, ['active', 'active'], 'the full backup re-created the bitmaps')
  await advance(td, 'bk', 70)
  const next = await backupAndCheck(t, td, 'bk', { mode: 'incremental', dir }, 'incremental after the new full')
  t.match(next.point, { mode: 'incremental', requested: 'incremental' })
  t.same(next.point.disks.map((d: any) => d.backing), after.point.disks.map((d: any) => d.file))
  t.comment(`timings: full ${full.ms} ms, incremental ${inc1.ms} ms, ${inc2.ms} ms (2 x 16 MiB disks, TCG)`)
})

t.test('an offline external snapshot between two backups: qemu-img gave the overlay the bitmap, the next backup merges and is incremental', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'bo', { disks: 1 })
  const dir = join(td.stateDir, 'vms', 'bo', 'backups')
  mkdirSync(dir)
  await op(td, 'bo', 'start')
  await advance(td, 'bo', 70)
  const full = await backupAndCheck(t, td, 'bo', { mode: 'full', dir }, 'full')
  await hostWrite(td, 'bo', 'vda', '4M', 0xa1)
  await op(td, 'bo', 'stop', { force: true })
  t.equal((await td.api('POST', '/v1/vms/bo/snapshots?wait=true', { name: 'o1', kind: 'external', memory: false })).status, 200, 'offline external snapshot o1')
  await op(td, 'bo', 'start')
  await hostWrite(td, 'bo', 'vda', '8M', 0xb2)
  await advance(td, 'bo', 70)
  const inc = await backupAndCheck(t, td, 'bo', { mode: 'incremental', dir }, 'incremental on the offline overlay')
  t.match(inc.point, { mode: 'incremental', requested: 'incremental' }, 'reported incremental, not full')
  t.same(inc.point.disks[0].merged, [full.point.disks[0].layer], 'the base layer\'s bitmap was merged')
  t.not(inc.point.disks[0].layer, full.point.disks[0].layer, 'the point records the overlay as its layer')
  const restored = join(td.stateDir, 'vms', 'bo', `restored-${inc.point.id}-vda.qcow2`)
  t.ok(await holds(restored, 4 << 20, 0xa1), 'the write before the stop (in the base layer) is in the point')
  t.ok(await holds(restored, 8 << 20, 0xb2), 'the write after the snapshot (in the overlay) is in the point')
  t.ok(inc.point.disks[0].copiedBytes < full.point.disks[0].copiedBytes, `incremental copied ${inc.point.disks[0].copiedBytes} bytes, the full ${full.point.disks[0].copiedBytes}`)
})

t.test('a differential point holds every change since the full, is backed by the full alone and restores without the incremental between', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'bd', { disks: 1 })
  const dir = join(td.stateDir, 'vms', 'bd', 'backups')
  mkdirSync(dir)
  await op(td, 'bd', 'start')
  await advance(td, 'bd', 70)
  const full = await backupAndCheck(t, td, 'bd', { mode: 'full', dir }, 'full')
  await hostWrite(td, 'bd', 'vda', '4M', 0xa1)
  await advance(td, 'bd', 30)
  const inc = await backupAndCheck(t, td, 'bd', { mode: 'incremental', dir }, 'incremental')
  t.equal(inc.point.mode, 'incremental')
  await hostWrite(td, 'bd', 'vda', '8M', 0xb2)
  await advance(td, 'bd', 30)
  const diff = await backupAndCheck(t, td, 'bd', { mode: 'differential', dir }, 'differential')
  t.match(diff.point, { mode: 'differential', requested: 'differential', basedOn: full.point.id }, 'reported differential, based on the full')
  t.equal(diff.point.disks[0].backing, full.point.disks[0].file, 'its backing is the full point\'s file')
  const info = await promisify(execFile)('qemu-img', ['info', '-U', '--backing-chain', '--output=json', diff.point.disks[0].file])
  const chainFiles = (JSON.parse(info.stdout) as Array<{ filename: string }>).map((l) => l.filename)
  t.same(chainFiles, [diff.point.disks[0].file, full.point.disks[0].file], 'qemu-img info --backing-chain: the differential and the full, not the incremental')
  // A retention step deletes the incremental's file: the differential still restores exactly.
  const incFile = inc.point.disks[0].file
  renameSync(incFile, `${incFile}.away`)
  const out = join(td.stateDir, 'vms', 'bd', 'restored-diff-without-inc.qcow2')
  t.equal((await td.api('POST', `/v1/vms/bd/backups/${diff.point.id}/restore?wait=true`, { file: out })).status, 200, 'restore with the incremental\'s file gone')
  t.ok(await holds(out, 4 << 20, 0xa1), 'the write before the incremental (A) is in the differential')
  t.ok(await holds(out, 8 << 20, 0xb2), 'the write after the incremental (B) is in the differential')
  t.ok((await instantsOf(out, 0, diff.instant, diff.instant)).length === 1, `and the guest's slots are those of the differential's instant ${diff.instant}`)
  renameSync(`${incFile}.away`, incFile)
  await advance(td, 'bd', 30)
  const next = await backupAndCheck(t, td, 'bd', { mode: 'incremental', dir }, 'incremental after the differential')
  t.match(next.point, { mode: 'incremental', requested: 'incremental' })
  t.equal(next.point.disks[0].backing, diff.point.disks[0].file, 'the next incremental is backed by the differential')
  t.comment(`timings: full ${full.ms} ms, incremental ${inc.ms} ms, differential ${diff.ms} ms (16 MiB disk, TCG)`)
})

t.test('a copy with pivot carries the chain\'s bitmaps: the next backup is incremental and holds the writes on both sides of the copy', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'bc', { disks: 2 })
  const dir = join(td.stateDir, 'vms', 'bc', 'backups')
  mkdirSync(dir)
  await op(td, 'bc', 'start')
  await advance(td, 'bc', 70)
  const full = await backupAndCheck(t, td, 'bc', { mode: 'full', dir }, 'full')
  for (const disk of ['vda', 'vdb']) await hostWrite(td, 'bc', disk, '4M', 0xa1)
  // vda: pivot when synchronized; vdb: the job waits ready and is completed by hand.
  const cp1 = await td.api('POST', '/v1/vms/bc/disks/vda/copy?wait=true', { dest: join(td.stateDir, 'vms', 'bc', 'vda-copy.qcow2'), pivot: true })
  t.equal(cp1.status, 200, `vda copied with pivot ${JSON.stringify(cp1.body?.error ?? '')}`)
  t.equal(cp1.body.result?.pivoted, true)
  const cp2 = (await td.api('POST', '/v1/vms/bc/disks/vdb/copy', { dest: join(td.stateDir, 'vms', 'bc', 'vdb-copy.qcow2') })).body
  t.ok(await eventually(async () => (await td.api('GET', `/v1/jobs/${cp2.id}`)).body.state === 'ready', 30_000), 'the vdb mirror becomes ready')
  t.equal((await td.api('POST', `/v1/jobs/${cp2.id}/complete`)).status, 200, 'completed by hand')
  t.equal(((await td.daemon.jobs.wait(cp2.id, 30_000)).result as { pivoted?: boolean } | undefined)?.pivoted, true, 'vdb pivoted')
  for (const disk of ['vda', 'vdb']) await hostWrite(td, 'bc', disk, '8M', 0xb2)
  await advance(td, 'bc', 60)
  const inc = await backupAndCheck(t, td, 'bc', { mode: 'incremental', dir }, 'incremental after the copies')
  t.match(inc.point, { mode: 'incremental', requested: 'incremental' }, 'reported incremental, not full')
  t.notOk(inc.point.reason, 'no fallback reason')
  t.same(inc.point.disks.map((d: any) => d.layer), [join(td.stateDir, 'vms', 'bc', 'vda-copy.qcow2'), join(td.stateDir, 'vms', 'bc', 'vdb-copy.qcow2')], 'the point\'s layers are the copies')
  for (const [i, d] of inc.point.disks.entries()) {
    const restored = join(td.stateDir, 'vms', 'bc', `restored-${inc.point.id}-${d.id}.qcow2`)
    t.ok(await holds(restored, 4 << 20, 0xa1), `${d.id}: the write before the copy is in the point`)
    t.ok(await holds(restored, 8 << 20, 0xb2), `${d.id}: the write after the copy is in the point`)
    t.ok(d.copiedBytes < full.point.disks[i].copiedBytes, `${d.id}: the incremental copied ${d.copiedBytes} bytes, the full ${full.point.disks[i].copiedBytes}`)
  }
})

t.test('a new VM from a backup point: standalone disks holding the point, it boots; bad requests make nothing', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'bn', { disks: 2 })
  const dir = join(td.stateDir, 'vms', 'bn', 'backups')
  mkdirSync(dir)
  await op(td, 'bn', 'start')
  await advance(td, 'bn', 70)
  await backupAndCheck(t, td, 'bn', { mode: 'full', dir }, 'full')
  await advance(td, 'bn', 60)
  const inc = await backupAndCheck(t, td, 'bn', { mode: 'incremental', dir }, 'incremental')
  t.equal(inc.point.mode, 'incremental')

  const before = readdirSync(join(td.stateDir, 'vms')).sort()
  t.equal((await td.api('POST', '/v1/vms', { name: 'bx', from: { backup: { vm: 'bn', id: 'b00000000' } } })).status, 404, 'an unknown point: 404')
  t.equal((await td.api('POST', '/v1/vms', { name: 'bn', from: { backup: { vm: 'bn', id: inc.point.id } } })).status, 409, 'a name in use: 409')
  t.equal((await td.api('POST', '/v1/vms', { name: 'bx', from: { backup: { vm: 'nope', id: inc.point.id } } })).status, 404, 'an unknown source VM: 404')
  t.equal((await td.api('POST', '/v1/vms', { name: 'bx', from: { backup: { vm: 'bn', id: 'x' } } })).status, 400, 'a malformed point id: 400')
  t.same(readdirSync(join(td.stateDir, 'vms')).sort(), before, 'no VM directory was made')

  const made = await td.api('POST', '/v1/vms', { name: 'br', from: { backup: { vm: 'bn', id: inc.point.id } } })
  t.equal(made.status, 201, `defined from ${inc.point.id} ${JSON.stringify(made.body?.error ?? '')}`)
  t.equal(made.body.restoredFrom?.backup, inc.point.id, 'the answer names the point')
  const files = made.body.definition.disks.map((d: { file: string }) => d.file) as string[]
  t.same(files, [join(td.stateDir, 'vms', 'br', 'vda.qcow2'), join(td.stateDir, 'vms', 'br', 'vdb.qcow2')], 'its disks live in its own directory')
  for (const [i, f] of files.entries()) {
    const info = JSON.parse((await promisify(execFile)('qemu-img', ['info', '--output=json', f])).stdout) as { 'backing-filename'?: string }
    t.notOk(info['backing-filename'], `${f} stands alone`)
    t.same(await instantsOf(f, i, inc.instant, inc.instant), [inc.instant], `${f} holds the disk at the point's instant ${inc.instant}`)
  }
  await op(td, 'br', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 'br')).counter > 5, 60_000), 'the new VM boots and its guest writes')
})

t.test('bad backup requests change nothing', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'bb', { disks: 1 })
  const dir = join(td.stateDir, 'vms', 'bb', 'bk')
  mkdirSync(dir)
  t.equal((await td.api('POST', '/v1/vms/bb/backups', { mode: 'full', dir })).status, 409, 'a shut-off VM: 409')
  await op(td, 'bb', 'start')
  t.equal((await td.api('POST', '/v1/vms/bb/backups', { mode: 'full', dir: join(dir, 'nope') })).status, 400, 'a missing dir: 400')
  t.equal((await td.api('POST', '/v1/vms/bb/backups', { mode: 'full', dir: '/etc' })).status, 400, 'a dir outside the roots: 400')
  t.equal((await td.api('POST', '/v1/vms/bb/backups', { mode: 'full', dir, disks: ['vdz'] })).status, 404, 'an unknown disk: 404')
  t.equal((await td.api('POST', '/v1/vms/bb/backups', { mode: 'weekly', dir })).status, 400, 'an unknown mode: 400')
  t.equal((await td.api('POST', '/v1/vms/bb/backups/b00000000/restore', { file: join(dir, 'x.qcow2') })).status, 404, 'an unknown backup: 404')
  t.same((await td.api('GET', '/v1/vms/bb/backups')).body, { chains: [] }, 'no chain was made')
})
