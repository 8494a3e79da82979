// A full state directory (a small tmpfs, filled to the last byte): the daemon stays up, a job
// whose store write fails answers 507 DISK_FULL, pause and resume work, stop and force stop still end their QEMUs, the
// exits are written to the store once there is room again, and the next daemon starts the VMs.
import { execFileSync } from 'node:child_process'
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import t, { type Test } from 'tap'
import { VmRepo } from '../../src/store/vms.ts'
import { isAlive } from '../../src/vm/proc.ts'
import { eventually, op, startTestDaemon, type TestDaemon } from '../helpers/daemon.ts'
import { makeGuestDisk } from '../helpers/guest.ts'
import { requireQemu } from '../helpers/qemu.ts'

t.before(() => {
  requireQemu(t)
})

/**
 * Mounts a tmpfs of `sizeMiB` on a fresh directory outside the test directory (tap removes that
 * before late teardowns run) and unmounts it at teardown, after the daemons' own teardowns (tap
 * runs those first: they are registered later). Needs root, as CI runs: a mount that fails fails
 * the test under CI=true, and skips it elsewhere.
 */
function smallTmpfs(t: Test, sizeMiB: number): string | undefined {
  const dir = mkdtempSync(join(tmpdir(), 'qmpd-full-'))
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m,mode=0750`, 'tmpfs', dir], { stdio: 'pipe' })
  } catch (err) {
    const why = `cannot mount a ${sizeMiB} MiB tmpfs on ${dir} (needs root): ${String((err as { stderr?: Buffer }).stderr ?? err).trim()}`
    if (process.env['CI'] === 'true') t.fail(why)
    else void t.skip(why, () => {})
    rmSync(dir, { recursive: true, force: true })
    return undefined
  }
  t.teardown(() => {
    try {
      execFileSync('umount', [dir], { stdio: 'pipe' })
    } catch {
      execFileSync('umount', ['-l', dir], { stdio: 'pipe' })
    }
    rmSync(dir, { recursive: true, force: true })
  })
  return dir
}

/** Fills the filesystem of `dir` to the last block with one file; returns its path. */
function fill(dir: string): string {
  const file = join(dir, 'filler')
  const fd = openSync(file, 'w')
  try {
    for (const size of [1024 * 1024, 4096, 512, 1]) {
      const buf = Buffer.alloc(size, 0x5a)
      for (;;) {
        try {
          writeSync(fd, buf)
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENOSPC') break
          throw err
        }
      }
    }
  } finally {
    closeSync(fd)
  }
  return file
}

/** Defines a counting guest whose disk lies outside the state directory (in `diskDir`, an --allow-dir). */
async function defineOutside(td: TestDaemon, name: string, diskDir: string): Promise<void> {
  const file = join(diskDir, `${name}.qcow2`)
  await makeGuestDisk(file, { format: 'qcow2', sizeMiB: 16, boot: true })
  const res = await td.api('POST', '/v1/vms', { name, memoryMiB: 32, disks: [{ id: 'vda', file, format: 'qcow2' }] })
  if (res.status !== 201) throw new Error(`define ${name}: ${res.status} ${JSON.stringify(res.body)}`)
}

t.test('a full state directory: 507 DISK_FULL, the daemon stays up, stop and force stop work', async (t) => {
  const stateDir = smallTmpfs(t, 8)
  if (!stateDir) return
  const diskDir = join(t.testdir(), 'disks')
  mkdirSync(diskDir, { recursive: true })
  const config = { allowedDirs: [diskDir], quitTimeoutMs: 3_000 }
  const td = await startTestDaemon(t, { stateDir, config })
  await defineOutside(td, 'soft', diskDir)
  await defineOutside(td, 'hard', diskDir)
  await op(td, 'soft', 'start')
  await op(td, 'hard', 'start')
  const pids = Object.fromEntries(
    await Promise.all(['soft', 'hard'].map(async (vm) => [vm, (await td.api('GET', `/v1/vms/${vm}`)).body.pid as number] as const)),
  )
  t.ok(pids['soft'] && pids['hard'], `both QEMUs run (${pids['soft']}, ${pids['hard']})`)

  // Every later commit needs new blocks: the WAL starts empty, and not one byte is left. QEMU
  // unlinks its pidfile when it exits, which would free a page on the tmpfs just before qmpd
  // records the exit: it goes first (QEMU does not read it), so the full disk stays full.
  for (const vm of ['soft', 'hard']) rmSync(join(stateDir, 'vms', vm, 'qemu.pid'))
  td.daemon.db.pragma('wal_checkpoint(TRUNCATE)')
  const filler = fill(stateDir)

  const snap = await td.api('POST', '/v1/vms/soft/snapshots?wait=true&timeoutSec=60', { name: 's1', kind: 'external' })
  t.equal(snap.status, 507, `a snapshot answers 507 (${JSON.stringify(snap.body?.error)})`)
  t.equal(snap.body.error.code, 'DISK_FULL', 'with code DISK_FULL')
  t.match(snap.body.error.message, /disk is full/, 'and says the disk is full')
  const snapJob = snap.body.job?.id as string
  t.equal((await td.api('GET', `/v1/jobs/${snapJob}`)).body.state, 'failed', 'the failed job is served from memory')
  t.equal(td.daemon.db.prepare('SELECT state FROM jobs WHERE id = ?').get(snapJob), undefined, 'the store could not take its row')
  t.equal((await td.api('GET', '/healthz')).status, 200, 'the daemon serves on')

  for (const action of ['pause', 'resume']) {
    const res = await td.api('POST', `/v1/vms/soft/${action}?wait=true&timeoutSec=60`)
    t.equal(res.status, 200, `${action} answers 200 on the full disk (${JSON.stringify(res.body?.error ?? res.body?.result)})`)
  }
  t.equal((await td.api('GET', '/v1/vms/soft')).body.state, 'running', 'soft runs again')

  const t0 = Date.now()
  const stop = await td.api('POST', '/v1/vms/soft/stop?wait=true&timeoutSec=60', { timeoutSec: 1 })
  t.equal(stop.status, 200, `stop answers 200 on the full disk (${Date.now() - t0} ms, ${JSON.stringify(stop.body?.error ?? stop.body?.result)})`)
  t.equal(stop.body.state, 'succeeded')
  t.ok(await eventually(() => !isAlive(pids['soft']!), 5_000), 'the stopped QEMU is gone')
  const t1 = Date.now()
  const force = await td.api('POST', '/v1/vms/hard/stop?wait=true&timeoutSec=60', { force: true })
  t.equal(force.status, 200, `force stop answers 200 on the full disk (${Date.now() - t1} ms)`)
  t.equal(force.body.state, 'succeeded')
  t.ok(await eventually(() => !isAlive(pids['hard']!), 5_000), 'the force-stopped QEMU is gone')
  for (const vm of ['soft', 'hard']) t.equal((await td.api('GET', `/v1/vms/${vm}`)).body.state, 'shutoff', `${vm} shows shutoff`)
  const list = await td.api('GET', '/v1/vms')
  t.equal(list.status, 200, 'GET /v1/vms answers 200')
  const jobs = await td.api('GET', '/v1/jobs')
  t.equal(jobs.status, 200, 'GET /v1/jobs answers 200')
  t.equal(jobs.body.jobs.find((j: any) => j.id === force.body.id)?.state, 'succeeded', 'the job list shows the stop that the store could not take yet')
  const stored = new VmRepo(td.daemon.db)
  // The first exit meets the full store for sure; the second may find a page SQLite freed meanwhile.
  const rows = ['soft', 'hard'].map((vm) => `${vm}: ${stored.get(vm)?.runtime.state}`)
  t.not(stored.get('soft')?.runtime.state, 'shutoff', `the store could not take the first exit: memory ran ahead of it (${rows.join(', ')})`)

  // Room again: the retry writes what memory holds.
  rmSync(filler)
  t.ok(await eventually(() => stored.get('soft')?.runtime.state === 'shutoff' && stored.get('hard')?.runtime.state === 'shutoff', 15_000), 'the exits reach the store once there is room')
  const row = td.daemon.db.prepare('SELECT state FROM jobs WHERE id = ?').get(force.body.id) as { state: string } | undefined
  t.ok(await eventually(() => (td.daemon.db.prepare('SELECT state FROM jobs WHERE id = ?').get(force.body.id) as { state: string } | undefined)?.state === 'succeeded', 15_000), `the stop job reaches the store (was ${row?.state})`)
  await td.close()

  const next = await startTestDaemon(t, { stateDir, config })
  for (const vm of ['soft', 'hard']) t.equal((await next.api('GET', `/v1/vms/${vm}`)).body.state, 'shutoff', `the next daemon finds ${vm} shutoff`)
  t.equal((await op(next, 'soft', 'start')).state, 'succeeded', 'and starts it again')
  t.equal((await op(next, 'soft', 'stop', { force: true })).state, 'succeeded')
})
