import { mkdirSync, rmSync, symlinkSync } from 'node:fs'
import t from 'tap'
import { PathPolicy } from '../../src/images/paths.ts'

t.test('confines paths to the state dir and allowed dirs', async (t) => {
  const root = t.testdir({ state: { vms: {} }, extra: {}, outside: {} })
  const p = new PathPolicy(`${root}/state`, [`${root}/extra`])
  const vmDir = p.vmDir('a')
  t.equal(p.resolve('disk.qcow2', vmDir), `${root}/state/vms/a/disk.qcow2`)
  t.equal(p.resolve(`${root}/extra/x.qcow2`, vmDir), `${root}/extra/x.qcow2`)
  t.throws(() => p.resolve(`${root}/outside/x`, vmDir), { code: 'INVALID_PATH' })
  t.throws(() => p.resolve('../b/disk', vmDir), { code: 'INVALID_PATH' })
  t.throws(() => p.resolve('a/../../x', vmDir), { code: 'INVALID_PATH' })
  t.throws(() => p.resolve('x\0y', vmDir), { code: 'INVALID_PATH' })
  t.throws(() => p.resolve('', vmDir), { code: 'INVALID_PATH' })
  t.throws(() => p.resolve(`${root}/state`, vmDir), { code: 'INVALID_PATH' }, 'the root itself is not a file')
  t.throws(() => p.resolve('/etc/passwd', vmDir), { code: 'INVALID_PATH' })
})

t.test('a symlink inside an allowed dir cannot lead out of it', async (t) => {
  const root = t.testdir({ state: {}, outside: {} })
  mkdirSync(`${root}/state/vms`, { recursive: true })
  symlinkSync(`${root}/outside`, `${root}/state/escape`)
  const p = new PathPolicy(`${root}/state`)
  t.throws(() => p.resolve(`${root}/state/escape/x.qcow2`, p.vmDir('a')), { code: 'INVALID_PATH' })
})

t.test('a dangling symlink is judged by where it points', async (t) => {
  const root = t.testdir({ state: {}, outside: {} })
  mkdirSync(`${root}/state/vms/a`, { recursive: true })
  symlinkSync(`${root}/outside/new.qcow2`, `${root}/state/vms/a/out.qcow2`)
  symlinkSync(`${root}/state/vms/a/later.qcow2`, `${root}/state/vms/a/in.qcow2`)
  symlinkSync(`${root}/state/vms/a/loop2`, `${root}/state/vms/a/loop1`)
  symlinkSync(`${root}/state/vms/a/loop1`, `${root}/state/vms/a/loop2`)
  const p = new PathPolicy(`${root}/state`)
  t.throws(() => p.resolve('out.qcow2', p.vmDir('a')), { code: 'INVALID_PATH' }, 'points outside: refused, although the target does not exist yet')
  t.equal(p.resolve('in.qcow2', p.vmDir('a')), `${root}/state/vms/a/in.qcow2`, 'points inside: allowed')
  t.equal(p.resolve('loop1', p.vmDir('a')), `${root}/state/vms/a/loop1`, 'a symlink loop ends (the file cannot be opened anyway)')
})

t.test('a relative dangling symlink is followed from its real directory; odd paths fail as INVALID_PATH or pass, never crash', async (t) => {
  const root = t.testdir({ state: { 'file.txt': 'x' } })
  mkdirSync(`${root}/state/a/b`, { recursive: true })
  symlinkSync(`${root}/state`, `${root}/state/a/b/sub`)
  // Seen from state/a/b/sub/ (really state/), ../../x is outside the root.
  symlinkSync('../../x', `${root}/state/l`)
  const p = new PathPolicy(`${root}/state`)
  t.throws(() => p.resolve(`${root}/state/a/b/sub/l`, p.vmDir('a')), { code: 'INVALID_PATH' }, 'judged where the kernel would create the file')
  t.equal(p.resolve(`${root}/state/file.txt/x.qcow2`, p.vmDir('a')), `${root}/state/file.txt/x.qcow2`, 'under a regular file: inside the root (creating it fails later), no ENOTDIR crash')
})

t.test('the resolved (stored) form is checked against PATH_MAX and NAME_MAX', async (t) => {
  const root = t.testdir({ state: { vms: {} } })
  const p = new PathPolicy(`${root}/state`)
  const vmDir = p.vmDir('a')
  // 4096 characters is what the request schema lets through; made absolute it is over the limit.
  const long = Array.from({ length: 1024 }, () => 'abc').join('/')
  t.equal(long.length, 4095)
  t.throws(() => p.resolve(long, vmDir, 'disks[0].file'), { code: 'INVALID_PATH', message: /bytes long as an absolute path; the limit is 4095/ })
  const fits = 'x/'.repeat(Math.floor((4095 - vmDir.length - 1 - 1) / 2)).slice(0, -1)
  t.ok(p.resolve(fits, vmDir).length <= 4095, 'a path that fits once absolute passes')
  t.throws(() => p.resolve('a'.repeat(256), vmDir), { code: 'INVALID_PATH', message: /component of 256 bytes/ })
  t.equal(p.resolve('a'.repeat(255), vmDir), `${vmDir}/${'a'.repeat(255)}`, '255 bytes is the largest component')
  t.throws(() => p.resolve('é'.repeat(128), vmDir), { code: 'INVALID_PATH', message: /component of 256 bytes/ }, 'counted in bytes, not characters')
})

t.test('confine() judges a stored path again, as it is now', async (t) => {
  const root = t.testdir({ state: { vms: { a: { 'disk.qcow2': 'x' } } }, outside: { 'secret.img': 'y' } })
  const p = new PathPolicy(`${root}/state`)
  const disk = p.resolve('disk.qcow2', p.vmDir('a'))
  t.equal(p.confine(disk), disk, 'inside: passes')
  rmSync(disk)
  symlinkSync(`${root}/outside/secret.img`, disk)
  t.throws(() => p.confine(disk, 'disk vda'), { code: 'INVALID_PATH', message: /disk vda .* outside the allowed directories/ }, 'swapped for a symlink that leads out: refused')
  rmSync(disk)
  symlinkSync(`${root}/outside/new.img`, disk)
  t.throws(() => p.confine(disk), { code: 'INVALID_PATH' }, 'a dangling symlink that leads out: refused (a file created through it would land outside)')
  t.throws(() => p.confine('relative/x'), { code: 'INVALID_PATH', message: /not an absolute path/ })
  t.throws(() => p.confine(`${root}/state/${'x'.repeat(256)}`), { code: 'INVALID_PATH' })
})
