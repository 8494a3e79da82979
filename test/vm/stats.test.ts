// GET /v1/vms/{vm}/stats while QEMU quits: a QMP connection lost mid-request means the VM stopped,
// not a 502 (the API fuzz met it: a stats request racing a stop); other QMP errors still fail.
import t from 'tap'
import { QmpDisconnectedError, QmpdError } from '../../src/errors.ts'
import { vmStats, type VmStatsDeps } from '../../src/vm/stats.ts'

function deps(fail: Error): VmStatsDeps {
  const rec = {
    name: 'v',
    createdAt: '2026-01-01T00:00:00.000Z',
    runtime: { state: 'running', pid: process.pid, qmpSocket: '/x', disks: [{ id: 'vda', file: '/x/a', format: 'qcow2', gen: 0 }], createdFiles: [] },
  }
  const qmp = { execute: async () => Promise.reject(fail) }
  return {
    vms: { record: () => rec, qmp: () => qmp } as unknown as VmStatsDeps['vms'],
    jobs: { list: () => [] } as unknown as VmStatsDeps['jobs'],
    snapshotFiles: () => [],
    vmDir: () => '/nonexistent',
  }
}

t.test('a connection lost mid-request answers null disks', async (t) => {
  const s = await vmStats(deps(new QmpDisconnectedError('query-blockstats: QMP connection lost before the reply', {})), 'v')
  t.equal(s.disks, null)
  t.ok(s.cpuSeconds !== null, 'the process itself (here this test) is still read')
})

t.test('another QMP error is not swallowed', async (t) => {
  await t.rejects(vmStats(deps(new QmpdError('QMP_COMMAND_FAILED', 'query-blockstats: boom', {})), 'v'), { code: 'QMP_COMMAND_FAILED' })
})
