// A daemon SIGKILLed while it sets up a pull-mode NBD export, or while one is open: the next
// daemon leaves no scratch node, fleecing job, export or scratch file behind, the graph is the
// original, and a new export works.
import { readdirSync } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import t from 'tap'
import { reapQemusUnder, startChildDaemon, type ChildDaemon } from '../helpers/crash.ts'
import { startTestDaemon } from '../helpers/daemon.ts'
import { makeGuestDisk } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

async function graph(q: (execute: string, args?: unknown) => Promise<any>): Promise<{ nodes: string[]; exports: string[]; jobs: string[] }> {
  const nodes = ((await q('query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string }>).map((n) => n['node-name']).sort()
  const exports = ((await q('query-block-exports')) as Array<{ id: string }>).map((e) => e.id)
  const jobs = ((await q('query-jobs')) as Array<{ id: string }>).map((j) => j.id)
  return { nodes, exports, jobs }
}

function leftovers(vmDir: string): string[] {
  return readdirSync(vmDir).filter((f) => f.startsWith('export-') || f === 'nbd.sock' || f === 'exports.json' || f.endsWith('.tmp'))
}

// Between the transaction and the export, after the first export, and with the export open.
for (const point of ['export-add.scratch-node-vda.after', 'export-add.fleece.after', 'export-add.export-vda.after', 'export-add.record.after']) {
  t.test(`killed at ${point}: the next daemon restores the graph and removes the scratch`, async (t) => {
    const stateDir = t.testdir()
    t.teardown(() => reapQemusUnder(stateDir))
    const vmDir = join(stateDir, 'vms', 'x')
    // After the daemon made its store: a VM directory without one would make it refuse to start.
    const child: ChildDaemon = await startChildDaemon(t, stateDir, { point })
    await mkdir(vmDir, { recursive: true })
    await makeGuestDisk(join(vmDir, 'disk0.qcow2'), { format: 'qcow2', sizeMiB: 16, boot: true })
    const defined = await child.api('POST', '/v1/vms', { name: 'x', memoryMiB: 32, machine: 'q35', disks: [{ id: 'vda', file: join(vmDir, 'disk0.qcow2'), format: 'qcow2', bus: 'virtio' }] })
    t.equal(defined.status, 201, 'defined')
    t.equal((await child.api('POST', '/v1/vms/x/start?wait=true&timeoutSec=120')).status, 200, 'started')
    const cq = async (execute: string, args?: unknown) => (await child.api('POST', '/v1/vms/x/qmp', { execute, ...(args ? { arguments: args } : {}) })).body.return
    const original = await graph(cq)
    await child.api('POST', '/v1/vms/x/exports', {}).catch(() => undefined)
    const end = await child.ended(30_000)
    t.equal(end?.signal, 'SIGKILL', `the daemon died at ${point}`)

    const td = await startTestDaemon(t, { stateDir })
    t.equal((await td.api('GET', '/v1/vms/x')).body.state, 'running', 'the guest still runs')
    const q = async (execute: string, args?: unknown) => (await td.api('POST', '/v1/vms/x/qmp', { execute, ...(args ? { arguments: args } : {}) })).body.return
    t.same(await graph(q), original, 'the graph is the original: no scratch node, export or job')
    t.same(leftovers(vmDir), [], 'no scratch file, socket or record is left')
    t.same((await td.api('GET', '/v1/vms/x/exports')).body.exports, [], 'no export is listed')
    const check = await td.api('GET', '/v1/vms/x/check')
    t.equal(check.body.ok, true, `the check finds nothing wrong (${JSON.stringify(check.body.problems)})`)
    const again = await td.api('POST', '/v1/vms/x/exports', {})
    t.equal(again.status, 201, 'a new export works')
    t.equal((await td.api('DELETE', `/v1/vms/x/exports/${again.body.id}`)).status, 204, 'and ends')
    t.same(await graph(q), original, 'the graph is the original again')
  })
}
