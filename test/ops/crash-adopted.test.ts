// A daemon killed in the middle of an external snapshot of an adopted QEMU: the next daemon
// re-adopts the socket, recovery finishes or undoes the snapshot, and store, QEMU and files agree.
import { existsSync } from 'node:fs'
import { mkdir, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t from 'tap'
import { eventually, guestCounters, startTestDaemon } from '../helpers/daemon.ts'
import { startChildDaemon } from '../helpers/crash.ts'
import { makeGuestDisk } from '../helpers/guest.ts'
import { launchRawQemu, requireQemu } from '../helpers/qemu.ts'
import { snap } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

const POINTS: Array<{ point: string; forward: boolean | 'either'; memory: boolean }> = [
  // QEMU never switched: recovery undoes it (the reserved overlay goes, the name is free again).
  { point: 'snapshot-create.transaction.before', forward: false, memory: false },
  // QEMU runs on the overlay, the store does not say so yet: recovery records the snapshot.
  { point: 'snapshot-create.commit.before', forward: true, memory: false },
  // A live checkpoint while RAM streams to the receiver (which outlives the daemon): recorded when
  // the stream completed whole, else undone; never half of each.
  { point: 'snapshot-create.save-ram.migrating', forward: 'either', memory: true },
]

for (const { point, forward: expected, memory } of POINTS) {
  t.test(`daemon killed at ${point} of an adopted VM's external ${memory ? 'live checkpoint' : 'snapshot'}: recovered after restart`, async (t) => {
    // A short state directory (the child daemon allows only it): the QEMU's socket lies under it.
    const stateDir = await mkdtemp(join(tmpdir(), 'qmpd-crash-adopt-'))
    t.teardown(() => rm(stateDir, { recursive: true, force: true }))
    const disk = join(t.testdir(), 'boot.qcow2')
    await makeGuestDisk(disk, { format: 'qcow2', sizeMiB: 16, boot: true })
    const extDir = join(stateDir, 'ext')
    await mkdir(extDir)
    const raw = await launchRawQemu({
      dir: extDir,
      disks: [],
      memoryMiB: 32,
      extraArgs: [
        '-blockdev', JSON.stringify({ 'node-name': 'boot-file', driver: 'file', filename: disk }),
        '-blockdev', JSON.stringify({ 'node-name': 'boot', driver: 'qcow2', file: 'boot-file' }),
        '-device', 'virtio-blk-pci,drive=boot,id=vda,bootindex=1',
      ],
    })
    t.teardown(() => raw.kill())
    await raw.qmp.cmd('cont')
    raw.qmp.close()

    const child = await startChildDaemon(t, stateDir, { point })
    const adopted = await child.api('POST', '/v1/vms', { name: 'a', adopt: { qmpSocket: raw.socket } })
    t.equal(adopted.status, 201, 'adopted by the first daemon')
    const t0 = performance.now()
    const body = memory ? { name: 's1', kind: 'external', memory: true, live: true } : { name: 's1', kind: 'external', memory: false }
    await child.api('POST', '/v1/vms/a/snapshots?wait=true', body).catch(() => undefined)
    const end = await child.ended(20_000)
    t.equal(end?.signal, 'SIGKILL', `the daemon died at ${point}`)

    const td = await startTestDaemon(t, { stateDir })
    t.comment(`crash and restart with recovery: ${Math.round(performance.now() - t0)} ms`)
    const overlay = join(stateDir, 'vms', 'a', 'vda-s1.qcow2')
    const vm = (await td.api('GET', '/v1/vms/a')).body
    t.equal(vm.state, 'running', 're-adopted, the guest runs')
    t.equal(vm.pid, raw.pid, 'the same QEMU')
    const chain = vm.disks[0].chain.map((l: any) => l.file)
    const snapRes = await td.api('GET', '/v1/vms/a/snapshots/s1')
    const forward = expected === 'either' ? snapRes.status === 200 : expected
    t.comment(`recovery went ${forward ? 'forward' : 'back'}`)
    if (forward) {
      t.equal(snapRes.status, 200, 'the snapshot was recorded')
      t.same(chain, [overlay, disk], 'QEMU runs on the overlay')
      t.equal(td.daemon.vms.record('a').runtime.disks[0]?.file, overlay, 'and the store says so')
      if (memory) t.ok(existsSync(join(stateDir, 'vms', 'a', 's1.vmstate')), 'the RAM state file is whole, under its name')
    } else {
      t.equal(snapRes.status, 404, 'no snapshot')
      t.same(chain, [disk], 'QEMU runs on the adopted disk')
      t.equal(td.daemon.vms.record('a').runtime.disks[0]?.file, disk, 'and the store says so')
      t.notOk(existsSync(overlay), 'the reserved overlay is gone')
      t.notOk(existsSync(join(stateDir, 'vms', 'a', 's1.vmstate')), 'no RAM state file')
    }
    t.same((await td.api('GET', '/v1/vms/a/check')).body.problems, [], 'store, QEMU and files agree')
    const c = (await guestCounters(td, 'a')).counter
    t.ok(await eventually(async () => (await guestCounters(td, 'a')).counter > c + 10, 30_000), 'the guest counts on')
    const again = await snap(td, 'a', { name: forward ? 's2' : 's1', kind: 'external', memory: false })
    t.equal(again.snapshot.kind, 'external', 'the next snapshot works')
  })
}
