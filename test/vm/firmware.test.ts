// UEFI firmware without QEMU: which descriptor findOvmf picks, the argv of a UEFI VM, the NVRAM
// made from the template, and the reserved disk id.
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { QmpdError } from '../../src/errors.ts'
import { QemuImg } from '../../src/images/qemu-img.ts'
import { buildArgv } from '../../src/vm/argv.ts'
import { VmDefinition } from '../../src/vm/definition.ts'
import { ensureNvram, findOvmf, FW_CODE_NODE } from '../../src/vm/firmware.ts'
import { onPath } from '../helpers/qemu.ts'

const descriptor = (code: string, vars: string, features: string[] = []) =>
  JSON.stringify({
    'interface-types': ['uefi'],
    mapping: { device: 'flash', executable: { filename: code, format: 'raw' }, 'nvram-template': { filename: vars, format: 'raw' } },
    targets: [{ architecture: 'x86_64', machines: ['pc-q35-*'] }],
    features,
  })

t.test('findOvmf picks the first x86_64 flash build without SMM or secure boot whose files exist', async (t) => {
  const dir = t.testdir({ 'code.fd': 'c', 'vars.fd': 'v', 'sb-code.fd': 'c' })
  const fw = join(dir, 'fw')
  mkdirSync(fw)
  const missing = (f: () => unknown) => {
    try {
      f()
      return 'no error'
    } catch (err) {
      return err instanceof QmpdError ? err.code : String(err)
    }
  }
  t.equal(missing(() => findOvmf(join(dir, 'nope'))), 'HOST_RESOURCE_MISSING', 'no descriptor directory: OVMF missing')
  t.equal(missing(() => findOvmf(fw)), 'HOST_RESOURCE_MISSING', 'no descriptors')
  writeFileSync(join(fw, '40-secure.json'), descriptor(join(dir, 'sb-code.fd'), join(dir, 'vars.fd'), ['requires-smm', 'secure-boot']))
  writeFileSync(join(fw, '50-gone.json'), descriptor(join(dir, 'no-code.fd'), join(dir, 'vars.fd')))
  writeFileSync(join(fw, '55-broken.json'), '{')
  t.equal(missing(() => findOvmf(fw)), 'HOST_RESOURCE_MISSING', 'only an SMM build and one whose files are gone')
  writeFileSync(join(fw, '60-plain.json'), descriptor(join(dir, 'code.fd'), join(dir, 'vars.fd')))
  t.same(findOvmf(fw), { code: join(dir, 'code.fd'), varsTemplate: join(dir, 'vars.fd'), descriptor: join(fw, '60-plain.json') })
})

t.test('a UEFI VM: code read-only as pflash0, the NVRAM disk as pflash1 without a -device', async (t) => {
  const def = VmDefinition.parse({ name: 'u', firmware: 'uefi', disks: [{ id: 'vda', file: '/x/vda.qcow2' }] })
  const ovmf = { code: '/fw/CODE.fd', varsTemplate: '/fw/VARS.fd', descriptor: '/fw/60.json' }
  const disks = [
    { id: 'vda', file: '/x/vda.qcow2', format: 'qcow2' as const, gen: 0 },
    { id: 'nvram', file: '/x/nvram-e1.qcow2', format: 'qcow2' as const, gen: 1 },
  ]
  const argv = buildArgv(def, { accel: 'tcg', disks, ovmf })
  t.equal(argv[argv.indexOf('-machine') + 1], `q35,pflash0=${FW_CODE_NODE},pflash1=nvram-f1`, 'pflash1 is the NVRAM\'s current top node')
  const blockdevs = argv.flatMap((a, i) => (a === '-blockdev' ? [JSON.parse(argv[i + 1]!)] : []))
  t.same(blockdevs[0], { driver: 'raw', 'node-name': FW_CODE_NODE, 'read-only': true, file: { driver: 'file', filename: '/fw/CODE.fd', 'read-only': true } })
  t.match(blockdevs.find((b) => b['node-name'] === 'nvram-f1'), { driver: 'qcow2', 'read-only': false, file: { filename: '/x/nvram-e1.qcow2' } })
  const devices = argv.flatMap((a, i) => (a === '-device' ? [JSON.parse(argv[i + 1]!)] : []))
  t.same(devices.map((d) => d.id), ['vda'], 'no guest device for the NVRAM')
  t.throws(() => buildArgv(def, { accel: 'tcg', disks }), /needs opts.ovmf/)
  const bios = buildArgv(VmDefinition.parse({ name: 'b' }), { accel: 'tcg', disks: [] })
  t.equal(bios[bios.indexOf('-machine') + 1], 'q35', 'bios VMs are unchanged')
})

t.test('the disk id nvram is reserved', async (t) => {
  const r = VmDefinition.safeParse({ name: 'v', disks: [{ id: 'nvram', file: 'a.qcow2' }] })
  t.notOk(r.success)
  t.match(r.error?.issues[0]?.message, /reserved/)
  t.notOk(VmDefinition.safeParse({ name: 'v', firmware: 'efi' }).success, 'firmware is bios or uefi')
})

t.test('ensureNvram makes a qcow2 copy of the template once, and never replaces a missing overlay', { skip: !onPath('qemu-img') && !process.env['CI'] ? 'qemu-img not on PATH' : false }, async (t) => {
  const dir = t.testdir()
  const template = join(dir, 'VARS.fd')
  writeFileSync(template, Buffer.alloc(64 * 1024, 0xa5))
  const img = new QemuImg()
  const base = join(dir, 'nvram.qcow2')
  const ovmf = { code: '', varsTemplate: template, descriptor: '' }
  t.equal(await ensureNvram(img, [{ id: 'nvram', file: base, format: 'qcow2', gen: 0 }], base, ovmf), true, 'created')
  t.equal(readFileSync(base).subarray(0, 4).toString('latin1'), 'QFI\xfb', 'as qcow2')
  t.notOk(existsSync(`${base}.creating`), 'no temporary file left')
  const info = await img.info(base)
  t.equal(info['virtual-size'], 64 * 1024, 'with the template\'s size')
  t.equal(await ensureNvram(img, [{ id: 'nvram', file: base, format: 'qcow2', gen: 0 }], base, ovmf), false, 'an existing NVRAM is kept')
  const overlay = join(dir, 'nvram-e1.qcow2')
  t.equal(await ensureNvram(img, [{ id: 'nvram', file: overlay, format: 'qcow2', gen: 1 }], base, ovmf), false, 'a missing overlay is not replaced by a blank store')
  t.notOk(existsSync(overlay))
})
