// qmpd's own block graph of a running VM (src/vm/live-disks.ts): GET /v1/vms/{vm} shows what
// query-block shows after snapshots and block jobs, and a warm GET asks QEMU nothing.
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { defineGuestVm, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

interface Img {
  filename: string
  'virtual-size'?: number
  'backing-image'?: Img
}

/** Every non-removable device's chain of files as QEMU has it now (query-block, read by the test). */
async function qemuView(td: TestDaemon, vm: string): Promise<Record<string, string[]>> {
  const blocks = (await td.daemon.vms.qmp(vm).execute('query-block')) as Array<{ qdev?: string; removable?: boolean; inserted?: { image: Img } }>
  const out: Record<string, string[]> = {}
  for (const b of blocks) {
    if (!b.inserted || b.removable) continue
    const id = b.qdev?.match(/\/peripheral\/([^/]+)/)?.[1] ?? ''
    const files: string[] = []
    for (let img: Img | undefined = b.inserted.image; img; img = img['backing-image']) files.push(img.filename)
    out[id] = files
  }
  return out
}

async function qmpdView(td: TestDaemon, vm: string): Promise<Record<string, string[]>> {
  const res = await td.api('GET', `/v1/vms/${vm}`)
  if (res.status !== 200) throw new Error(JSON.stringify(res.body))
  return Object.fromEntries(res.body.disks.map((d: { id: string; chain: Array<{ file: string }> }) => [d.id, d.chain.map((l) => l.file)]))
}

/** GET equals query-block; a second GET runs no query; returns the view. */
async function same(t: Test, td: TestDaemon, vm: string, label: string): Promise<Record<string, string[]>> {
  const mine = await qmpdView(td, vm)
  const reads = td.daemon.vms.liveDisks.reads
  const again = await qmpdView(td, vm)
  t.equal(td.daemon.vms.liveDisks.reads, reads, `${label}: a warm GET asks QEMU nothing`)
  t.same(again, mine, `${label}: and answers the same`)
  t.same(mine, await qemuView(td, vm), `${label}: GET /v1/vms/${vm} shows query-block's chains`)
  return mine
}

t.test('the running graph follows snapshots, commit, pull and the escape hatch', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'lg', { disks: 2 })
  await op(td, 'lg', 'start')
  t.equal((await same(t, td, 'lg', 'after start')).vda!.length, 1)
  for (const name of ['s1', 's2', 's3']) {
    const r = await td.api('POST', '/v1/vms/lg/snapshots?wait=true', { name, kind: 'external', memory: false })
    t.equal(r.status, 200, `snapshot ${name}`)
  }
  const chain = (await same(t, td, 'lg', 'after 3 snapshots')).vda!
  t.equal(chain.length, 4, 'base + 3 overlays')
  for (let i = 3; i >= 1; i--) await td.api('DELETE', `/v1/vms/lg/snapshots/s${i}?wait=true&metadataOnly=true`)

  await op(td, 'lg', 'pause')
  const ic = await td.api('POST', '/v1/vms/lg/disks/vda/commit?wait=true', { top: chain[1], base: chain[2] })
  t.equal(ic.status, 200, 'intermediate commit')
  t.same((await same(t, td, 'lg', 'after an intermediate commit')).vda, [chain[0], chain[2], chain[3]])
  const pl = await td.api('POST', '/v1/vms/lg/disks/vda/pull?wait=true', { base: chain[3] })
  t.equal(pl.status, 200, 'pull')
  t.same((await same(t, td, 'lg', 'after a pull')).vda, [chain[0], chain[3]])
  await op(td, 'lg', 'resume')
  const vdb = (await qemuView(td, 'lg')).vdb!
  const ac = await td.api('POST', '/v1/vms/lg/disks/vdb/commit?wait=true', {})
  t.equal(ac.status, 200, 'active commit with pivot')
  t.same((await same(t, td, 'lg', 'after an active commit')).vdb, vdb.slice(1), 'the top went into its backing file')

  // A change qmpd's services did not make: a snapshot through the QMP escape hatch.
  const top = ((await td.daemon.vms.qmp('lg').execute('query-block')) as Array<{ qdev?: string; inserted?: { 'node-name'?: string } }>)
    .find((b) => b.qdev?.includes('/vdb/'))!.inserted!['node-name']!
  const overlay = join(td.stateDir, 'vms', 'lg', 'vdb-hatch.qcow2')
  const hatch = await td.api('POST', '/v1/vms/lg/qmp', { execute: 'blockdev-snapshot-sync', arguments: { 'node-name': top, 'snapshot-file': overlay, 'snapshot-node-name': 'hatch', format: 'qcow2' } })
  t.equal(hatch.status, 200, `escape-hatch snapshot: ${JSON.stringify(hatch.body)}`)
  t.equal((await same(t, td, 'lg', 'after an escape-hatch snapshot')).vdb![0], overlay)
})
