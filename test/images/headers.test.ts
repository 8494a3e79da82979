import { execFileSync } from 'node:child_process'
import { mkdirSync, rmSync, writeFileSync } from 'node:fs'
import t, { type Test } from 'tap'
import { checkChain, readQcow2Header } from '../../src/images/headers.ts'
import { PathPolicy } from '../../src/images/paths.ts'
import { QemuImg } from '../../src/images/qemu-img.ts'
import { onPath } from '../helpers/qemu.ts'

// qemu-img only (no QEMU process): the images are real, made by the qemu-img the daemon uses.
t.ok(onPath('qemu-img'), 'qemu-img is on PATH (needed by this test; install qemu-utils)')

const img = (...args: string[]): string => execFileSync('qemu-img', args, { encoding: 'utf8' })

function setup(t: Test): { root: string; vm: string; out: string; p: PathPolicy; confine: (f: string, field: string) => void } {
  const root = t.testdir({ state: { vms: { a: {} } }, outside: {} })
  const p = new PathPolicy(`${root}/state`)
  return { root, vm: p.vmDir('a'), out: `${root}/outside`, p, confine: (f, field) => void p.confine(f, field) }
}

t.test('a chain of three inside the roots is walked to the bottom, as QEMU resolves it', async (t) => {
  const { vm, confine } = setup(t)
  img('create', '-q', '-f', 'raw', `${vm}/base.raw`, '1M')
  img('create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', `${vm}/mid.qcow2`)
  mkdirSync(`${vm}/top`)
  img('create', '-q', '-f', 'qcow2', '-b', '../mid.qcow2', '-F', 'qcow2', `${vm}/top/top.qcow2`)
  t.same(await readQcow2Header(`${vm}/top/top.qcow2`), { backing: '../mid.qcow2', backingFormat: 'qcow2' })
  const layers = await checkChain(`${vm}/top/top.qcow2`, 'qcow2', confine, 'disks[0].file')
  t.same(layers.map((l) => [l.file, l.format]), [
    [`${vm}/top/top.qcow2`, 'qcow2'],
    [`${vm}/mid.qcow2`, 'qcow2'],
    [`${vm}/base.raw`, 'raw'],
  ])
  t.same((await checkChain(`${vm}/top/top.qcow2`, 'probe', confine)).length, 3, 'probing the top finds the same chain')
  t.same(await checkChain(`${vm}/none.qcow2`, 'qcow2', confine), [], 'a missing top: nothing to check (QEMU reports it)')
})

t.test('a backing file outside the roots is refused, named absolute or relative, at any depth', async (t) => {
  const { vm, out, confine } = setup(t)
  img('create', '-q', '-f', 'raw', `${out}/secret.raw`, '1M')
  img('create', '-q', '-f', 'qcow2', '-b', `${out}/secret.raw`, '-F', 'raw', `${vm}/abs.qcow2`)
  await t.rejects(checkChain(`${vm}/abs.qcow2`, 'qcow2', confine, 'disks[0].file'), { code: 'INVALID_PATH', message: /disks\[0\]\.file \(backing file .*secret\.raw, layer 1\) .* outside the allowed directories/ })
  img('create', '-q', '-f', 'qcow2', '-b', '../../../outside/secret.raw', '-F', 'raw', `${vm}/rel.qcow2`)
  await t.rejects(checkChain(`${vm}/rel.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH' }, 'a relative name with .. leading out')
  // Three layers, the bottom one outside.
  img('create', '-q', '-f', 'qcow2', '-b', `${out}/secret.raw`, '-F', 'raw', `${vm}/l1.qcow2`)
  img('create', '-q', '-f', 'qcow2', '-b', `${vm}/l1.qcow2`, '-F', 'qcow2', `${vm}/l2.qcow2`)
  img('create', '-q', '-f', 'qcow2', '-b', `${vm}/l2.qcow2`, '-F', 'qcow2', `${vm}/l3.qcow2`)
  await t.rejects(checkChain(`${vm}/l3.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH', message: /layer 3/ })
  t.equal((await checkChain(`${vm}/l3.qcow2`, 'qcow2')).length, 4, 'without a policy only the file kinds are checked')
})

t.test('json:, protocols, data files outside, FIFOs, loops and foreign formats are refused', async (t) => {
  const { vm, out, confine } = setup(t)
  img('create', '-q', '-f', 'qcow2', '-u', '-b', 'json:{"driver":"file","filename":"/etc/passwd"}', '-F', 'raw', `${vm}/json.qcow2`, '1M')
  await t.rejects(checkChain(`${vm}/json.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH', message: /not a plain file path/ })
  img('create', '-q', '-f', 'qcow2', '-u', '-b', 'nbd://127.0.0.1:10809/x', '-F', 'raw', `${vm}/nbd.qcow2`, '1M')
  await t.rejects(checkChain(`${vm}/nbd.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH', message: /not a plain file path/ })
  img('create', '-q', '-f', 'qcow2', '-o', `data_file=${out}/data.raw`, `${vm}/data.qcow2`, '1M')
  t.match(await readQcow2Header(`${vm}/data.qcow2`), { dataFile: `${out}/data.raw` })
  await t.rejects(checkChain(`${vm}/data.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH', message: /external data file/ })
  // Inside the roots too, and relative: QEMU resolves a data file from its working directory,
  // not the image's, so no check of the name could say what it opens.
  img('create', '-q', '-f', 'qcow2', '-o', 'data_file=inside.raw', `${vm}/data-rel.qcow2`, '1M')
  await t.rejects(checkChain(`${vm}/data-rel.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH', message: /external data file/ })
  execFileSync('mkfifo', [`${vm}/fifo`])
  img('create', '-q', '-f', 'qcow2', '-u', '-b', `${vm}/fifo`, '-F', 'raw', `${vm}/onfifo.qcow2`, '1M')
  const t0 = performance.now()
  await t.rejects(checkChain(`${vm}/onfifo.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH', message: /a FIFO/ })
  await t.rejects(checkChain(`${vm}/fifo`, 'qcow2', confine), { code: 'INVALID_PATH', message: /a FIFO/ })
  t.ok(performance.now() - t0 < 1000, 'FIFOs are refused without blocking on them')
  img('create', '-q', '-f', 'qcow2', `${vm}/x.qcow2`, '1M')
  img('create', '-q', '-f', 'qcow2', '-b', `${vm}/x.qcow2`, '-F', 'qcow2', `${vm}/y.qcow2`)
  img('rebase', '-q', '-u', '-f', 'qcow2', '-b', `${vm}/y.qcow2`, '-F', 'qcow2', `${vm}/x.qcow2`)
  await t.rejects(checkChain(`${vm}/y.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH', message: /loops/ })
  img('create', '-q', '-f', 'vmdk', `${vm}/v.vmdk`, '1M')
  img('create', '-q', '-f', 'qcow2', '-b', `${vm}/v.vmdk`, '-F', 'vmdk', `${vm}/onvmdk.qcow2`)
  await t.rejects(checkChain(`${vm}/onvmdk.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH', message: /format vmdk is not supported/ })
  writeFileSync(`${vm}/plain.raw`, Buffer.alloc(4096))
  t.same((await checkChain(`${vm}/plain.raw`, 'raw', confine)).map((l) => l.format), ['raw'], 'raw: no header is read')
})

t.test('QemuImg with a policy checks the chain before it runs qemu-img', async (t) => {
  const { vm, out, confine } = setup(t)
  const q = new QemuImg('qemu-img', confine)
  img('create', '-q', '-f', 'raw', `${out}/secret.raw`, '1M')
  img('create', '-q', '-f', 'qcow2', '-b', `${out}/secret.raw`, '-F', 'raw', `${vm}/bad.qcow2`)
  await t.rejects(q.chain(`${vm}/bad.qcow2`, { forceShare: true }), { code: 'INVALID_PATH' }, 'chain')
  await t.rejects(q.info(`${vm}/bad.qcow2`), { code: 'INVALID_PATH' }, 'info')
  await t.rejects(q.create(`${vm}/over.qcow2`, 'qcow2', { backing: { file: `${vm}/bad.qcow2`, format: 'qcow2' } }), { code: 'INVALID_PATH' }, 'create on it')
  await t.rejects(q.create(`${out}/new.qcow2`, 'qcow2', { sizeBytes: 1 << 20 }), { code: 'INVALID_PATH' }, 'create outside')
  await t.rejects(q.snapshot('create', `${vm}/bad.qcow2`, 's1'), { code: 'INVALID_PATH' }, 'snapshot')
  await t.rejects(q.rebase(`${vm}/bad.qcow2`, null), { code: 'INVALID_PATH' }, 'rebase')
  execFileSync('mkfifo', [`${vm}/fifo.qcow2`])
  const t0 = performance.now()
  await t.rejects(q.chain(`${vm}/fifo.qcow2`), { code: 'INVALID_PATH', message: /a FIFO/ })
  t.ok(performance.now() - t0 < 1000, `a FIFO is refused at once (${Math.round(performance.now() - t0)} ms), qemu-img would block on it`)
  rmSync(`${vm}/fifo.qcow2`)
  // A raw disk whose guest wrote a vmdk descriptor naming an outside file: qemu-img would probe it as vmdk.
  writeFileSync(`${vm}/guest.raw`, `# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 2048 FLAT "${out}/secret.raw" 0\n`)
  t.equal(JSON.parse(img('info', '--output=json', `${vm}/guest.raw`)).format, 'vmdk', 'left to probe, qemu-img takes it for vmdk (and opens its extent)')
  t.same((await q.chain(`${vm}/guest.raw`)).map((l) => l.format), ['raw'], 'QemuImg passes the format it checked (-f): never probed')
  t.equal((await q.info(`${vm}/guest.raw`)).format, 'raw')
  await q.create(`${vm}/good.qcow2`, 'qcow2', { sizeBytes: 1 << 20 })
  t.equal((await q.chain(`${vm}/good.qcow2`))[0]!.format, 'qcow2', 'a good image passes')
})

t.test('header extensions are read to their end however many there are, and a list that runs off is refused', async (t) => {
  const { vm, confine } = setup(t)
  img('create', '-q', '-f', 'qcow2', `${vm}/base.qcow2`, '1M')
  img('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', `${vm}/top.qcow2`)
  // Rewrite top's extension area: 300 unknown extensions, then a backing-format extension naming
  // vmdk, then END. A reader that stops counting early misses the format and probes the backing
  // file (qcow2 magic: accepted); QEMU reads them all and would open the backing file as vmdk.
  const { openSync, readSync, writeSync, closeSync } = await import('node:fs')
  const fd = openSync(`${vm}/top.qcow2`, 'r+')
  const head = Buffer.alloc(104)
  readSync(fd, head, 0, 104, 0)
  const extStart = head.readUInt32BE(100)
  const backingOffset = Number(head.readBigUInt64BE(8))
  const backingName = Buffer.alloc(head.readUInt32BE(16))
  readSync(fd, backingName, 0, backingName.length, backingOffset)
  const exts: Buffer[] = []
  for (let i = 0; i < 300; i++) exts.push(Buffer.from([0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0]))
  const fmt = Buffer.alloc(16)
  fmt.writeUInt32BE(0xe2792aca, 0)
  fmt.writeUInt32BE(4, 4)
  fmt.write('vmdk', 8)
  exts.push(fmt, Buffer.alloc(8))
  const area = Buffer.concat(exts)
  const newBacking = extStart + area.length
  writeSync(fd, area, 0, area.length, extStart)
  writeSync(fd, backingName, 0, backingName.length, newBacking)
  const off = Buffer.alloc(8)
  off.writeBigUInt64BE(BigInt(newBacking))
  writeSync(fd, off, 0, 8, 8)
  closeSync(fd)
  t.match(await readQcow2Header(`${vm}/top.qcow2`), { backing: 'base.qcow2', backingFormat: 'vmdk' }, 'the 301st extension is read')
  await t.rejects(checkChain(`${vm}/top.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH', message: /format vmdk is not supported/ })
  // The END extension removed: the list runs into the backing file name and past it.
  const fd2 = openSync(`${vm}/top.qcow2`, 'r+')
  writeSync(fd2, Buffer.from([0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0]), 0, 8, newBacking - 8)
  closeSync(fd2)
  await t.rejects(readQcow2Header(`${vm}/top.qcow2`), { code: 'INVALID_PATH', message: /header extension/ })
})

t.test('a file declared qcow2 without the qcow2 magic is refused, so nothing probes it', async (t) => {
  const { vm, out, confine } = setup(t)
  // A raw file holding a vmdk descriptor whose extent is outside: qemu-img snapshot (no -f in
  // 7.2) would probe it as vmdk and open the extent.
  writeFileSync(`${out}/extent`, Buffer.alloc(1024 * 1024))
  writeFileSync(`${vm}/liar.qcow2`, `# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 2048 FLAT "${out}/extent" 0\n`)
  await t.rejects(checkChain(`${vm}/liar.qcow2`, 'qcow2', confine), { code: 'INVALID_PATH', message: /not a qcow2 image/ })
  await t.rejects(new QemuImg('qemu-img', confine).snapshot('create', `${vm}/liar.qcow2`, 's1'), { code: 'INVALID_PATH' })
})
