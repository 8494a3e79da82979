// The host probe with real QEMU: its guest runs to the end under TCG, a KVM device that does not
// open makes KVM unusable, and the embedded bytes are the assembled probe-guest.S.
import { execFile } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t from 'tap'
import { describeFailure, runAccelProbe, runProbeGuest } from '../../src/vm/accel-probe.ts'
import { PROBE_STAGES, probeGuestSector } from '../../src/vm/probe-guest.ts'
import { onPath, requireQemu } from '../helpers/qemu.ts'

const execFileP = promisify(execFile)
const QEMU = 'qemu-system-x86_64'

t.before(() => {
  requireQemu(t)
})

t.test('the probe guest reaches long mode and writes 64 MiB with paging on under TCG', async (t) => {
  const run = await runProbeGuest(QEMU, 'tcg', 'qemu64', t.testdir(), 30_000)
  t.equal(run.stages, PROBE_STAGES, 'every stage printed, in order')
  t.equal(run.code, 33, 'ended through isa-debug-exit')
  t.ok(run.ok, 'counted as a success')
  t.notOk(run.timedOut)
  t.comment(`probe guest under TCG: ${run.ms} ms`)
})

t.test('a guest that does not finish in time is killed and described as a hang', async (t) => {
  // 1 ms is far less than QEMU needs to start: the run must time out, not succeed.
  const run = await runProbeGuest(QEMU, 'tcg', 'qemu64', t.testdir(), 1)
  t.ok(run.timedOut, 'timed out')
  t.notOk(run.ok)
  t.match(describeFailure('qemu64', { ...run, stages: 'RPEGL' }, 5000), /reached long mode but did not finish a 64 MiB write with paging on within 5 s/)
})

t.test('QEMU refusing the model is reported with its own words', async (t) => {
  const run = await runProbeGuest(QEMU, 'tcg', 'host', t.testdir(), 30_000)
  t.notOk(run.ok)
  t.notOk(run.timedOut)
  t.match(describeFailure('host', run, 5000), /-cpu host: QEMU exited with status 1: .*requires KVM/)
})

t.test('a KVM device that cannot be opened makes KVM unusable, with the reason', async (t) => {
  const p = await runAccelProbe({ binary: QEMU, kvmDevice: join(t.testdir(), 'no-kvm') })
  t.equal(p.kvm.usable, false)
  t.match(p.kvm.usable ? '' : p.kvm.reason, /cannot open .*no-kvm: ENOENT/)
  t.match(p.qemuVersion, /^QEMU emulator version \d+\.\d+/)
})

t.test('the real probe of this host gives a verdict with a reason', async (t) => {
  const p = await runAccelProbe({ binary: QEMU })
  t.comment(`probe of this host in ${p.ms} ms: ${JSON.stringify(p.kvm)}`)
  if (p.kvm.usable) t.match(p.kvm.cpuModel, /^(host|qemu64)$/)
  else t.match(p.kvm.reason, /^(cannot open|-cpu host: )/, 'the reason names what failed first')
  t.ok(p.ms < 2 * 5000 + 5000, 'two runs at most, each bounded by the timeout')
})

t.test('the embedded probe guest is probe-guest.S assembled', async (t) => {
  const embedded = probeGuestSector()
  t.equal(embedded.length, 512)
  // as and ld (binutils) are developer tools, not test dependencies, as nasm is for guest.asm.
  if (!onPath('as') || !onPath('ld')) {
    t.comment('as/ld not on PATH: probe-guest.S not reassembled')
    return
  }
  const dir = t.testdir()
  const src = new URL('../../src/vm/probe-guest.S', import.meta.url).pathname
  await execFileP('as', ['--32', '-o', join(dir, 'g.o'), src])
  await execFileP('ld', ['-m', 'elf_i386', '-Ttext', '0x7c00', '-e', '0x7c00', '--oformat', 'binary', '-o', join(dir, 'g.bin'), join(dir, 'g.o')])
  t.equal((await readFile(join(dir, 'g.bin'))).toString('hex'), embedded.toString('hex'), 'as output equals the embedded bytes')
})
