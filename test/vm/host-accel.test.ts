// GET /v1/host's accelerator facts come from the same KVM probe VM launches use.
import t from 'tap'
import type { AccelProbe } from '../../src/vm/accel-probe.ts'
import { accelInfo } from '../../src/vm/host-info.ts'

const failed: AccelProbe = { binary: 'q', kvm: { usable: false, reason: '-cpu host: QEMU was killed by SIGABRT' }, ms: 1 }
const works: AccelProbe = { binary: 'q', kvm: { usable: true, cpuModel: 'host', notes: [] }, ms: 1 }

t.test('auto resolves to what the probe found', async (t) => {
  let probed = 0
  const probe = async (b: string): Promise<AccelProbe> => {
    probed++
    t.equal(b, '/usr/bin/qemu-system-x86_64')
    return failed
  }
  const down = await accelInfo({ accel: 'auto', qemuBinary: '/usr/bin/qemu-system-x86_64' }, probe)
  t.same(down, { configured: 'auto', resolved: 'tcg', usable: ['tcg'], kvm: { probed: true, usable: false, reason: failed.kvm.usable ? '' : failed.kvm.reason } })
  t.equal(probed, 1)
  const up = await accelInfo({ accel: 'auto', qemuBinary: 'q' }, async () => works)
  t.same(up, { configured: 'auto', resolved: 'kvm', usable: ['kvm', 'tcg'], kvm: { probed: true, usable: true, cpuModel: 'host' } })
  const explicit = await accelInfo({ accel: 'kvm', qemuBinary: 'q' }, async () => failed)
  t.equal(explicit.resolved, 'kvm', 'an explicit --accel kvm is what VMs ask for, usable or not')
  t.same(explicit.usable, ['tcg'])
})

t.test('--accel tcg does not run the probe and does not claim KVM', async (t) => {
  const info = await accelInfo({ accel: 'tcg', qemuBinary: 'q' }, async () => t.fail('probe run') as never)
  t.same(info.usable, ['tcg'])
  t.match(info.kvm, { probed: false })
})
