// The capability probe against the real QEMUs: Debian's 7.2 and the private QEMU 10 differ where
// the QAPI schemas say they do, and the probe runs once per binary.
import { utimesSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { JOB_STATUSES, JOB_TYPES, MIGRATION_STATUSES, RUN_STATES } from '../../src/qmp/commands.ts'
import { capsSummary, probeCaps, qemuCaps } from '../../src/vm/qemu-caps.ts'
import { QEMU10, QEMU_SYSTEM, requireBinary } from '../helpers/qemu10.ts'

t.before(() => {
  requireBinary(t, QEMU_SYSTEM, 'Debian: apt-get install qemu-system-x86')
  requireBinary(t, QEMU10, 'run bash scripts/setup.sh --qemu10')
})

t.test('QEMU 7.2: what its schema has and lacks', async (t) => {
  const t0 = performance.now()
  const c = await qemuCaps(QEMU_SYSTEM)
  t.comment(`probe of ${QEMU_SYSTEM} (${c.version}): ${Math.round(performance.now() - t0)} ms`)
  t.match(c.version, /^7\.2\.\d+/, 'this is the 7.2 the assertions below are about')
  t.ok(c.hasCommand('blockdev-snapshot'))
  t.ok(c.hasCommand('snapshot-save'))
  t.notOk(c.hasCommand('no-such-command'))
  t.ok(c.hasEvent('BLOCK_JOB_COMPLETED'))
  t.ok(c.hasEvent('JOB_STATUS_CHANGE'))
  t.notOk(c.hasEvent('blockdev-snapshot'), 'a command is not an event')
  t.ok(c.hasMigrateCapability('background-snapshot'))
  t.notOk(c.hasMigrateCapability('mapped-ram'), 'mapped-ram came in 9.0')
  t.ok(c.hasMigrateParameter('max-bandwidth'))
  t.notOk(c.hasMigrateParameter('direct-io'), 'direct-io came in 9.1')
  t.ok(c.commandArgs('migrate').has('blk'), '7.2 migrate still takes blk')
  t.notOk(c.commandArgs('migrate').has('channels'))
  t.ok(c.blockdevDrivers().has('qcow2'))
  t.ok(c.blockdevDrivers().has('snapshot-access'))
  t.ok(c.hasCommandLineOption('machine', 'type'))
  t.notOk(c.hasCommandLineOption('machine', 'no-such-param'))
  t.notOk(c.hasCommandLineOption('no-such-option'))
})

t.test('QEMU 10: mapped-ram, direct-io, migrate channels, no blk', async (t) => {
  const c = await qemuCaps(QEMU10)
  t.match(c.version, /^10\.\d+\.\d+/, 'this is the QEMU 10 the assertions below are about')
  t.ok(c.hasMigrateCapability('mapped-ram'))
  t.ok(c.hasMigrateCapability('background-snapshot'))
  t.ok(c.hasMigrateParameter('direct-io'))
  t.ok(c.commandArgs('migrate').has('channels'))
  t.notOk(c.commandArgs('migrate').has('blk'), 'migrate blk/inc were removed in 9.1')
  t.ok(c.blockdevDrivers().has('snapshot-access'))
  t.same(capsSummary(c)['mapped-ram'], true)
  t.same(capsSummary(await qemuCaps(QEMU_SYSTEM))['mapped-ram'], false)
})

t.test('nested members: through union branches, arrays and alternates, and enums along a path', async (t) => {
  for (const bin of [QEMU_SYSTEM, QEMU10]) {
    const c = await qemuCaps(bin)
    // blockdev-add's arguments are the BlockdevOptions union: base and every driver's branch.
    const add = c.commandArgs('blockdev-add')
    t.ok(add.has('node-name') && add.has('driver'), `${bin}: union base members`)
    t.ok(add.has('backing') && add.has('file'), `${bin}: a branch's members (qcow2)`)
    // file is BlockdevRef, an alternate of BlockdevOptions and str: its object side is followed.
    t.ok(c.commandArgs('blockdev-add', ['file']).has('node-name'), `${bin}: through an alternate`)
    t.ok(c.argEnum('blockdev-add', ['file', 'driver']).has('file'), `${bin}: enum behind an alternate`)
    // transaction's actions is an array of a union.
    t.ok(c.argEnum('transaction', ['actions', 'type']).has('blockdev-snapshot-sync'), `${bin}: enum through an array of unions`)
    t.ok(c.commandArgs('transaction', ['actions', 'data']).has('snapshot-file'), `${bin}: a branch's wrapped data`)
    t.equal(c.commandArgs('no-such-command').size, 0)
    t.equal(c.argEnum('blockdev-add', ['no-such-member']).size, 0)
    t.ok(c.argEnum('migrate-set-capabilities', ['capabilities', 'capability']).has('background-snapshot'), `${bin}: enum in an array of structs`)
  }
})

t.test('probed once per binary; a new mtime probes again', async (t) => {
  const dir = t.testdir()
  const a = await qemuCaps(QEMU_SYSTEM)
  t.equal(await qemuCaps(QEMU_SYSTEM), a, 'the same object from the cache')
  // A wrapper elsewhere is another binary (its own real path), and touching it is a new key. (A
  // copy of the binary would not find its modules, which QEMU looks up next to itself.)
  const copy = join(dir, 'qemu-system-x86_64')
  writeFileSync(copy, `#!/bin/sh\nexec ${QEMU_SYSTEM} "$@"\n`, { mode: 0o755 })
  const b = await qemuCaps(copy)
  t.not(b, a)
  t.equal(b.binary, copy)
  utimesSync(copy, new Date(), new Date(Date.now() + 60_000))
  const c = await qemuCaps(copy)
  t.not(c, b, 'probed again after the mtime changed')
  t.ok(c.hasCommand('blockdev-snapshot'))
})

t.test('a binary that is not QEMU fails with QEMU_START_FAILED, one that does not exist with QEMU_NOT_FOUND', async (t) => {
  await t.rejects(probeCaps('/bin/true'), { code: 'QEMU_START_FAILED' })
  await t.rejects(qemuCaps(join(t.testdir(), 'missing-qemu')), { code: 'QEMU_NOT_FOUND' })
})

t.test('the enums replies and events are validated against hold every value either QEMU can send', async (t) => {
  // Each QAPI enum is found by a value only it has (type names are masked in the schema).
  const ours = { RunState: [RUN_STATES, 'prelaunch'], JobType: [JOB_TYPES, 'commit'], JobStatus: [JOB_STATUSES, 'concluded'], MigrationStatus: [MIGRATION_STATUSES, 'pre-switchover'] } as const
  for (const bin of [QEMU_SYSTEM, QEMU10]) {
    const d = await probeCaps(bin)
    for (const [name, [list, marker]] of Object.entries(ours)) {
      const found = d.schema.filter((e) => e['meta-type'] === 'enum' && (e.members?.some((m) => m.name === marker) || e.values?.includes(marker)))
      t.equal(found.length, 1, `${bin}: one ${name} enum`)
      const values = found[0]?.members?.map((m) => m.name) ?? found[0]?.values ?? []
      t.same(values.filter((v) => !(list as readonly (string | undefined)[]).includes(v)), [], `${bin}: every ${name} is known to qmpd`)
    }
  }
})
