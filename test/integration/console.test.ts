// The serial console on a unix socket qmpd owns: a client connected to console.sock reads the
// Linux guest's serial output while serial.log still gets all of it; GET shows both paths.
import { existsSync, readFileSync } from 'node:fs'
import { connect } from 'node:net'
import { dirname, join } from 'node:path'
import t from 'tap'
import { eventually, op, startTestDaemon } from '../helpers/daemon.ts'
import { ensureLinuxGuest, LINUX_GUEST_READY } from '../helpers/linux-guest.ts'
import { requireQemu } from '../helpers/qemu.ts'
import { shortSocketPath } from '../../src/vm/sockpath.ts'

t.before(() => {
  requireQemu(t)
})

t.test('console.sock carries the guest serial output and serial.log keeps it too', async (t) => {
  const guest = await ensureLinuxGuest()
  const td = await startTestDaemon(t, { config: { allowedDirs: [dirname(guest.kernel)] } })
  const def = await td.api('POST', '/v1/vms', { name: 'con', memoryMiB: 256, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, serialSocket: true })
  t.equal(def.status, 201)
  const dir = join(td.stateDir, 'vms', 'con')
  t.same(def.body.consoles, { serial: { log: join(dir, 'serial.log'), socket: join(dir, 'console.sock') } }, 'GET shows both')
  await op(td, 'con', 'start', { paused: true })
  // Connected while the guest is still paused: nothing it prints is missed.
  let got = ''
  // Test fixture paths are longer than sun_path allows: reach the socket through /proc/self/fd.
  const short = shortSocketPath(join(dir, 'console.sock'))
  t.teardown(short.release)
  const sock = connect(short.path)
  t.teardown(() => void sock.destroy())
  sock.setEncoding('utf8')
  sock.on('data', (s: string) => (got += s))
  await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject))
  await op(td, 'con', 'resume')
  t.ok(await eventually(() => got.includes(LINUX_GUEST_READY), 180_000, 250), 'the console client read the guest\'s ready line')
  const log = join(dir, 'serial.log')
  t.ok(existsSync(log) && readFileSync(log, 'utf8').includes(LINUX_GUEST_READY), 'serial.log has it too')
  t.ok(got.length > 100, `the client got the boot output (${got.length} bytes)`)
})
