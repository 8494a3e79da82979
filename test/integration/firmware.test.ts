// UEFI with real QEMU: OVMF boots the Linux test guest's EFI-stub kernel (-kernel through
// fw_cfg), the guest writes a UEFI variable through efivarfs (CGI in its httpd, reached by a
// hostfwd), and internal and external checkpoints bring the variable back on revert. One boot.
import { dirname, join } from 'node:path'
import t from 'tap'
import { op, startTestDaemon } from '../helpers/daemon.ts'
import { freePort, guestGet as guestGetFor } from '../helpers/guest-http.ts'
import { ensureLinuxGuest, GUEST_EFI_APPEND, GUEST_HTTP_PORT, GUEST_NET_APPEND } from '../helpers/linux-guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { revert, snap } from '../helpers/snap.ts'

t.before(() => {
  requireQemu(t)
})

/** The guest's answer: retried for 30 s, 10 s per request (OVMF under TCG is slow). */
const guestGet = (port: number, path: string, timeoutMs = 30_000): Promise<string> => guestGetFor(port, path, timeoutMs, 10_000)

t.test('a UEFI guest keeps its NVRAM variables across internal and external checkpoint reverts', async (t) => {
  const guest = await ensureLinuxGuest()
  const td = await startTestDaemon(t, { config: { allowedDirs: [dirname(guest.kernel)] } })
  const port = await freePort()
  const def = await td.api('POST', '/v1/vms', {
    name: 'efi',
    memoryMiB: 256,
    firmware: 'uefi',
    kernel: guest.kernel,
    initrd: guest.initrd,
    append: `${guest.append} ${GUEST_NET_APPEND} ${GUEST_EFI_APPEND}`,
    disks: [{ id: 'vda', file: 'data.qcow2', sizeMiB: 16 }],
    nics: [{ id: 'net0', user: { hostfwd: [{ hostPort: port, guestPort: GUEST_HTTP_PORT }] } }],
  })
  t.equal(def.status, 201, 'UEFI VM defined')
  t.equal(def.body.definition.firmware, 'uefi')
  const nvramFile = join(td.stateDir, 'vms', 'efi', 'nvram.qcow2')

  const t0 = performance.now()
  await op(td, 'efi', 'start')
  t.equal(await guestGet(port, '/cgi-bin/getvar', 300_000), 'NOVAR', 'booted under OVMF: efivarfs is mounted, the variable does not exist yet')
  const bootMs = Math.round(performance.now() - t0)
  t.comment(`OVMF + EFI-stub kernel, start to first HTTP answer: ${bootMs} ms`)
  const disks = (await td.api('GET', '/v1/vms/efi')).body.disks as Array<{ id: string; file: string; format: string }>
  t.same(disks.map((d) => [d.id, d.file, d.format]).sort(), [['nvram', nvramFile, 'qcow2'], ['vda', join(td.stateDir, 'vms', 'efi', 'data.qcow2'), 'qcow2']], 'QEMU runs the qcow2 NVRAM as pflash1 next to the disk; the firmware code is no disk')

  t.equal(await guestGet(port, '/cgi-bin/setvar?one'), 'one', 'the guest wrote the variable')
  const i1 = await snap(td, 'efi', { name: 'i1', kind: 'internal', memory: true })
  t.same(i1.snapshot.disks.map((d: any) => [d.id, d.mode]).sort(), [['nvram', 'internal'], ['vda', 'internal']], 'the internal checkpoint includes the NVRAM')
  t.equal(await guestGet(port, '/cgi-bin/setvar?two'), 'two', 'changed after the checkpoint')
  await revert(td, 'efi', 'i1')
  t.equal(await guestGet(port, '/cgi-bin/getvar'), 'one', 'internal checkpoint revert: the variable is back')
  t.equal((await td.api('DELETE', '/v1/vms/efi/snapshots/i1?wait=true')).status, 200, 'internal checkpoint deleted')

  t.equal(await guestGet(port, '/cgi-bin/setvar?three'), 'three')
  const e1 = await snap(td, 'efi', { name: 'e1', kind: 'external', memory: true, live: true })
  const nv = e1.snapshot.disks.find((d: any) => d.id === 'nvram')
  t.equal(nv?.mode, 'external', 'the external checkpoint overlays the NVRAM with the disks')
  t.equal(await guestGet(port, '/cgi-bin/setvar?four'), 'four', 'changed after the external checkpoint')
  const rev = await revert(td, 'efi', 'e1')
  t.equal(rev.state, 'running')
  t.equal(await guestGet(port, '/cgi-bin/getvar'), 'three', 'external checkpoint revert (a relaunch with -incoming): the variable is back')
  const after = (await td.api('GET', '/v1/vms/efi')).body.disks.find((d: any) => d.id === 'nvram')
  t.not(after.file, nvramFile, 'the NVRAM runs on a new overlay after the revert')
  t.equal(after.chain.at(-1).file, nvramFile, 'over the original NVRAM')
  t.equal(await guestGet(port, '/cgi-bin/setvar?five'), 'five', 'and the guest can still write variables')
  await op(td, 'efi', 'stop', { force: true })
})
