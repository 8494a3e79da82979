// GET /v1/vms with 1,000 stopped VMs defined: paged, chains cached (a warm list runs no qemu-img,
// a changed disk is read again), and /healthz is never stuck behind a running list (before the
// paging and the cache it waited 12 s; the bounds leave room for a loaded 2-core host). Needs qemu-img
// (the VMs are never started).
import { copyFile, mkdir, utimes } from 'node:fs/promises'
import { Agent, request } from 'node:http'
import { join } from 'node:path'
import t from 'tap'
import { QemuImg } from '../../src/images/qemu-img.ts'
import { startTestDaemon } from '../helpers/daemon.ts'
import { onPath } from '../helpers/qemu.ts'

const COUNT = 1000

t.test('1,000 VMs: paged list, cached chains, /healthz not stuck behind a list', async (t) => {
  const where = process.env['CI'] === 'true' ? 'the CI image must provide it' : 'install qemu-utils'
  if (!t.ok(onPath('qemu-img'), `qemu-img is on PATH (${where})`)) return
  const td = await startTestDaemon(t)
  const img = new QemuImg()
  // Every disk is a small qcow2 overlay on one shared base: a two-layer chain per VM.
  const base = join(td.stateDir, 'base.qcow2')
  const overlay = join(td.stateDir, 'overlay.qcow2')
  await img.run(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', base, '1M'])
  await img.run(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', base, '-F', 'qcow2', overlay])
  const names = Array.from({ length: COUNT }, (_, i) => `vm-${String(i).padStart(4, '0')}`)
  const tFiles = performance.now()
  for (const name of names) {
    await mkdir(join(td.stateDir, 'vms', name), { recursive: true })
    await copyFile(overlay, join(td.stateDir, 'vms', name, 'disk.qcow2'))
  }
  const filesMs = performance.now() - tFiles
  const tDefine = performance.now()
  for (const name of names) {
    const res = await td.api('POST', '/v1/vms', { name, memoryMiB: 16, disks: [{ id: 'vda', file: 'disk.qcow2' }] })
    if (res.status !== 201) throw new Error(`define ${name}: ${res.status} ${JSON.stringify(res.body)}`)
  }
  const defineMs = performance.now() - tDefine
  t.pass(`made ${COUNT} disks in ${filesMs.toFixed(0)} ms, defined ${COUNT} VMs through the API in ${defineMs.toFixed(0)} ms`)

  const address = await td.app.listen({ host: '127.0.0.1', port: 0 })
  const port = Number(new URL(address).port)
  const agent = new Agent({ keepAlive: true, maxSockets: 4 })
  t.teardown(() => agent.destroy())
  // The client shares the daemon's event loop: a list's body is parsed only once the /healthz
  // poller has stopped (getRaw), so the test's own JSON.parse never counts as daemon latency.
  const getRaw = (path: string) =>
    new Promise<{ status: number; text: string; ms: number }>((resolve, reject) => {
      const t0 = performance.now()
      const req = request({ host: '127.0.0.1', port, path, agent }, (res) => {
        const chunks: Buffer[] = []
        res.on('data', (d: Buffer) => chunks.push(d))
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8'), ms: performance.now() - t0 }))
      })
      req.setTimeout(120_000, () => req.destroy(new Error(`GET ${path}: no answer`)))
      req.on('error', reject)
      req.end()
    })
  const get = async (path: string) => {
    const r = await getRaw(path)
    return { status: r.status, body: r.text ? JSON.parse(r.text) : undefined, ms: r.ms }
  }
  /** Runs a list while polling /healthz every 10 ms; returns the list and every /healthz latency. */
  const listWhilePolling = async (path: string) => {
    let listing = true
    const latencies: number[] = []
    const poller = (async () => {
      while (listing) {
        const h = await getRaw('/healthz')
        if (h.status !== 200) throw new Error(`/healthz answered ${h.status}`)
        latencies.push(h.ms)
        await new Promise((r) => setTimeout(r, 10))
      }
    })()
    await new Promise((r) => setTimeout(r, 30)) // the poller is running before the list starts
    const raw = await getRaw(path).finally(() => (listing = false))
    await poller
    const list = { status: raw.status, body: JSON.parse(raw.text), ms: raw.ms }
    latencies.sort((a, b) => a - b)
    return { list, latencies, max: latencies.at(-1) ?? Infinity, p50: latencies[Math.floor(latencies.length / 2)] ?? Infinity }
  }

  // Defining ran a view of each VM (the answer of POST), which filled the cache: touch every disk,
  // so the first list below is cold (each disk changed) and must inspect all of them.
  const touched = new Date(Date.now() + 5000)
  for (const name of names) await utimes(join(td.stateDir, 'vms', name, 'disk.qcow2'), touched, touched)
  const before = td.daemon.vms.chainInspections
  const cold = await listWhilePolling(`/v1/vms?limit=${COUNT}`)
  t.equal(cold.list.status, 200)
  t.equal(cold.list.body.vms.length, COUNT, 'limit=1000 lists all of them')
  t.notOk('next' in cold.list.body, 'no next page')
  t.equal(cold.list.body.vms[7].disks[0].chain.length, 2, 'each disk shows its two-layer chain')
  t.equal(cold.list.body.vms[7].disks[0].chain[1].file, base)
  const coldRuns = td.daemon.vms.chainInspections - before
  t.equal(coldRuns, COUNT, 'a cold list inspects each stopped disk once')
  t.ok(cold.latencies.length >= 5, `${cold.latencies.length} /healthz polls during the cold list`)
  t.ok(cold.max < 1000 && cold.p50 < 20, `cold list of ${COUNT} took ${cold.list.ms.toFixed(0)} ms; /healthz meanwhile: max ${cold.max.toFixed(1)} ms, median ${cold.p50.toFixed(1)} ms`)

  const warm = await listWhilePolling(`/v1/vms?limit=${COUNT}`)
  t.equal(warm.list.body.vms.length, COUNT)
  t.equal(td.daemon.vms.chainInspections - before, coldRuns, 'a warm list runs no qemu-img')
  t.same(warm.list.body.vms[7].disks, cold.list.body.vms[7].disks, 'and shows the same chains')
  t.ok(warm.max < 1000 && warm.p50 < 20, `warm list took ${warm.list.ms.toFixed(0)} ms; /healthz meanwhile: max ${warm.max.toFixed(1)} ms, median ${warm.p50.toFixed(1)} ms (${warm.latencies.length} polls)`)

  // Pages: default 100, follow next with ?after=.
  const first = await get('/v1/vms')
  t.equal(first.body.vms.length, 100, 'default page: 100')
  t.equal(first.body.next, 'vm-0099')
  const seen: string[] = []
  let after: string | undefined
  for (let pages = 0; pages < 10; pages++) {
    const page = await get(`/v1/vms?limit=300${after ? `&after=${after}` : ''}`)
    t.equal(page.status, 200)
    seen.push(...page.body.vms.map((v: { name: string }) => v.name))
    after = page.body.next
    if (!after) break
  }
  t.same(seen, names, 'pages of 300 cover every VM once, in name order')
  t.same((await get('/v1/vms?after=vm-0999')).body, { vms: [] }, 'after the last name: empty, no next')
  t.equal((await get('/v1/vms?after=vm-0997&limit=5')).body.vms.length, 2)
  for (const bad of ['limit=0', 'limit=1001', 'limit=x', 'after=bad%20name', 'cursor=1']) t.equal((await get(`/v1/vms?${bad}`)).status, 400, bad)

  // A disk that changes is read again, the others are not.
  const changed = join(td.stateDir, 'vms', 'vm-0005', 'disk.qcow2')
  await img.run(['resize', '-q', '-f', 'qcow2', changed, '2M'])
  const runs = td.daemon.vms.chainInspections
  const one = await get('/v1/vms/vm-0005')
  t.equal(one.body.disks[0].chain[0].virtualSize, 2 * 1024 * 1024, 'the resized disk shows its new size')
  t.equal(td.daemon.vms.chainInspections - runs, 1, 'one inspection: the changed disk')
  const again = await get('/v1/vms?limit=10')
  t.equal(again.body.vms[5].disks[0].chain[0].virtualSize, 2 * 1024 * 1024)
  t.equal(td.daemon.vms.chainInspections - runs, 1, 'the list after it runs none')
})
