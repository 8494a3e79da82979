// Crash matrix of a push-mode backup (test/helpers/crash-matrix.ts says what is judged): an
// incremental point of a running two-disk guest, the daemon or QEMU killed at each risky step;
// afterwards no target node is left in QEMU, the chain holds only whole points, and the next
// incremental backup is incremental or says why it is full.
import { existsSync, mkdirSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import t from 'tap'
import { runMatrix } from '../helpers/crash-matrix.ts'
import type { Scenario } from '../helpers/crash-scenarios.ts'
import { defineGuestVm, eventually, guestCounters, op } from '../helpers/daemon.ts'

const vm = 'bkc'

const scenario: Scenario = {
  family: 'backup',
  name: 'incremental backup, live',
  vm,
  op: 'backup',
  jobOp: 'backup',
  risky: ['attach', 'transaction', 'finalize', 'record'],
  setup: async (td) => {
    await defineGuestVm(td, vm, { disks: 2, stampMiB: 1 })
    await op(td, vm, 'start')
    await eventually(async () => (await guestCounters(td, vm)).counter > 20)
    mkdirSync(join(td.stateDir, 'vms', vm, 'backups'))
    await op(td, vm, 'backups', { mode: 'full', dir: 'backups' })
    const c = (await guestCounters(td, vm)).counter
    await eventually(async () => (await guestCounters(td, vm)).counter > c + 15)
    return {}
  },
  request: () => ({ method: 'POST', path: `/v1/vms/${vm}/backups`, body: { mode: 'incremental', dir: 'backups' } }),
  after: async (t, td) => {
    const st = (await td.api('GET', `/v1/vms/${vm}`)).body.state
    if (st === 'shutoff' || st === 'crashed') await op(td, vm, 'start')
    const nodes = (await td.api('POST', `/v1/vms/${vm}/qmp`, { execute: 'query-named-block-nodes', arguments: { flat: true } })).body.return as Array<{ 'node-name': string }>
    t.same(nodes.filter((n) => n['node-name'].startsWith('bk-')).map((n) => n['node-name']), [], 'no backup target node is left in QEMU')
    const chain = (await td.api('GET', `/v1/vms/${vm}/backups`)).body.chains[0]
    const recorded = new Set<string>(chain.points.flatMap((p: any) => p.disks.map((d: any) => d.file)))
    for (const f of recorded) t.ok(existsSync(f), `recorded file ${f} exists`)
    const dir = join(td.stateDir, 'vms', vm, 'backups')
    t.same(readdirSync(dir).map((f) => join(dir, f)).filter((f) => !recorded.has(f)), [], 'no backup file outside the recorded points')
    const next = await op(td, vm, 'backups', { mode: 'incremental', dir: 'backups' })
    const point = (next.result as any).point
    if (point.mode === 'full') t.match(point.reason, /\w/, `the next backup is full and says why: ${point.reason}`)
    else t.equal(point.mode, 'incremental', 'the next backup is incremental')
  },
}

runMatrix(t, [scenario])
