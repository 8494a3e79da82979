// Routes a scheduler's per-host driver reads (wait for a state, stats, the host fingerprint); they
// validate and call services, nothing more.
import type { FastifyPluginAsyncZod } from 'fastify-type-provider-zod'
import { z } from 'zod'
import { VmState } from '../../vm/definition.ts'
import { vmStats } from '../../vm/stats.ts'
import { waitForState, WAITABLE_STATES } from '../../vm/wait.ts'
import type { Services } from '../app.ts'
import { ErrorBody, VmParams } from '../schemas.ts'

const Exit = z.object({ code: z.number().int().nullable(), signal: z.string().nullable(), at: z.string() })

const WaitReply = z.object({
  state: VmState,
  reason: z.string().optional(),
  exit: Exit.nullable().describe('how QEMU last exited (null: it has not exited since it was started, or never ran)'),
  timedOut: z.boolean().describe('true when timeoutSec ran out first: `state` is the state now'),
})

const DiskStats = z.object({
  disk: z.string(),
  rdBytes: z.number(),
  wrBytes: z.number(),
  rdOps: z.number(),
  wrOps: z.number(),
  flushOps: z.number(),
  rdTotalTimeNs: z.number(),
  wrTotalTimeNs: z.number(),
  flushTotalTimeNs: z.number(),
})

const StatsReply = z.object({
  vm: z.string(),
  state: z.string(),
  at: z.string(),
  cpuSeconds: z.number().nullable(),
  rssBytes: z.number().nullable(),
  disks: z.array(DiskStats).nullable(),
  net: z.array(z.object({ netdev: z.string(), rxBytes: z.number(), txBytes: z.number(), rxPackets: z.number(), txPackets: z.number() })).nullable(),
  downtime: z.object({ totalMs: z.number(), count: z.number().int() }),
  snapshotSpace: z.object({ bytes: z.number(), files: z.array(z.object({ file: z.string(), bytes: z.number() })) }),
})

const Space = z.union([z.object({ path: z.string(), freeBytes: z.number(), totalBytes: z.number() }), z.object({ path: z.string(), error: z.string() })])

const HostReply = z.object({
  qmpd: z.object({ version: z.string(), pid: z.number().int(), startedAt: z.string(), uptimeSec: z.number() }),
  qemu: z.object({
    binary: z.string(),
    version: z.string(),
    versionLine: z.string(),
    qmpVersion: z.object({ major: z.number(), minor: z.number(), micro: z.number(), package: z.string() }),
    commands: z.record(z.string(), z.boolean()),
    migrationCapabilities: z.array(z.string()),
    capabilities: z.record(z.string(), z.boolean()).describe('what qmpd chooses features by, from the QEMU binary\'s own QMP schema (never its version): snapshot-save, background-snapshot, mapped-ram, multifd, direct-io, migrate-channels, migrate-blk, snapshot-access, …'),
    probedAt: z.string(),
  }),
  accel: z.object({
    configured: z.string(),
    resolved: z.enum(['kvm', 'tcg']),
    usable: z.array(z.enum(['kvm', 'tcg'])),
    kvm: z.union([
      z.object({ probed: z.literal(false), reason: z.string() }),
      z.object({ probed: z.literal(true), usable: z.literal(true), cpuModel: z.string() }),
      z.object({ probed: z.literal(true), usable: z.literal(false), reason: z.string() }),
    ]).describe("the host probe's verdict on KVM (not run under --accel tcg)"),
  }),
  storage: z.object({ stateDir: Space, allowedDirs: z.array(Space) }),
  vmCounts: z.object({ total: z.number().int(), byState: z.record(z.string(), z.number().int()) }),
})

/** /v1/vms/{vm}/wait, /v1/vms/{vm}/stats and /v1/host. */
export const schedulingRoutes: FastifyPluginAsyncZod<{ services: Services }> = async (app, { services }) => {
  const { vms, bus, jobs, snapshots, host } = services
  // Long-polls in flight: a daemon that shuts down answers them (timedOut: true) rather than
  // holding its close for up to an hour; the client polls again, the next daemon answers.
  const polls = new Set<AbortController>()
  app.addHook('preClose', async () => {
    for (const p of polls) p.abort()
  })

  app.get(
    '/v1/vms/:vm/wait',
    {
      schema: {
        summary: 'Long-poll until the VM is in one of the given states (at once when it already is); answers its exit record',
        tags: ['vms'],
        operationId: 'waitVm',
        params: VmParams,
        querystring: z.strictObject({
          state: z
            .string()
            .transform((s) => s.split(','))
            .pipe(z.array(z.enum(WAITABLE_STATES)).min(1))
            .describe(`one state or a comma-separated list: ${WAITABLE_STATES.join(', ')}`),
          timeoutSec: z.coerce.number().int().min(0).max(3600).default(60).describe('answer with timedOut: true after this long (0-3600, default 60)'),
        }),
        response: { 200: WaitReply, 400: ErrorBody, 401: ErrorBody, 404: ErrorBody, 409: ErrorBody, 500: ErrorBody },
      },
    },
    async (req) => {
      const abort = new AbortController()
      polls.add(abort)
      // The client went away: stop waiting for it.
      const onClose = (): void => abort.abort()
      req.raw.once('close', onClose)
      try {
        return await waitForState(vms, bus, req.params.vm, req.query.state, req.query.timeoutSec * 1000, abort.signal)
      } finally {
        polls.delete(abort)
        req.raw.off('close', onClose)
      }
    },
  )

  app.get(
    '/v1/vms/:vm/stats',
    {
      schema: {
        summary: 'Resource use: QEMU CPU time and RSS, block I/O per disk, network (none yet), guest downtime, snapshot space',
        tags: ['vms'],
        operationId: 'getVmStats',
        params: VmParams,
        response: { 200: StatsReply, 400: ErrorBody, 401: ErrorBody, 404: ErrorBody, 409: ErrorBody, 500: ErrorBody, 502: ErrorBody },
      },
    },
    async (req) => vmStats({ vms, jobs, snapshotFiles: (vm) => snapshots.filesOf(vm), vmDir: (vm) => services.vmDir(vm) }, req.params.vm),
  )

  app.get(
    '/v1/host',
    {
      schema: {
        summary: 'The host fingerprint: QEMU version and capabilities (probed once), accelerators, free space, VMs by state, qmpd version and uptime',
        tags: ['daemon'],
        operationId: 'getHost',
        response: { 200: HostReply, 400: ErrorBody, 401: ErrorBody, 500: ErrorBody, 502: ErrorBody, 503: ErrorBody },
      },
    },
    async () => host.fingerprint(),
  )
}
