import { execFileSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createServer } from 'node:net'
import t from 'tap'
import { assertCreatable, assertRegularFile, fileKind, openRegularFile } from '../../src/images/files.ts'

t.test('special files are told apart by stat, without opening them', async (t) => {
  const root = t.testdir({ 'file.img': 'x', dir: {} })
  execFileSync('mkfifo', [`${root}/fifo`])
  // A socket's path must fit sun_path (108 bytes): the fixture directory is too deep for it.
  const short = mkdtempSync(join(tmpdir(), 'qmpd-files-'))
  const srv = createServer()
  await new Promise<void>((resolve) => srv.listen(`${short}/sock`, resolve))
  t.teardown(() => new Promise<void>((resolve) => srv.close(() => resolve())).then(() => rmSync(short, { recursive: true, force: true })))
  symlinkSync(`${short}/sock`, `${root}/sock`)
  symlinkSync(`${root}/fifo`, `${root}/to-fifo`)
  symlinkSync(`${root}/gone`, `${root}/dangling`)
  t.equal(fileKind(`${root}/file.img`), 'file')
  t.equal(fileKind(`${root}/dir`), 'directory')
  t.equal(fileKind(`${root}/fifo`), 'fifo')
  t.equal(fileKind(`${root}/to-fifo`), 'fifo', 'a symlink is judged by what it leads to')
  t.equal(fileKind(`${root}/sock`), 'socket')
  t.equal(fileKind('/dev/null'), 'char-device')
  t.equal(fileKind(`${root}/dangling`), 'missing')
  t.equal(fileKind(`${root}/file.img/below`), 'missing', 'ENOTDIR counts as missing')
  t.throws(() => fileKind(`${root}/${'x'.repeat(300)}`, 'disks[0].file'), { code: 'INVALID_PATH', message: /disks\[0\]\.file/ }, 'ENAMETOOLONG is INVALID_PATH, not a 500')

  t.equal(assertRegularFile(`${root}/file.img`), true)
  t.equal(assertRegularFile(`${root}/nope`, 'file', { allowMissing: true }), false)
  t.throws(() => assertRegularFile(`${root}/nope`, 'file'), { code: 'INVALID_PATH', message: /is missing/ })
  for (const [name, what] of [['fifo', 'a FIFO'], ['to-fifo', 'a FIFO'], ['sock', 'a socket'], ['dir', 'a directory']] as const) {
    t.throws(() => assertRegularFile(`${root}/${name}`, 'file', { allowMissing: true }), { code: 'INVALID_PATH', message: new RegExp(`is ${what}; a regular file is needed`) }, name)
  }
  t.throws(() => assertRegularFile('/dev/null', 'file'), { code: 'INVALID_PATH', message: /a character device/ })
})

t.test('a file to be created needs an existing directory, and nothing of another kind in its place', async (t) => {
  const root = t.testdir({ 'file.img': 'x', vm: {} })
  execFileSync('mkfifo', [`${root}/fifo`])
  assertCreatable(`${root}/new.img`)
  t.throws(() => assertCreatable(`${root}/nodir/new.img`, 'file'), { code: 'INVALID_PATH', message: new RegExp(`file: the directory ${root}/nodir does not exist`) })
  t.throws(() => assertCreatable(`${root}/file.img/new.img`, 'file'), { code: 'INVALID_PATH', message: /is a regular file/ })
  t.throws(() => assertCreatable(`${root}/fifo`, 'file'), { code: 'INVALID_PATH', message: /a FIFO/ })
  assertCreatable(`${root}/vm/sub/dir/new.img`, 'f', { mayCreateUnder: `${root}/vm` })
  t.throws(() => assertCreatable(`${root}/other/new.img`, 'f', { mayCreateUnder: `${root}/vm` }), { code: 'INVALID_PATH' }, 'only under the directory qmpd creates')
  writeFileSync(`${root}/vm/plain`, 'x')
  t.throws(() => assertCreatable(`${root}/vm/plain/a/new.img`, 'f', { mayCreateUnder: `${root}/vm` }), { code: 'INVALID_PATH', message: /is a regular file/ })
})

t.test('openRegularFile refuses a FIFO at once instead of blocking a thread on it', async (t) => {
  const root = t.testdir({ 'state.bin': 'QEVM', inside: {} })
  execFileSync('mkfifo', [`${root}/fifo`])
  mkdirSync(`${root}/inside/d`)
  symlinkSync(`${root}/state.bin`, `${root}/inside/d/link`)
  const t0 = performance.now()
  // Five at once: a blocking open() each would hold four libuv threads and the fifth would wait.
  const results = await Promise.allSettled(Array.from({ length: 5 }, () => openRegularFile(`${root}/fifo`, 'file')))
  t.ok(performance.now() - t0 < 1000, `refused in ${Math.round(performance.now() - t0)} ms`)
  for (const r of results) t.match(r, { status: 'rejected', reason: { code: 'INVALID_PATH' } })
  const fh = await openRegularFile(`${root}/inside/d/link`, 'file')
  t.equal((await fh.readFile('utf8')), 'QEVM', 'a symlink to a regular file is followed to its real path')
  await fh.close()
  const seen: string[] = []
  await t.rejects(
    openRegularFile(`${root}/inside/d/link`, 'file', (real) => {
      seen.push(real)
      throw Object.assign(new Error('refused'), { code: 'X' })
    }),
    { message: 'refused' },
    'the check runs on the real path, before the open',
  )
  t.same(seen, [`${root}/state.bin`])
})
