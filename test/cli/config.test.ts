import { availableParallelism } from 'node:os'
import t from 'tap'
import { makeConfig, parseCount } from '../../src/config.ts'

t.test('parallelDiskSnapshots: twice the CPUs by default, else from the environment or the caller', async (t) => {
  t.equal(makeConfig({ stateDir: '/tmp/x' }, {}).parallelDiskSnapshots, 2 * availableParallelism())
  t.equal(makeConfig({ stateDir: '/tmp/x' }, { QMPD_PARALLEL_DISK_SNAPSHOTS: '3' }).parallelDiskSnapshots, 3)
  t.equal(makeConfig({ stateDir: '/tmp/x', parallelDiskSnapshots: 7 }, { QMPD_PARALLEL_DISK_SNAPSHOTS: '3' }).parallelDiskSnapshots, 7)
  for (const bad of ['0', '-1', '1.5', 'many', '2000']) {
    t.throws(() => makeConfig({ stateDir: '/tmp/x' }, { QMPD_PARALLEL_DISK_SNAPSHOTS: bad }), /QMPD_PARALLEL_DISK_SNAPSHOTS must be an integer from 1 to 1024/, `refuses ${bad}`)
  }
  t.equal(parseCount(undefined, 'x'), undefined)
  t.equal(parseCount('', 'x'), undefined)
})

t.test('qmpPassthrough: off by default, on from QMPD_QMP_PASSTHROUGH or the caller; qmpAllow from QMPD_QMP_ALLOW', async (t) => {
  t.equal(makeConfig({ stateDir: '/tmp/x' }, {}).qmpPassthrough, false, 'off by default')
  t.same(makeConfig({ stateDir: '/tmp/x' }, {}).qmpAllow, [])
  for (const on of ['1', 'true', 'on', 'YES']) t.equal(makeConfig({ stateDir: '/tmp/x' }, { QMPD_QMP_PASSTHROUGH: on }).qmpPassthrough, true, on)
  for (const off of ['0', 'false', 'off', 'no']) t.equal(makeConfig({ stateDir: '/tmp/x' }, { QMPD_QMP_PASSTHROUGH: off }).qmpPassthrough, false, off)
  t.throws(() => makeConfig({ stateDir: '/tmp/x' }, { QMPD_QMP_PASSTHROUGH: 'maybe' }), /QMPD_QMP_PASSTHROUGH must be 1 or 0/)
  t.equal(makeConfig({ stateDir: '/tmp/x', qmpPassthrough: false }, { QMPD_QMP_PASSTHROUGH: '1' }).qmpPassthrough, false, 'the caller wins')
  t.same(makeConfig({ stateDir: '/tmp/x' }, { QMPD_QMP_ALLOW: 'migrate, block-job-*,,*' }).qmpAllow, ['migrate', 'block-job-*', '*'])
  for (const bad of ['rm -rf /', 'a*b', '**', '-x', 'exec:touch']) {
    t.throws(() => makeConfig({ stateDir: '/tmp/x' }, { QMPD_QMP_ALLOW: bad }), { code: 'INVALID_INPUT', message: /bad QMP allow-list entry/ }, `refuses ${bad}`)
  }
})
