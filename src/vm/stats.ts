// Resource use of one VM (GET /v1/vms/{vm}/stats): QEMU's CPU time and RSS from /proc, block I/O
// from query-blockstats, guest downtime from job results, snapshot space from the files; reads only.
import { readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { QmpdError } from '../errors.ts'
import type { JobManager } from '../jobs/manager.ts'
import type { QmpClient } from '../qmp/index.ts'
import { VM_FILES } from './argv.ts'
import type { VmManager } from './manager.ts'
import { isAlive } from './proc.ts'
import { isRunningState } from './states.ts'

/** Clock ticks per second of /proc/PID/stat's utime and stime (USER_HZ: 100 on every Linux ABI qmpd runs on). */
const USER_HZ = 100

/** Block I/O of one guest disk, as QEMU counts it since it started. */
export interface DiskStats {
  disk: string
  rdBytes: number
  wrBytes: number
  rdOps: number
  wrOps: number
  flushOps: number
  rdTotalTimeNs: number
  wrTotalTimeNs: number
  flushTotalTimeNs: number
}

/** What GET /v1/vms/{vm}/stats answers; null where there is nothing to measure (no QEMU). */
export interface VmStats {
  vm: string
  state: string
  at: string
  /** QEMU's utime + stime, seconds. */
  cpuSeconds: number | null
  /** QEMU's VmRSS, bytes. */
  rssBytes: number | null
  disks: DiskStats[] | null
  /** Per NIC; always [] today: QEMU 7.2 has no QMP query for netdev counters (query-stats has no net provider), and the host side of a tap NIC (/sys/class/net/IF/statistics) is not read yet. */
  net: Array<{ netdev: string; rxBytes: number; txBytes: number; rxPackets: number; txPackets: number }> | null
  /** The guest's pauses the VM's jobs measured (snapshots, reverts: their results' downtimeMs). */
  downtime: { totalMs: number; count: number }
  /** Bytes on disk (allocated blocks) of the files qmpd manages for this VM's snapshots and saved state. */
  snapshotSpace: { bytes: number; files: Array<{ file: string; bytes: number }> }
}

/** What stats are read from. */
export interface VmStatsDeps {
  vms: VmManager
  jobs: JobManager
  /** Files qmpd created for the VM's snapshots: overlays and RAM state files (SnapshotService.filesOf). */
  snapshotFiles: (vm: string) => string[]
  vmDir: (vm: string) => string
}

/** utime + stime (fields 14, 15) of /proc/PID/stat in seconds, and VmRSS of /proc/PID/status in bytes; null when the process is gone. */
export function procUsage(pid: number): { cpuSeconds: number; rssBytes: number } | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1')
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ') // f[0] is field 3
    const ticks = Number(f[11]) + Number(f[12])
    const rss = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'latin1'))
    return { cpuSeconds: ticks / USER_HZ, rssBytes: rss ? Number(rss[1]) * 1024 : 0 }
  } catch {
    return null
  }
}

/** Allocated bytes of a file (st_blocks × 512, what `du` counts), or undefined when it does not exist. */
function allocated(file: string): number | undefined {
  try {
    return statSync(file).blocks * 512
  } catch {
    return undefined
  }
}

/** Block I/O per guest disk: the device whose qdev is the disk's id (qmpd names devices after disk ids). */
async function diskStats(qmp: QmpClient, diskIds: string[]): Promise<DiskStats[]> {
  const all = await qmp.execute('query-blockstats', { 'query-nodes': false })
  return all.flatMap((b) => {
    const id = diskIds.find((d) => b.qdev === d || b.qdev?.endsWith(`/${d}`) || b.device === d || b.qdev?.startsWith(`/machine/peripheral/${d}/`))
    const name = id ?? b.qdev ?? b.device ?? b['node-name']
    if (name === undefined || (diskIds.length > 0 && id === undefined)) return []
    const s = b.stats
    return [
      {
        disk: name,
        rdBytes: s.rd_bytes,
        wrBytes: s.wr_bytes,
        rdOps: s.rd_operations,
        wrOps: s.wr_operations,
        flushOps: s.flush_operations,
        rdTotalTimeNs: s.rd_total_time_ns,
        wrTotalTimeNs: s.wr_total_time_ns,
        flushTotalTimeNs: s.flush_total_time_ns,
      },
    ]
  })
}

/**
 * The VM's resource use now. A VM without a QEMU answers its snapshot space and downtime, with
 * null for CPU, memory, disks and network.
 * @throws QmpdError VM_NOT_FOUND; QMP errors of query-blockstats while QEMU runs (not a lost
 *   connection: QEMU quitting mid-request gives null disks).
 */
export async function vmStats(d: VmStatsDeps, name: string): Promise<VmStats> {
  const rec = d.vms.record(name)
  const rt = rec.runtime
  const live = isRunningState(rt.state) && rt.pid !== undefined && isAlive(rt.pid, rt.pidStartTime)
  const usage = live ? procUsage(rt.pid!) : null
  let disks: DiskStats[] | null = null
  if (live) {
    let qmp: QmpClient | undefined
    try {
      qmp = d.vms.qmp(name)
    } catch {
      qmp = undefined // no QMP connection right now: block I/O unknown
    }
    try {
      if (qmp) disks = await diskStats(qmp, rt.disks.map((x) => x.id))
    } catch (err) {
      // QEMU went away between the check above and the reply (a stop or save finishing): the VM
      // is no longer running, and its block I/O is unknown, as for a stopped VM.
      if (!(err instanceof QmpdError && err.code === 'QMP_DISCONNECTED')) throw err
    }
  }
  // Jobs of this VM since it was defined (an older VM of the same name had its own).
  const jobs = d.jobs.list({ vm: name, limit: 100_000 }).filter((j) => j.createdAt >= rec.createdAt)
  let totalMs = 0
  let count = 0
  for (const j of jobs) {
    const ms = (j.result as { downtimeMs?: unknown } | undefined)?.downtimeMs
    if (j.state === 'succeeded' && typeof ms === 'number') {
      totalMs += ms
      count++
    }
  }
  const dir = d.vmDir(name)
  const candidates = [...new Set([...d.snapshotFiles(name), join(dir, VM_FILES.managedSave)])]
  const files = candidates.flatMap((file) => {
    const bytes = allocated(file)
    return bytes === undefined ? [] : [{ file, bytes }]
  })
  return {
    vm: name,
    state: rt.state,
    at: new Date().toISOString(),
    cpuSeconds: usage?.cpuSeconds ?? null,
    rssBytes: usage?.rssBytes ?? null,
    disks,
    net: live ? [] : null,
    downtime: { totalMs: Math.round(totalMs * 10) / 10, count },
    snapshotSpace: { bytes: files.reduce((a, f) => a + f.bytes, 0), files },
  }
}
