/** Compile-time checks of the typed QMP API (run by `tsc --noEmit`; never executed). */
import { QmpClient } from '../../src/qmp/index.ts'
const q = new QmpClient()
q.on('event', (ev) => { if (ev.event === 'JOB_STATUS_CHANGE') { const s: string = ev.data.status; void s } })
q.on('STOP', (ev) => { void ev.timestamp })
q.on('disconnected', (c) => c.code)
async function f() {
  const st = await q.execute('query-status'); const r: boolean = st.running; void r
  await q.execute('query-named-block-nodes')
  await q.execute('query-named-block-nodes', { flat: true })
  await q.execute('blockdev-snapshot-sync', { 'node-name': 'a', 'snapshot-file': '/x' })
  await q.execute('transaction', { actions: [{ type: 'blockdev-snapshot', data: { node: 'a', overlay: 'b' } }] })
  // @ts-expect-error missing args
  await q.execute('blockdev-snapshot-sync')
  // @ts-expect-error bad arg
  await q.execute('query-status', { x: 1 })
  // @ts-expect-error unknown command
  await q.execute('bogus')
  await q.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'o', file: 'f', backing: null })
  await q.execute('query-status', undefined, { timeoutMs: 5 })
  const e = await q.waitForEvent('BLOCK_JOB_READY', { filter: (e) => e.data.device === 'x' }); void e.data.len
  for await (const ev of q.events({ names: ['STOP', 'RESUME'] })) { const n: 'STOP' | 'RESUME' = ev.event; void n }
  const h: string = await q.hmp('info status'); void h
}
void f
