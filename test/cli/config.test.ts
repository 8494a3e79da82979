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
