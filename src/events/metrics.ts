// Prometheus metrics of the daemon, fed by the event bus and a QMP reply hook; serves nothing itself.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'
import { isFinal, type Job } from '../jobs/model.ts'
import { observeQmpReplies } from '../qmp/client.ts'
import type { EventBus } from './bus.ts'

/** What the VM gauge reads on each scrape. */
export interface VmStates {
  list(): Promise<Array<{ state: string }>>
}

/** Seconds between two ISO timestamps, or undefined. */
function seconds(from?: string, to?: string): number | undefined {
  if (!from || !to) return undefined
  const s = (Date.parse(to) - Date.parse(from)) / 1000
  return Number.isFinite(s) && s >= 0 ? s : undefined
}

/**
 * One registry per daemon app: jobs by operation and final state, job durations, guest downtime
 * of snapshots by kind, VMs by state (read at scrape), QMP command latency, and prom-client's
 * process metrics (event-loop delay among them). close() unsubscribes.
 */
/** Distinct QMP command names the latency histogram labels (QEMU 7.2 has about 250 commands). */
export const MAX_COMMAND_LABELS = 300

export class Metrics {
  /** Command names seen as label values; bounded, since the passthrough takes any `query-*` name. */
  private readonly commands = new Set<string>()

  /** The `command` label of a QMP reply: its name, or `other` once MAX_COMMAND_LABELS names were seen. */
  private commandLabel(command: string): string {
    if (this.commands.has(command)) return command
    if (this.commands.size >= MAX_COMMAND_LABELS) return 'other'
    this.commands.add(command)
    return command
  }

  readonly registry = new Registry()
  private readonly unsubscribe: Array<() => void> = []

  constructor(bus: EventBus, vms: VmStates) {
    collectDefaultMetrics({ register: this.registry })
    const jobs = new Counter({ name: 'qmpd_jobs_total', help: 'Jobs that ended, by operation and final state', labelNames: ['operation', 'state'], registers: [this.registry] })
    const duration = new Histogram({
      name: 'qmpd_job_duration_seconds',
      help: 'Run time of jobs that ended (started to finished), by operation',
      labelNames: ['operation'],
      buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600],
      registers: [this.registry],
    })
    const downtime = new Histogram({
      name: 'qmpd_guest_downtime_seconds',
      help: 'How long taking a snapshot paused the guest, by snapshot kind (internal, external; -memory with RAM)',
      labelNames: ['kind'],
      buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: [this.registry],
    })
    const qmp = new Histogram({
      name: 'qmpd_qmp_command_duration_seconds',
      help: 'Time from sending a QMP command to its reply, by command',
      labelNames: ['command'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
      registers: [this.registry],
    })
    new Gauge({
      name: 'qmpd_vms',
      help: 'VMs by state',
      labelNames: ['state'],
      registers: [this.registry],
      async collect() {
        this.reset()
        const counts = new Map<string, number>()
        for (const vm of await vms.list()) counts.set(vm.state, (counts.get(vm.state) ?? 0) + 1)
        for (const [state, n] of counts) this.set({ state }, n)
      },
    })
    const ended = (job: Job): void => {
      jobs.inc({ operation: job.op, state: job.state })
      const s = seconds(job.startedAt, job.finishedAt)
      if (s !== undefined) duration.observe({ operation: job.op }, s)
      // A snapshot job's result: {snapshot: {kind, memory, …}, downtimeMs, ms}.
      const r = job.result as { snapshot?: { kind?: unknown; memory?: unknown }; downtimeMs?: unknown } | undefined
      const kind = r?.snapshot?.kind
      if (typeof r?.downtimeMs === 'number' && typeof kind === 'string') downtime.observe({ kind: `${kind}${r.snapshot?.memory === true ? '-memory' : ''}` }, r.downtimeMs / 1000)
    }
    this.unsubscribe.push(
      bus.subscribe((ev) => {
        if (ev.type === 'job' && isFinal(ev.job.state)) ended(ev.job)
      }),
      observeQmpReplies((command, ms) => qmp.observe({ command: this.commandLabel(command) }, ms / 1000)),
    )
  }

  /** The exposition text (Prometheus text format) and its content type. */
  async scrape(): Promise<{ text: string; contentType: string }> {
    return { text: await this.registry.metrics(), contentType: this.registry.contentType }
  }

  /** Stops listening to the bus and to QMP replies. */
  close(): void {
    for (const u of this.unsubscribe.splice(0)) u()
  }
}
