// RAM state formats against real QEMU: save and restore take the mapped-ram file: path where the
// QEMU has it and the socket stream where not, and plain QEMU loads what qmpd wrote.
import { mkdirSync, writeFileSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import t from 'tap'
import { QemuImg } from '../../src/images/qemu-img.ts'
import { checkStateFile } from '../../src/state/ramfile.ts'
import { buildArgv } from '../../src/vm/argv.ts'
import { defineGuestVm, eventually, guestCounters, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { restoreWithPlainQemu } from '../helpers/snap.ts'

const MIB = 1024 * 1024

t.before(() => {
  requireQemu(t)
})

/** Whether the VM's QEMU reports the mapped-ram and multifd migration capabilities. */
async function hasMappedRam(td: TestDaemon, vm: string): Promise<boolean> {
  const res = await td.api('POST', `/v1/vms/${vm}/qmp`, { execute: 'query-migrate-capabilities' })
  const caps = new Set((res.body.return as Array<{ capability: string }>).map((c) => c.capability))
  return caps.has('mapped-ram') && caps.has('multifd')
}

/** The guest's whole RAM (below 4 GiB) through pmemsave. */
async function wholeRam(td: TestDaemon, vm: string, memMiB: number): Promise<Buffer> {
  const file = join(td.stateDir, 'vms', vm, `ram-${process.hrtime.bigint()}.bin`)
  const res = await td.api('POST', `/v1/vms/${vm}/qmp`, { execute: 'pmemsave', arguments: { val: 0, size: memMiB * MIB, filename: file } })
  if (res.status !== 200) throw new Error(`pmemsave: ${JSON.stringify(res.body)}`)
  return readFile(file)
}

t.test('save uses the format the QEMU has; plain QEMU and qmpd restore the exact RAM', async (t) => {
  const td = await startTestDaemon(t)
  const mem = 64
  const def = await defineGuestVm(td, 'fm', { disks: 1, memoryMiB: mem, stampMiB: 8 })
  await op(td, 'fm', 'start')
  t.ok(await eventually(async () => (await guestCounters(td, 'fm')).counter > 50), 'the guest counts')
  const mapped = await hasMappedRam(td, 'fm')
  const want = mapped ? 'mapped-ram' : 'stream'
  t.comment(`QEMU ${mapped ? 'has' : 'has no'} mapped-ram: expecting the ${want} path`)
  // Paused first, so the RAM read here is the RAM the save writes.
  await op(td, 'fm', 'pause')
  const before = await wholeRam(td, 'fm', mem)
  const file = join(td.stateDir, 'vms', 'fm', 'fm.state')
  const t0 = performance.now()
  const saved = await op(td, 'fm', 'save', { file })
  t.comment(`save of ${mem} MiB: ${Math.round(performance.now() - t0)} ms, ${(saved.result as any).bytes} bytes`)
  t.match(saved.result, { state: 'shutoff', file, format: want }, `the save reports format ${want}`)
  const onDisk = await checkStateFile(file)
  t.equal(onDisk.format, want, 'the file header records the format')
  t.equal(onDisk.capabilities.includes('mapped-ram'), mapped, 'and the capability its loader needs')

  // Plain QEMU, no qmpd, the way docs/snapshots.md says, on a throwaway overlay.
  const dir = join(td.stateDir, 'plain')
  mkdirSync(dir)
  const overlay = join(dir, 'o.qcow2')
  await new QemuImg().create(overlay, 'qcow2', { backing: { file: def.definition.disks[0].file, format: 'qcow2' } })
  const argv = buildArgv({ ...def.definition, serialLog: false }, { accel: 'tcg', disks: [{ id: 'vda', file: overlay, format: 'qcow2', gen: 0 }] })
  const qmp = await restoreWithPlainQemu(t, dir, argv, file)
  t.equal(qmp.format, want, `plain QEMU loaded it as ${want}`)
  const plainRam = join(dir, 'ram.bin')
  await qmp.cmd('pmemsave', { val: 0, size: mem * MIB, filename: plainRam })
  const after = await readFile(plainRam)
  t.equal(after.length, before.length)
  let diff = -1
  for (let i = 0; i < before.length; i += 4096) if (!before.subarray(i, i + 4096).equals(after.subarray(i, i + 4096))) { diff = i; break }
  t.equal(diff, -1, `plain QEMU holds the same ${mem} MiB of guest RAM, byte for byte`)
  await qmp.cmd('quit').catch(() => {})

  const t1 = performance.now()
  const restored = await op(td, 'fm', 'restore', { file })
  t.comment(`restore: ${Math.round(performance.now() - t1)} ms`)
  t.match(restored.result, { state: 'running', format: want }, `qmpd restores it on the ${want} path`)
  const c0 = (await guestCounters(td, 'fm')).counter
  t.ok(c0 >= before.readUInt32LE(0x8000), 'from the saved counter')
  t.ok(await eventually(async () => (await guestCounters(td, 'fm')).counter > c0 + 10), 'and counts on')

  // A paused external checkpoint records the format in the snapshot.
  await op(td, 'fm', 'pause')
  const res = await td.api('POST', '/v1/vms/fm/snapshots?wait=true&timeoutSec=120', { name: 'c1', kind: 'external' })
  t.equal(res.status, 200)
  t.match(res.body.result.snapshot, { ramMethod: 'paused', ramFormat: want }, `a paused checkpoint is written as ${want}`)
})

t.test('a mapped-ram file is refused by a QEMU without mapped-ram, or loaded by one that has it', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'nf', { disks: 1 })
  await op(td, 'nf', 'start')
  const mapped = await hasMappedRam(td, 'nf')
  await op(td, 'nf', 'stop', { force: true })
  // A header as QEMU 10.0 writes it (machine type, configuration/capabilities = [mapped-ram]),
  // then a section of no device (a header followed by QEMU_VM_EOF alone would load as an empty
  // but valid state): no QEMU can load it.
  const head = Buffer.concat([
    Buffer.from('QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0bpc-q35-10.0\x05\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x0amapped-ram', 'latin1'),
    Buffer.from([0x01]),
    Buffer.alloc(64, 0xff),
  ])
  const file = join(td.stateDir, 'vms', 'nf', 'fake.state')
  writeFileSync(file, head)
  t.equal((await checkStateFile(file)).format, 'mapped-ram')
  // A failed job under ?wait=true answers with its error (and the status of its code).
  const restores = async () => ((await td.api('GET', '/v1/jobs?vm=nf&limit=1000')).body.jobs as Array<{ op: string }>).filter((j) => j.op === 'restore').length
  const res = await td.api('POST', '/v1/vms/nf/restore?wait=true&timeoutSec=60', { file })
  if (mapped) {
    t.equal(res.body.error?.code, 'QMP_COMMAND_FAILED', 'QEMU tried the truncated file and failed it')
    t.equal(await restores(), 1, 'in a job')
  } else {
    t.equal(res.status, 409, 'refused: no mapped-ram in this QEMU')
    t.equal(res.body.error.code, 'NOT_SUPPORTED')
    t.match(res.body.error.message, /mapped-ram/)
    t.equal(await restores(), 0, 'before any job was made')
  }
  t.equal((await td.api('GET', '/v1/vms/nf')).body.state, 'shutoff', 'the VM is as before')
  t.equal((await readFile(file)).length, head.length, 'the file is untouched')
})

t.test('a live checkpoint after a restore still takes background-snapshot where the QEMU has it', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'lv', { disks: 1, memoryMiB: 64, stampMiB: 8 })
  await op(td, 'lv', 'start')
  // Whether this host's QEMU takes background-snapshot at all (userfaultfd write-protect), asked of
  // a QEMU that has done no migration yet.
  const set = (state: boolean) => td.api('POST', '/v1/vms/lv/qmp', { execute: 'migrate-set-capabilities', arguments: { capabilities: [{ capability: 'background-snapshot', state }] } })
  const usable = (await set(true)).status === 200
  await set(false)
  const want = usable ? 'background-snapshot' : 'precopy'
  t.comment(`background-snapshot ${usable ? 'accepted' : 'refused'} by a fresh QEMU`)
  const mapped = await hasMappedRam(td, 'lv')
  const file = join(td.stateDir, 'vms', 'lv', 'lv.state')
  await op(td, 'lv', 'save', { file })
  // The restore leaves multifd and mapped-ram on in the new QEMU when it loaded a mapped-ram file.
  t.match((await op(td, 'lv', 'restore', { file })).result, { format: mapped ? 'mapped-ram' : 'stream' })
  // QEMU's events in order: a live checkpoint's guest runs again before its RAM is all written
  // (QEMU 9+ leaves a guest stopped before `migrate` paused until qmpd resumes it).
  const order: string[] = []
  const watch = (async () => {
    for await (const ev of td.daemon.vms.qmp('lv').events({ names: ['STOP', 'RESUME', 'MIGRATION'], timeoutMs: 120_000 })) {
      const status = ev.event === 'MIGRATION' ? (ev.data as { status: string }).status : undefined
      order.push(status ? `MIGRATION ${status}` : ev.event)
      if (status === 'completed' || status === 'failed' || status === 'cancelled') return
    }
  })()
  const res = await td.api('POST', '/v1/vms/lv/snapshots?wait=true&timeoutSec=120', { name: 'l1', kind: 'external', memory: true, live: true })
  t.equal(res.status, 200, JSON.stringify(res.body).slice(0, 300))
  t.equal(res.body.result.snapshot.ramMethod, want, `the live checkpoint took ${want}`)
  await watch
  t.comment(`events: ${order.join(', ')}`)
  const resumed = order.indexOf('RESUME')
  // Pre-copy (no userfaultfd write-protect here) resumes after the last pass, by design.
  if (usable) t.ok(resumed > order.indexOf('STOP') && resumed < order.indexOf('MIGRATION completed'), 'the guest resumed before the RAM write completed')
  else t.ok(resumed > order.indexOf('MIGRATION completed'), 'pre-copy resumed the guest after the last pass')
  t.equal((await td.api('GET', '/v1/vms/lv')).body.state, 'running', 'and the guest runs')
})

t.test('a revert whose RAM state fails to load ends in a job error with the VM shut off, not crashed', async (t) => {
  const td = await startTestDaemon(t)
  await defineGuestVm(td, 'rv', { disks: 1 })
  await op(td, 'rv', 'start')
  const snap = await td.api('POST', '/v1/vms/rv/snapshots?wait=true&timeoutSec=120', { name: 'c', kind: 'external', memory: true })
  t.equal(snap.status, 200, `an external checkpoint (${JSON.stringify(snap.body?.error)})`)
  const file = td.daemon.repos.snapshots.get('rv', 'c')!.vmstateFile!
  // Cut in the middle of its RAM: QEMU starts loading, then meets the end of the file.
  const whole = await readFile(file)
  writeFileSync(file, whole.subarray(0, Math.floor(whole.length / 2)))
  const res = await td.api('POST', '/v1/vms/rv/snapshots/c/revert?wait=true&timeoutSec=120', { state: 'running' })
  t.not(res.status, 200, `the revert fails (${res.status} ${JSON.stringify(res.body?.error)})`)
  t.equal(res.body.job?.state ?? res.body.state, 'failed', 'its job failed')
  t.ok(await eventually(async () => (await td.api('GET', '/v1/vms/rv')).body.state !== 'starting', 10_000), 'the VM settles')
  const vm = (await td.api('GET', '/v1/vms/rv')).body
  t.equal(vm.state, 'shutoff', `the incoming QEMU's exit was expected: shutoff, not crashed (${vm.state})`)
  t.equal((await op(td, 'rv', 'start')).state, 'succeeded', 'and it starts again')
  t.equal((await op(td, 'rv', 'stop', { force: true })).state, 'succeeded')
})
