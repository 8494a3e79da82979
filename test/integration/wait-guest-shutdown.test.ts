// GET /v1/vms/{vm}/wait across a shutdown the guest itself makes: the Linux test guest powers off
// (busybox poweroff -f, run through its own guest agent), QEMU exits, and the long-poll answers
// shutoff with the exit record, as a scheduler's WaitTask needs.
import { readFileSync } from 'node:fs'
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

/** Sends one command to the guest agent's socket (the test's own client: qmpd's never runs guest-exec). */
function qga(path: string, cmd: object): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(path)
    let got = ''
    s.setEncoding('utf8')
    s.on('data', (d: string) => {
      got += d
      if (got.includes('\n')) {
        s.destroy()
        resolve(got)
      }
    })
    s.once('error', reject)
    // The guest may power off before the agent's answer is out: the socket closes then.
    s.once('close', () => resolve(got))
    s.once('connect', () => s.write(JSON.stringify(cmd) + '\n'))
  })
}

t.test('a guest-initiated poweroff answers a wait for shutoff with the exit', async (t) => {
  const guest = await ensureLinuxGuest()
  const td = await startTestDaemon(t, { config: { allowedDirs: [dirname(guest.kernel)] } })
  const def = await td.api('POST', '/v1/vms', { name: 'lin', memoryMiB: 256, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, guestAgent: true })
  t.equal(def.status, 201)
  const dir = join(td.stateDir, 'vms', 'lin')
  await op(td, 'lin', 'start')
  t.ok(await eventually(() => readFileSync(join(dir, 'serial.log'), 'utf8').includes(LINUX_GUEST_READY), 180_000, 250), 'the Linux guest booted')
  const waiting = td.api('GET', '/v1/vms/lin/wait?state=shutoff,crashed&timeoutSec=120')
  const sent = Date.now()
  const short = shortSocketPath(join(dir, 'qga.sock'))
  t.teardown(short.release)
  // A second later, so the agent's answer is out before the guest goes.
  const reply = await qga(short.path, { execute: 'guest-exec', arguments: { path: '/bin/busybox', arg: ['sh', '-c', 'sleep 1; busybox poweroff -f'] } })
  t.match(reply, /"return"/, `the agent started poweroff: ${reply.trim()}`)
  const w = (await waiting).body
  t.match(w, { state: 'shutoff', timedOut: false }, 'the wait answered shutoff, not crashed')
  t.ok(w.exit && Date.parse(w.exit.at) >= sent - 1000, 'with the exit record of this shutdown')
  t.equal(w.exit.signal, null, 'QEMU exited by itself, not by a signal')
  t.match(w.reason ?? '', /guest/i, `the reason says the guest shut down: ${w.reason}`)
})
