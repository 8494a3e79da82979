// A QEMU that reports a migration blocker (ivshmem-plain in peer mode, QEMU's own
// migrate_add_blocker): every operation that migrates (checkpoint, save, managed save) is a 409
// MIGRATION_BLOCKED with QEMU's reason before any job is made; disk-only snapshots still work.
import { readdirSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { eventually, guestCounters, startTestDaemon } from '../helpers/daemon.ts'
import { makeGuestDisk } from '../helpers/guest.ts'
import { launchRawQemu, requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

t.test('a migration blocker QEMU reports makes checkpoints, save and managed save a clear 409', async (t) => {
  const dir = t.testdir()
  const sockDir = await mkdtemp(join(tmpdir(), 'qmpd-block-'))
  t.teardown(() => rm(sockDir, { recursive: true, force: true }))
  const disk = join(dir, 'boot.qcow2')
  await makeGuestDisk(disk, { format: 'qcow2', sizeMiB: 16, boot: true })
  const raw = await launchRawQemu({
    dir: sockDir,
    disks: [],
    memoryMiB: 32,
    extraArgs: [
      '-blockdev', JSON.stringify({ 'node-name': 'boot-file', driver: 'file', filename: disk }),
      '-blockdev', JSON.stringify({ 'node-name': 'boot', driver: 'qcow2', file: 'boot-file' }),
      '-device', 'virtio-blk-pci,drive=boot,id=vda,bootindex=1',
      // ivshmem-plain defaults to master=off: QEMU registers "peer mode" as a migration blocker.
      '-object', 'memory-backend-ram,id=shm0,size=1M,share=on',
      '-device', 'ivshmem-plain,memdev=shm0,id=shm',
    ],
  })
  t.teardown(() => raw.kill())
  await raw.qmp.cmd('cont')
  raw.qmp.close()
  const td = await startTestDaemon(t, { stateDir: join(dir, 'state'), config: { allowedDirs: [sockDir] } })
  t.equal((await td.api('POST', '/v1/vms', { name: 'b', adopt: { qmpSocket: raw.socket } })).status, 201, 'adopted')
  t.ok(await eventually(async () => (await guestCounters(td, 'b')).counter > 5, 30_000), 'the guest counts')
  const vmDir = join(td.stateDir, 'vms', 'b')
  const filesBefore = readdirSync(vmDir).filter((f) => !f.startsWith('pmem-')).sort()
  const jobsBefore = (await td.api('GET', '/v1/jobs?vm=b&limit=1000')).body.jobs.length

  const refusals: Array<[string, string, unknown]> = [
    ['external checkpoint', '/v1/vms/b/snapshots?wait=true', { name: 'cp', kind: 'external' }],
    ['internal checkpoint (memory by default)', '/v1/vms/b/snapshots?wait=true', { name: 'ic' }],
    ['save', '/v1/vms/b/save?wait=true', { file: 'b.state' }],
    ['managed save', '/v1/vms/b/managedsave?wait=true', {}],
  ]
  for (const [what, url, body] of refusals) {
    const t0 = performance.now()
    const res = await td.api('POST', url, body)
    t.equal(res.status, 409, `${what}: 409 in ${Math.round(performance.now() - t0)} ms`)
    t.equal(res.body.error.code, 'MIGRATION_BLOCKED', `${what}: MIGRATION_BLOCKED`)
    t.match(res.body.error.details.reasons, [/ivshmem/], `${what}: QEMU's reason is in details`)
    t.equal(res.body.job, undefined, `${what}: no job`)
  }
  t.equal((await td.api('GET', '/v1/jobs?vm=b&limit=1000')).body.jobs.length, jobsBefore, 'no job was made')
  t.same(readdirSync(vmDir).filter((f) => !f.startsWith('pmem-')).sort(), filesBefore, 'no file was created')
  t.equal((await td.api('GET', '/v1/vms/b')).body.state, 'running', 'the guest still runs')

  const diskOnly = await td.api('POST', '/v1/vms/b/snapshots?wait=true', { name: 'd1', kind: 'external', memory: false })
  t.equal(diskOnly.status, 200, `a disk-only snapshot does not migrate and is taken (${diskOnly.body?.error?.message ?? 'ok'})`)
})
