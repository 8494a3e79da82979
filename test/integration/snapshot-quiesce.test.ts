// Quiesced snapshots with a real Linux guest running qemu-guest-agent (kernel + busybox initramfs
// built from Debian packages by the test suite, ~6 s to boot under TCG).
import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import t from 'tap'
import { QgaClient } from '../../src/qga/client.ts'
import { eventually, op, startTestDaemon } from '../helpers/daemon.ts'
import { ensureLinuxGuest, GUEST_HEARTBEAT, LINUX_GUEST_READY } from '../helpers/linux-guest.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

t.test('quiesce freezes the guest filesystems around the disk snapshot and always thaws', async (t) => {
  const guest = await ensureLinuxGuest()
  let inject = false
  let heartbeatsWhileFrozen = -1
  let serial = ''
  const heartbeats = () => (readFileSync(serial, 'utf8').match(new RegExp(GUEST_HEARTBEAT, 'g')) ?? []).length
  const td = await startTestDaemon(t, {
    config: { allowedDirs: [dirname(guest.kernel)] },
    hooks: {
      snapshots: {
        // Runs right before the disk transaction, i.e. while the guest is frozen: its counter
        // writes (and so its heartbeat lines) must stop.
        transaction: async (actions) => {
          const before = heartbeats()
          await new Promise((r) => setTimeout(r, 2500))
          heartbeatsWhileFrozen = heartbeats() - before
          if (inject) actions.push({ type: 'blockdev-snapshot-sync', data: { 'node-name': 'no-such-node', 'snapshot-file': '/nonexistent/x', format: 'qcow2' } })
        },
      },
    },
  })
  const def = await td.api('POST', '/v1/vms', {
    name: 'lin',
    memoryMiB: 256,
    kernel: guest.kernel,
    initrd: guest.initrd,
    append: guest.append,
    guestAgent: true,
    disks: [{ id: 'vda', file: 'data.qcow2', sizeMiB: 32 }],
  })
  t.equal(def.status, 201, 'Linux VM defined')
  serial = join(td.stateDir, 'vms', 'lin', 'serial.log')
  await op(td, 'lin', 'start')
  t.ok(await eventually(() => readFileSync(serial, 'utf8').includes(LINUX_GUEST_READY), 60_000, 200), 'the Linux guest booted')
  t.ok(await eventually(() => heartbeats() >= 2, 20_000, 200), 'and writes to its disk')

  const res = await td.api('POST', '/v1/vms/lin/snapshots?wait=true', { name: 'q1', kind: 'external', memory: false, quiesce: true })
  t.equal(res.status, 200, 'quiesced snapshot taken')
  t.equal(res.body.result.snapshot.quiesced, true)
  t.equal(heartbeatsWhileFrozen, 0, 'no guest write got through while frozen')
  const after = heartbeats()
  t.ok(await eventually(() => heartbeats() > after, 10_000, 200), 'the guest writes again: thawed')

  inject = true
  const failed = await td.api('POST', '/v1/vms/lin/snapshots?wait=true', { name: 'q2', kind: 'external', memory: false, quiesce: true })
  t.equal(failed.status, 502, 'the injected transaction failure fails the job')
  const after2 = heartbeats()
  t.ok(await eventually(() => heartbeats() > after2, 10_000, 200), 'and the guest was thawed all the same')
  const qga = await QgaClient.connect(join(td.stateDir, 'vms', 'lin', 'qga.sock'), { timeoutMs: 10_000 })
  t.equal(await qga.fsfreezeStatus(), 'thawed', 'the agent says thawed')
  await qga.close()
  t.same((await td.api('GET', '/v1/vms/lin/snapshots')).body.snapshots.map((s: any) => s.name), ['q1'])
})
