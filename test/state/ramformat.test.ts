// parseStateFormat on the configuration sections QEMU 7.2 and 10.0 write (bytes taken from real files).
import t from 'tap'
import { parseStateFormat } from '../../src/state/ramformat.ts'

const bytes = (s: string): Buffer => Buffer.from(s, 'latin1')

t.test('a QEMU 10.0 mapped-ram file needs mapped-ram', async (t) => {
  const head = bytes('QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0bpc-q35-10.0\x05\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x0amapped-ram\x01\x00\x00\x00\x01\x03ram')
  t.same(parseStateFormat(head), { format: 'mapped-ram', capabilities: ['mapped-ram'] })
})

t.test('a QEMU 7.2 stream (machine type, no capabilities) is a stream', async (t) => {
  const head = bytes('QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x0apc-q35-7.2\x01\x00\x00\x00\x01\x03ram')
  t.same(parseStateFormat(head), { format: 'stream', capabilities: [] })
})

t.test('other capabilities and the fixed-size subsections before them are read past', async (t) => {
  const head = bytes('QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x02pc\x05\x1econfiguration/target-page-bits\x00\x00\x00\x01\x00\x00\x00\x0c'
    + '\x05\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x02\x0fx-ignore-shared\x0amapped-ram\x00')
  t.same(parseStateFormat(head), { format: 'mapped-ram', capabilities: ['x-ignore-shared', 'mapped-ram'] })
})

t.test('an unknown subsection, a stream without configuration, or a cut header read as a stream', async (t) => {
  t.equal(parseStateFormat(bytes('QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x02pc\x05\x10configuration/xx\x00\x00\x00\x01\x0amapped-ram')).format, 'stream')
  t.equal(parseStateFormat(bytes('QEVM\x00\x00\x00\x03\x01\x00\x00\x00\x01')).format, 'stream')
  t.same(parseStateFormat(bytes('QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x02pc\x05\x1aconfiguration/capabilities\x00\x00')), { format: 'stream', capabilities: [] })
})
