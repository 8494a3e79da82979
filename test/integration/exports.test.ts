// Pull-mode NBD exports against real QEMU: the export shows the disk at its instant while the guest
// writes on (read back with qemu-img convert from the NBD socket), its frozen dirty bitmap is
// visible as a meta context, DELETE and VM stop restore the graph and remove the scratch, bad
// input changes nothing, and an open export refuses what would break it.
import { execFile } from 'node:child_process'
import { existsSync, readdirSync, statSync } from 'node:fs'
import { mkdtemp, readFile, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { type AddressInfo, connect, createServer } from 'node:net'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t from 'tap'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { GUEST_SLOTS, SECTOR, SLOT_FIRST_LBA } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { diskBytes, maxSlot, slotsOf } from '../helpers/snap.ts'

const execFileP = promisify(execFile)
const SLOT_BYTES = (SLOT_FIRST_LBA + GUEST_SLOTS) * SECTOR

t.before(() => {
  requireQemu(t)
})

async function qmp(td: TestDaemon, vm: string, execute: string, args?: unknown): Promise<any> {
  const r = await td.api('POST', `/v1/vms/${vm}/qmp`, { execute, ...(args ? { arguments: args } : {}) })
  if (r.status !== 200) throw new Error(`${execute}: ${JSON.stringify(r.body)}`)
  return r.body.return
}

/** The block graph as QEMU has it: node names, exports and jobs. */
async function graph(td: TestDaemon, vm: string): Promise<{ nodes: string[]; exports: string[]; jobs: string[] }> {
  const nodes = ((await qmp(td, vm, 'query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string }>).map((n) => n['node-name']).sort()
  const exports = ((await qmp(td, vm, 'query-block-exports')) as Array<{ id: string }>).map((e) => e.id)
  const jobs = ((await qmp(td, vm, 'query-jobs')) as Array<{ id: string }>).map((j) => j.id)
  return { nodes, exports, jobs }
}

/** Files of the VM directory that an export would leave. */
function exportFiles(dir: string): string[] {
  return readdirSync(dir).filter((f) => f.startsWith('export-') || f === 'nbd.sock' || f === 'exports.json')
}

/** Reads an NBD export (from the VM directory, so the socket path stays short) into raw bytes. */
async function readExport(vmDir: string, name: string): Promise<Buffer> {
  const dir = await mkdtemp(join(tmpdir(), 'qmpd-export-'))
  try {
    const out = join(dir, 'out.raw')
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', `nbd+unix:///${name}?socket=nbd.sock`, out], { cwd: vmDir })
    return await readFile(out)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

/** Reads an NBD URI (e.g. nbd://127.0.0.1:PORT/vda) into raw bytes. */
async function readUri(uri: string): Promise<Buffer> {
  const dir = await mkdtemp(join(tmpdir(), 'qmpd-export-'))
  try {
    const out = join(dir, 'out.raw')
    await execFileP('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out])
    return await readFile(out)
  } finally {
    await rm(dir, { recursive: true, force: true })
  }
}

/** The extents of an export's dirty-bitmap meta context (qemu-img map, x-dirty-bitmap). */
async function bitmapMap(vmDir: string, name: string, context: string): Promise<Array<{ start: number; length: number; data: boolean }>> {
  const { stdout } = await execFileP('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,export=${name},server.type=unix,server.path=nbd.sock,x-dirty-bitmap=${context}`], { cwd: vmDir })
  return JSON.parse(stdout)
}

t.test('a pull-mode export shows the disk at its instant while the guest writes on; DELETE restores the graph', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'x', { disks: 2 })
  const vmDir = join(td.stateDir, 'vms', 'x')
  const disk = join(vmDir, 'disk0.qcow2')
  // A persistent bitmap made before QEMU opens the image: it records every write from boot on.
  await execFileP('qemu-img', ['bitmap', '--add', disk, 'b1'])

  t.equal((await td.api('POST', '/v1/vms/x/exports', {})).status, 409, 'a shut-off VM cannot be exported')
  t.same(exportFiles(vmDir), [], 'and nothing was created')
  await op(td, 'x', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 'x')).counter > 70, 60_000), 'the guest counts')
  const original = await graph(td, 'x')

  // Bad input: refused, nothing changes.
  const jobsBefore = (await td.api('GET', '/v1/jobs?vm=x&limit=1000')).body.jobs.length
  const unknownDisk = await td.api('POST', '/v1/vms/x/exports', { disks: ['vdz'] })
  t.equal(unknownDisk.status, 404, 'an unknown disk is 404')
  t.equal(unknownDisk.body.error.code, 'DISK_NOT_FOUND')
  const noBitmap = await td.api('POST', '/v1/vms/x/exports', { disks: ['vda'], bitmap: 'nope' })
  t.equal(noBitmap.status, 404, 'a missing bitmap is 404')
  t.equal(noBitmap.body.error.code, 'BITMAP_NOT_FOUND')
  t.equal((await td.api('POST', '/v1/vms/x/exports', { bitmap: 'b1' })).body.error?.code, 'BITMAP_NOT_FOUND', 'vdb has no b1: refused for all disks')
  t.equal((await td.api('POST', '/v1/vms/x/exports', { disks: ['vda', 'vda'] })).status, 400, 'a disk named twice is 400')
  t.equal((await td.api('POST', '/v1/vms/x/exports', { disks: ['vda'], tcp: true })).status, 400, 'tcp must be an object: 400')
  t.equal((await td.api('POST', '/v1/vms/x/exports', { disks: ['vda'], tcp: { host: '0.0.0.0' } })).status, 400, 'tcp only on loopback: 400')
  t.equal((await td.api('POST', '/v1/vms/x/exports', { disks: ['vda'], other: 1 })).status, 400, 'unknown members are 400')
  const taken = createServer()
  await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve))
  const takenPort = (taken.address() as AddressInfo).port
  const inUse = await td.api('POST', '/v1/vms/x/exports', { disks: ['vda'], tcp: { port: takenPort } })
  taken.close()
  t.equal(inUse.status, 409, 'a TCP port in use is 409')
  t.equal(inUse.body.error.code, 'PORT_IN_USE')
  t.same(await graph(td, 'x'), original, 'the graph is unchanged after the refusals')
  t.same(exportFiles(vmDir), [], 'no file was created')
  t.equal((await td.api('GET', '/v1/jobs?vm=x&limit=1000')).body.jobs.length, jobsBefore, 'no job was made')

  // The instant: paused (stop flushes), read the image, export, resume.
  await op(td, 'x', 'pause')
  const atExport = await diskBytes(disk)
  const t0 = performance.now()
  const created = await td.api('POST', '/v1/vms/x/exports', { disks: ['vda'], bitmap: 'b1' })
  const setupMs = Math.round(performance.now() - t0)
  t.equal(created.status, 201, `export created in ${setupMs} ms (${created.body?.error?.message ?? 'ok'})`)
  const ex = created.body
  t.same(ex.disks, [{ disk: 'vda', exportName: 'vda', bitmap: 'qemu:dirty-bitmap:b1' }], 'one disk, its bitmap as a meta context')
  t.equal(ex.socket, join(vmDir, 'nbd.sock'), 'the socket is in the VM directory')
  t.equal(statSync(ex.socket).mode & 0o777, 0o600, 'socket mode 0600')
  const scratch = join(vmDir, `export-${ex.id}-vda.qcow2`)
  t.ok(existsSync(scratch), 'the scratch image exists')
  await op(td, 'x', 'resume')
  const counterAtExport = maxSlot(slotsOf(atExport))
  t.ok(await eventually(async () => (await guestCounters(td, 'x')).counter > counterAtExport + 2 * GUEST_SLOTS, 120_000), 'the guest rewrote every slot after the export')

  const t1 = performance.now()
  const viaNbd = await readExport(vmDir, 'vda')
  t.comment(`qemu-img convert of the 16 MiB export: ${Math.round(performance.now() - t1)} ms`)
  t.equal(viaNbd.length, 16 * 1024 * 1024, 'the export has the disk\'s size')
  t.ok(viaNbd.subarray(0, SLOT_BYTES).equals(atExport), `the export holds the disk at its instant (counter ${counterAtExport}), byte for byte`)
  t.ok(viaNbd.subarray(SLOT_BYTES).every((b) => b === 0), 'and nothing beyond the slots')
  await op(td, 'x', 'pause')
  const now = await diskBytes(disk)
  await op(td, 'x', 'resume')
  t.ok(maxSlot(slotsOf(now)) > counterAtExport + GUEST_SLOTS, `while the disk itself moved on (counter ${maxSlot(slotsOf(now))})`)
  t.notOk(now.equals(atExport), 'the live disk differs from the export')

  const extents = await bitmapMap(vmDir, 'vda', 'qemu:dirty-bitmap:b1')
  t.comment(`dirty-bitmap extents: ${JSON.stringify(extents.map((e) => [e.start, e.length, e.data]))}`)
  // x-dirty-bitmap reports dirty extents as data:false (qemu-img's documented inversion).
  const dirty = extents.filter((e) => !e.data)
  t.same(dirty.map((e) => e.start), [0], 'exactly one dirty extent, at offset 0: the sectors the guest writes')
  t.ok(dirty[0] && dirty[0].length >= SLOT_BYTES && dirty[0].length <= 1024 * 1024, `of one bitmap granule (${dirty[0]?.length} bytes)`)
  t.equal(extents.reduce((n, e) => n + e.length, 0), 16 * 1024 * 1024, 'the map covers the disk')

  // While it is open: listed; what would break it is refused.
  t.same((await td.api('GET', '/v1/vms/x/exports')).body.exports, [ex], 'GET lists it')
  const check = await td.api('GET', '/v1/vms/x/check')
  t.equal(check.body.busy, true, 'the consistency check sees an operation in flight')
  t.same(check.body.problems, [], 'and does not take the fleecing job or the scratch for orphans')
  t.equal((await td.api('POST', '/v1/vms/x/repair')).status, 409, 'repair waits until the export ends')
  const again = await td.api('POST', '/v1/vms/x/exports', { disks: ['vda'] })
  t.equal(again.status, 409, 'the same disk cannot be exported twice')
  t.equal(again.body.error.code, 'EXPORT_ACTIVE')
  const snapRefused = await td.api('POST', '/v1/vms/x/snapshots?wait=true', { name: 's1', memory: false })
  t.equal(snapRefused.body.error?.code, 'EXPORT_ACTIVE', 'a snapshot is refused while the export is open')
  t.equal((await td.api('POST', '/v1/vms/x/disks/vda/commit?wait=true', {})).body.error?.code, 'EXPORT_ACTIVE', 'so is a block job')
  t.equal((await td.api('DELETE', '/v1/vms/x/exports/00000000')).status, 404, 'DELETE of an unknown export is 404')

  const t2 = performance.now()
  const del = await td.api('DELETE', `/v1/vms/x/exports/${ex.id}`)
  t.equal(del.status, 204, `DELETE ended it in ${Math.round(performance.now() - t2)} ms`)
  t.same(await graph(td, 'x'), original, 'the graph is the original again: no scratch node, no export, no job')
  t.same(exportFiles(vmDir), [], 'the scratch image, the socket and the record are gone')
  t.same((await td.api('GET', '/v1/vms/x/exports')).body.exports, [], 'GET lists none')
  t.equal((await td.api('POST', '/v1/vms/x/snapshots?wait=true', { name: 's1', memory: false })).status, 200, 'snapshots work again')

  // Stopping the VM ends its exports.
  const second = await td.api('POST', '/v1/vms/x/exports', { tcp: {} })
  t.equal(second.status, 201, 'every disk exported, also on loopback TCP')
  t.same(second.body.disks.map((d: { disk: string }) => d.disk), ['vda', 'vdb'])
  const tcp = second.body.tcp as { host: string; port: number; uri: string }
  t.equal(tcp.host, '127.0.0.1', 'TCP on 127.0.0.1')
  t.ok(tcp.port > 0, `on a free port (${tcp.port})`)
  t.equal(tcp.uri, `nbd://127.0.0.1:${tcp.port}/vda`)
  const [viaUnix, viaTcp] = [await readExport(vmDir, 'vdb'), await readUri(`nbd://127.0.0.1:${tcp.port}/vdb`)]
  t.equal(viaTcp.length, 16 * 1024 * 1024, 'the TCP export has the disk\'s size')
  t.ok(viaTcp.equals(viaUnix), 'and reads the same bytes as the unix socket')
  t.equal(exportFiles(vmDir).filter((f) => f.endsWith('.qcow2')).length, 2, 'one scratch per disk')
  await op(td, 'x', 'stop', { force: true })
  t.ok(await eventually(() => exportFiles(vmDir).length === 0, 5_000), 'the stop removed the scratch images and the record')
  t.same((await td.api('GET', '/v1/vms/x/exports')).body.exports, [], 'and the export is gone')
  t.ok(await eventually(() => refused(tcp.port), 5_000), 'and its TCP port no longer accepts connections')
})

/** Whether nothing listens on 127.0.0.1:port any more. */
function refused(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1')
    s.once('connect', () => {
      s.destroy()
      resolve(false)
    })
    s.once('error', () => resolve(true))
  })
}
