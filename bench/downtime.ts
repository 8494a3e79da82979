// Guest downtime per snapshot kind on a 128 MiB guest with ~48 MiB of RAM it keeps dirtying and two
// 256 MiB qcow2 disks: the pause each kind causes (downtimeMs, from QEMU's STOP/RESUME events) and
// the whole call. Run: npm run bench:downtime [-- --reps N]
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { pino } from 'pino'
import { makeConfig } from '../src/config.ts'
import { startDaemon } from '../src/daemon.ts'
import { isAlive } from '../src/vm/proc.ts'
import { makeGuestDisk } from '../test/helpers/guest.ts'

const { values } = parseArgs({ options: { reps: { type: 'string', default: '3' } } })
const reps = Number(values.reps)

const kinds: Array<{ label: string; body: Record<string, unknown>; hooks?: { backgroundSnapshot: boolean } }> = [
  { label: 'internal disk snapshot', body: { kind: 'internal', memory: false } },
  { label: 'internal system checkpoint', body: { kind: 'internal', memory: true } },
  { label: 'external disk snapshot (2 disks)', body: { kind: 'external', memory: false } },
  { label: 'external checkpoint, live (background-snapshot)', body: { kind: 'external', memory: true, live: true } },
  { label: 'external checkpoint, live (pre-copy fallback)', body: { kind: 'external', memory: true, live: true }, hooks: { backgroundSnapshot: false } },
  { label: 'external checkpoint, paused', body: { kind: 'external', memory: true, live: false } },
  { label: 'memory-only checkpoint (paused)', body: { kind: 'external', memory: true, disks: { vda: { exclude: true }, vdb: { exclude: true } } } },
]

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!

async function main(): Promise<void> {
  const rows: Array<{ kind: string; downtimeMs: number; totalMs: number; method?: string }> = []
  for (const kind of kinds) {
    const stateDir = mkdtempSync(join(tmpdir(), 'qmpd-dt-'))
    const daemon = await startDaemon(makeConfig({ stateDir, accel: 'tcg' }, {}), pino({ level: 'silent' }), kind.hooks ? { snapshots: kind.hooks } : {})
    const app = await daemon.app()
    try {
      const dir = join(stateDir, 'vms', 'g')
      mkdirSync(dir, { recursive: true })
      await makeGuestDisk(join(dir, 'a.qcow2'), { format: 'qcow2', sizeMiB: 256, boot: true, stampMiB: 48 })
      await makeGuestDisk(join(dir, 'b.qcow2'), { format: 'qcow2', sizeMiB: 256, boot: false })
      const call = async (method: 'POST' | 'GET', url: string, body?: unknown) => {
        const r = await app.inject({ method, url, ...(body ? { payload: body } : {}) })
        if (r.statusCode >= 300) throw new Error(`${url}: ${r.body}`)
        return r.json()
      }
      await call('POST', '/v1/vms', { name: 'g', memoryMiB: 128, disks: [{ id: 'vda', file: 'a.qcow2' }, { id: 'vdb', file: 'b.qcow2' }] })
      await call('POST', '/v1/vms/g/start?wait=true')
      await new Promise((r) => setTimeout(r, 3000)) // let the guest dirty its 48 MiB
      const down: number[] = []
      const total: number[] = []
      let method: string | undefined
      for (let i = 0; i < reps; i++) {
        const t0 = performance.now()
        const job = await call('POST', `/v1/vms/g/snapshots?wait=true&timeoutSec=600`, { name: `s${i}`, ...kind.body })
        total.push(performance.now() - t0)
        down.push(job.result.downtimeMs)
        method = job.result.snapshot.ramMethod
        await new Promise((r) => setTimeout(r, 1000))
      }
      rows.push({ kind: kind.label, downtimeMs: median(down), totalMs: Math.round(median(total)), ...(method ? { method } : {}) })
      console.log(`${kind.label.padEnd(50)} pause ${String(median(down)).padStart(8)} ms   call ${String(Math.round(median(total))).padStart(6)} ms ${method ? `(${method})` : ''}`)
    } finally {
      const pid = daemon.vms.record('g')?.runtime.pid
      await app.close()
      await daemon.close({ drainTimeoutMs: 1000 })
      if (pid && isAlive(pid)) process.kill(pid, 'SIGKILL')
      rmSync(stateDir, { recursive: true, force: true })
    }
  }
  console.log(JSON.stringify({ reps, rows }, null, 1))
}

main().catch((err) => {
  console.error(err)
  process.exit(1)
})
