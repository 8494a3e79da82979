// The client commands of the qmpd CLI in virsh's vocabulary (vm, snapshot, disk, save, job,
// events): each maps to one API route through qmpd/client; no daemon logic here.
import { Command, InvalidArgumentError, Option } from 'commander'
import { ApiError, createQmpdClient, expectOk, followEvents, getJob, type Job, type QmpdClient } from '../client/index.ts'
import { CliError, EXIT } from './exit.ts'
import { formatBytes, printFields, printJson, printTable, treeLines } from './output.ts'
import { followJob } from './progress.ts'
import { resolveTarget } from './target.ts'

/** Options every client command takes (on the program). */
interface GlobalOpts {
  url?: string
  token?: string
  stateDir?: string
  json?: boolean
}

/** Options of commands that start a job. */
interface JobOpts {
  wait: boolean
  progress?: boolean
}

type Obj = Record<string, unknown>

function obj(v: unknown): Obj {
  return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Obj) : {}
}
function list(v: unknown): Obj[] {
  return Array.isArray(v) ? v.map(obj) : []
}
function text(v: unknown): string | undefined {
  return typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean' ? String(v) : undefined
}
function asJob(v: unknown): Job {
  const o = obj(v)
  if (typeof o['id'] !== 'string' || typeof o['state'] !== 'string') throw new CliError(`the daemon did not answer with a job: ${JSON.stringify(v)}`, EXIT.daemonError)
  return o as Job
}

/** A positive integer option value. */
function intArg(v: string): number {
  if (!/^\d+$/.test(v)) throw new InvalidArgumentError('expected a whole number')
  return Number(v)
}

/** A byte count with an optional K/M/G suffix (powers of 1024). */
function sizeArg(v: string): number {
  const m = /^(\d+)([KMG]?)(i?B)?$/i.exec(v)
  if (!m) throw new InvalidArgumentError('expected bytes, e.g. 1048576, 512K, 4M or 1G')
  return Number(m[1]) * 1024 ** ' KMG'.indexOf((m[2] || ' ').toUpperCase())
}

/** Runs a command body with a client of the daemon the global options name. */
type Action<A extends unknown[]> = (ctx: { client: QmpdClient; g: GlobalOpts }, ...args: A) => Promise<void>

function withClient<A extends unknown[]>(fn: Action<A>): (...args: unknown[]) => Promise<void> {
  return async (...args: unknown[]) => {
    const cmd = args[args.length - 1] as Command
    const g = cmd.optsWithGlobals<GlobalOpts>()
    const target = resolveTarget(g)
    const client = createQmpdClient({ url: target.url, ...(target.token ? { token: target.token } : {}) })
    try {
      await fn({ client, g }, ...(args.slice(0, -1) as A))
    } finally {
      await client.close()
    }
  }
}

/** Prints a job (one line, or JSON). */
function printJob(g: GlobalOpts, job: Job): void {
  if (g.json) return printJson(job)
  const p = job.progress
  printFields([
    ['Id', job.id],
    ['VM', job.vm],
    ['Operation', job.op],
    ['State', job.state],
    ['Progress', p ? `${formatBytes(p.current)} / ${formatBytes(p.total)}` : undefined],
    ['Created', job.createdAt],
    ['Finished', job.finishedAt],
    ['Error', job.error ? `${job.error.message} (${job.error.code})` : undefined],
    ['Result', job.result],
  ])
}

/** Answers a job-creating request: --no-wait prints the id; else the job is followed to its end. */
async function runJob(ctx: { client: QmpdClient; g: GlobalOpts }, o: JobOpts, call: Promise<{ data?: unknown; error?: unknown; response: Response }>, done: (job: Job) => string): Promise<void> {
  await runJobAnswer(ctx, o, expectOk(call), done)
}

/** runJob for an answer already read (a raw request). */
async function runJobAnswer(ctx: { client: QmpdClient; g: GlobalOpts }, o: JobOpts, answer: Promise<{ body: unknown }>, done: (job: Job) => string): Promise<void> {
  const job = asJob((await answer).body)
  if (!o.wait) {
    if (ctx.g.json) printJson(job)
    else process.stdout.write(`${job.id}\n`)
    return
  }
  try {
    const final = await followJob(ctx.client, job, o.progress !== undefined ? { progress: o.progress } : {})
    if (ctx.g.json) printJson(final)
    else process.stdout.write(done(final) + '\n')
  } catch (err) {
    const failed = (err as { job?: Job }).job
    if (ctx.g.json && failed) printJson(failed)
    throw err
  }
}

/** Adds --no-wait and --progress/--no-progress to a job-creating command. */
function jobOptions(c: Command): Command {
  return c.option('--no-wait', 'print the job id and return at once').option('--progress', 'draw the progress bar even when stderr is not a terminal').option('--no-progress', 'never draw the progress bar')
}

/** A raw request for routes whose query flags the typed client cannot express yet (boolean strings). */
async function raw(client: QmpdClient, method: string, path: string): Promise<{ status: number; body: unknown }> {
  const res = await client.fetch(path, { method })
  const body: unknown = res.status === 204 ? undefined : await res.json().catch(() => undefined)
  if (!res.ok) {
    const e = obj(obj(body)['error'])
    throw new ApiError(res.status, text(e['code']) ?? `HTTP_${res.status}`, text(e['message']) ?? `HTTP ${res.status}`, body)
  }
  return { status: res.status, body }
}

/** A disk of `vm define`, as POST /v1/vms takes it. */
interface DiskSpec {
  id: string
  file: string
  format?: 'qcow2' | 'raw'
  bus?: 'virtio' | 'ide'
  sizeMiB?: number
  readOnly?: boolean
}

/** A --disk value: id=vda,file=vda.qcow2[,format=qcow2][,bus=virtio][,size=MiB][,readonly]. */
function diskArg(v: string, prev: DiskSpec[] = []): DiskSpec[] {
  let id: string | undefined
  let file: string | undefined
  const d: Omit<DiskSpec, 'id' | 'file'> = {}
  for (const part of v.split(',')) {
    const [k, val] = part.split('=', 2) as [string, string | undefined]
    if (k === 'id' && val) id = val
    else if (k === 'file' && val) file = val
    else if (k === 'format' && (val === 'qcow2' || val === 'raw')) d.format = val
    else if (k === 'bus' && (val === 'virtio' || val === 'ide')) d.bus = val
    else if (k === 'size' && val && /^\d+$/.test(val)) d.sizeMiB = Number(val)
    else if (k === 'readonly' && val === undefined) d.readOnly = true
    else throw new InvalidArgumentError(`bad disk item ${part} (id=ID,file=PATH[,format=qcow2|raw][,bus=virtio|ide][,size=MiB][,readonly])`)
  }
  if (!id || !file) throw new InvalidArgumentError('a disk needs id= and file=')
  return [...prev, { id, file, ...d }]
}

/** Builds the command tree of the client commands on `program`. */
export function addClientCommands(program: Command): void {
  program
    .option('--url <url>', 'daemon address: http://host:port or unix:/path (default $QMPD_URL or http://127.0.0.1:7777)')
    .option('--token <token>', 'API token (default $QMPD_TOKEN or <state-dir>/token)')
    .option('--state-dir <dir>', 'where to read the token file (default $QMPD_STATE_DIR, $XDG_STATE_HOME/qmpd, ~/.local/state/qmpd)')
    .option('--json', "print the API's JSON instead of tables")

  // --- vm ---
  const vm = program.command('vm').description('define, inspect and run VMs')
  vm.command('list')
    .description('all VMs (virsh list --all)')
    .action(
      withClient(async ({ client, g }) => {
        const vms: Obj[] = []
        let after: string | undefined
        for (;;) {
          const { body } = await expectOk(client.api.GET('/v1/vms', { params: { query: { limit: 1000, ...(after ? { after } : {}) } } }))
          vms.push(...list(obj(body)['vms']))
          after = text(obj(body)['next'])
          if (!after) break
        }
        if (g.json) return printJson({ vms })
        printTable(
          ['NAME', 'STATE', 'PID', 'DISKS', 'REASON'],
          vms.map((v) => [text(v['name']), text(v['state']), text(v['pid']), list(v['disks']).map((d) => text(d['id'])).join(','), text(v['reason'])]),
        )
      }),
    )
  vm.command('define')
    .description('define a VM (POST /v1/vms)')
    .argument('<name>')
    .option('--memory <MiB>', 'RAM in MiB', intArg)
    .option('--cpus <n>', 'vCPUs', intArg)
    .addOption(new Option('--machine <type>', 'machine type').choices(['q35', 'pc']))
    .option('--disk <spec>', 'id=vda,file=vda.qcow2[,format=qcow2|raw][,bus=virtio|ide][,size=MiB][,readonly] (repeatable)', diskArg)
    .action(
      withClient(async ({ client, g }, name: string, o: { memory?: number; cpus?: number; machine?: 'q35' | 'pc'; disk?: DiskSpec[] }) => {
        const body = {
          name,
          ...(o.memory !== undefined ? { memoryMiB: o.memory } : {}),
          ...(o.cpus !== undefined ? { cpus: o.cpus } : {}),
          ...(o.machine ? { machine: o.machine } : {}),
          ...(o.disk ? { disks: o.disk } : {}),
        }
        const res = await expectOk(client.api.POST('/v1/vms', { body }))
        if (g.json) return printJson(res.body)
        process.stdout.write(`VM ${name} defined\n`)
      }),
    )
  vm.command('show')
    .description('one VM with its disks (virsh dominfo, domblklist)')
    .argument('<vm>')
    .action(
      withClient(async ({ client, g }, name: string) => {
        const { body } = await expectOk(client.api.GET('/v1/vms/{vm}', { params: { path: { vm: name } } }))
        if (g.json) return printJson(body)
        const v = obj(body)
        const def = obj(v['definition'])
        printFields([
          ['Name', text(v['name'])],
          ['State', text(v['state'])],
          ['Reason', text(v['reason'])],
          ['PID', text(v['pid'])],
          ['CPUs', text(def['cpus'])],
          ['Memory', def['memoryMiB'] !== undefined ? `${text(def['memoryMiB'])} MiB` : undefined],
          ['Machine', text(def['machine'])],
        ])
        process.stdout.write('\n')
        printTable(
          ['DISK', 'FORMAT', 'FILE', 'CHAIN'],
          list(v['disks']).map((d) => [text(d['id']), text(d['format']), text(d['file']), String(list(d['chain']).length || '-')]),
        )
      }),
    )
  const simple = [
    ['start', 'start the VM (virsh start)'],
    ['pause', 'pause the guest (virsh suspend)'],
    ['resume', 'resume the guest (virsh resume)'],
  ] as const
  for (const [action, desc] of simple) {
    const c = vm.command(action).description(desc).argument('<vm>')
    if (action === 'start') c.option('--paused', 'leave the guest paused')
    jobOptions(c).action(
      withClient(async (ctx, name: string, o: JobOpts & { paused?: boolean }) => {
        const path = { params: { path: { vm: name } } }
        const call =
          action === 'start'
            ? ctx.client.api.POST('/v1/vms/{vm}/start', { ...path, body: o.paused ? { paused: true } : {} })
            : action === 'pause'
              ? ctx.client.api.POST('/v1/vms/{vm}/pause', { ...path, body: {} })
              : ctx.client.api.POST('/v1/vms/{vm}/resume', { ...path, body: {} })
        await runJob(ctx, o, call, () => `VM ${name}: ${action} done`)
      }),
    )
  }
  jobOptions(vm.command('stop').description('power the VM down: ACPI, then quit after --timeout (virsh shutdown)').argument('<vm>').option('--force', 'quit QEMU at once').option('--timeout <sec>', 'seconds the guest gets', intArg)).action(
    withClient(async (ctx, name: string, o: JobOpts & { force?: boolean; timeout?: number }) => {
      const body = { ...(o.force ? { force: true } : {}), ...(o.timeout !== undefined ? { timeoutSec: o.timeout } : {}) }
      await runJob(ctx, o, ctx.client.api.POST('/v1/vms/{vm}/stop', { params: { path: { vm: name } }, body }), () => `VM ${name} stopped`)
    }),
  )
  jobOptions(vm.command('destroy').description('quit QEMU at once (virsh destroy)').argument('<vm>')).action(
    withClient(async (ctx, name: string, o: JobOpts) => {
      await runJob(ctx, o, ctx.client.api.POST('/v1/vms/{vm}/stop', { params: { path: { vm: name } }, body: { force: true } }), () => `VM ${name} destroyed`)
    }),
  )
  vm.command('undefine')
    .description('delete a VM that is not running (virsh undefine)')
    .argument('<vm>')
    .option('--remove-all-storage', 'also remove the files qmpd created')
    .action(
      withClient(async ({ client, g }, name: string, o: { removeAllStorage?: boolean }) => {
        await raw(client, 'DELETE', `/v1/vms/${encodeURIComponent(name)}${o.removeAllStorage ? '?deleteStorage=true' : ''}`)
        if (g.json) return printJson({ deleted: name })
        process.stdout.write(`VM ${name} undefined\n`)
      }),
    )

  // --- snapshot ---
  const snap = program.command('snapshot').description('snapshots: create, list, revert, delete')
  jobOptions(
    snap
      .command('create')
      .description('take a snapshot (virsh snapshot-create-as)')
      .argument('<vm>')
      .argument('<name>')
      .option('--description <text>')
      .option('--external', 'external: new overlay files (default internal)')
      .option('--memory', 'with RAM and device state (default: when the VM runs)')
      .option('--no-memory', 'disks only')
      .option('--live', 'external memory: resume at once and write RAM in the background')
      .option('--quiesce', 'freeze guest filesystems through the guest agent'),
  ).action(
    withClient(async (ctx, vmName: string, name: string, o: JobOpts & { description?: string; external?: boolean; memory?: boolean; live?: boolean; quiesce?: boolean }) => {
      const body = {
        name,
        ...(o.description !== undefined ? { description: o.description } : {}),
        ...(o.external ? { kind: 'external' as const } : {}),
        ...(o.memory !== undefined ? { memory: o.memory } : {}),
        ...(o.live ? { live: true } : {}),
        ...(o.quiesce ? { quiesce: true } : {}),
      }
      await runJob(ctx, o, ctx.client.api.POST('/v1/vms/{vm}/snapshots', { params: { path: { vm: vmName } }, body }), () => `snapshot ${name} of ${vmName} created`)
    }),
  )
  snap
    .command('list')
    .description('snapshots of a VM, oldest first (virsh snapshot-list)')
    .argument('<vm>')
    .option('--tree', 'as the tree of parent links')
    .action(
      withClient(async ({ client, g }, vmName: string, o: { tree?: boolean }) => {
        const { body } = await expectOk(client.api.GET('/v1/vms/{vm}/snapshots', { params: { path: { vm: vmName } } }))
        if (g.json) return printJson(body)
        const snaps = list(obj(body)['snapshots'])
        if (o.tree) {
          const lines = treeLines(snaps.map((s) => ({ name: text(s['name']) ?? '?', parent: text(s['parent']), label: `${text(s['name'])}${s['current'] === true ? ' *' : ''}` })))
          process.stdout.write(lines.join('\n') + (lines.length ? '\n' : ''))
          return
        }
        printTable(
          ['NAME', 'KIND', 'MEMORY', 'PARENT', 'CURRENT', 'CREATED', 'SIZE'],
          snaps.map((s) => [
            text(s['name']),
            text(s['kind']),
            s['memory'] === true ? 'yes' : 'no',
            text(s['parent']),
            s['current'] === true ? 'yes' : '',
            text(s['createdAt']),
            typeof s['sizeBytes'] === 'number' ? formatBytes(s['sizeBytes']) : undefined,
          ]),
        )
      }),
    )
  snap
    .command('show')
    .description('one snapshot (virsh snapshot-info)')
    .argument('<vm>')
    .argument('<snap>')
    .action(
      withClient(async ({ client, g }, vmName: string, name: string) => {
        const { body } = await expectOk(client.api.GET('/v1/vms/{vm}/snapshots/{snap}', { params: { path: { vm: vmName, snap: name } } }))
        if (g.json) return printJson(body)
        const s = obj(body)
        printFields([
          ['Name', text(s['name'])],
          ['VM', text(s['vm'])],
          ['Kind', text(s['kind'])],
          ['Memory', s['memory'] === true ? 'yes' : 'no'],
          ['Parent', text(s['parent'])],
          ['Children', list(s['children']).length ? undefined : '-'],
          ['Current', s['current'] === true ? 'yes' : 'no'],
          ['State', text(s['vmState'])],
          ['Created', text(s['createdAt'])],
          ['Description', text(s['description'])],
          ['Size', typeof s['sizeBytes'] === 'number' ? formatBytes(s['sizeBytes']) : undefined],
        ])
        const children = Array.isArray(s['children']) ? s['children'].map(text).join(', ') : ''
        if (children) process.stdout.write(`Children:    ${children}\n`)
      }),
    )
  jobOptions(
    snap
      .command('revert')
      .description('revert the VM to a snapshot (virsh snapshot-revert)')
      .argument('<vm>')
      .argument('<snap>')
      .addOption(new Option('--state <state>', 'the state to leave the VM in').choices(['running', 'paused', 'shutoff'])),
  ).action(
    withClient(async (ctx, vmName: string, name: string, o: JobOpts & { state?: 'running' | 'paused' | 'shutoff' }) => {
      await runJob(ctx, o, ctx.client.api.POST('/v1/vms/{vm}/snapshots/{snap}/revert', { params: { path: { vm: vmName, snap: name } }, body: o.state ? { state: o.state } : {} }), () => `${vmName} reverted to ${name}`)
    }),
  )
  jobOptions(
    snap
      .command('delete')
      .description('delete a snapshot (virsh snapshot-delete)')
      .argument('<vm>')
      .argument('<snap>')
      .option('--children', 'delete the whole subtree')
      .option('--metadata-only', 'forget the snapshot, touch no file'),
  ).action(
    withClient(async (ctx, vmName: string, name: string, o: JobOpts & { children?: boolean; metadataOnly?: boolean }) => {
      const q = new URLSearchParams({ ...(o.children ? { children: 'true' } : {}), ...(o.metadataOnly ? { metadataOnly: 'true' } : {}) }).toString()
      const answer = raw(ctx.client, 'DELETE', `/v1/vms/${encodeURIComponent(vmName)}/snapshots/${encodeURIComponent(name)}${q ? `?${q}` : ''}`)
      await runJobAnswer(ctx, o, answer, () => `snapshot ${name} of ${vmName} deleted`)
    }),
  )

  // --- disk ---
  const disk = program.command('disk').description('block jobs on a disk: commit, pull, copy')
  jobOptions(
    disk
      .command('commit')
      .description('commit layers down into a lower one (virsh blockcommit)')
      .argument('<vm>')
      .argument('<disk>')
      .option('--top <layer>', 'the top layer (file or snapshot name; default the active layer)')
      .option('--base <layer>', 'the layer committed into (default the one right below top)')
      .option('--speed <bytes/s>', 'throttle, e.g. 1M', sizeArg)
      .option('--no-pivot', 'active commit: stay ready instead of switching to base')
      .option('--keep-merged', 'keep the files the commit made unneeded'),
  ).action(
    withClient(async (ctx, vmName: string, d: string, o: JobOpts & { top?: string; base?: string; speed?: number; pivot: boolean; keepMerged?: boolean }) => {
      const body = {
        ...(o.top ? { top: o.top } : {}),
        ...(o.base ? { base: o.base } : {}),
        ...(o.speed !== undefined ? { speedBytesPerSec: o.speed } : {}),
        ...(o.pivot ? {} : { pivot: false }),
        ...(o.keepMerged ? { keepMerged: true } : {}),
      }
      await runJob(ctx, o, ctx.client.api.POST('/v1/vms/{vm}/disks/{disk}/commit', { params: { path: { vm: vmName, disk: d } }, body }), () => `commit of ${vmName}/${d} done`)
    }),
  )
  jobOptions(
    disk
      .command('pull')
      .description('pull backing data up into the active layer (virsh blockpull)')
      .argument('<vm>')
      .argument('<disk>')
      .option('--base <layer>', 'pull down to this layer (default everything)')
      .option('--speed <bytes/s>', 'throttle, e.g. 1M', sizeArg)
      .option('--keep-merged', 'keep the files the pull made unneeded'),
  ).action(
    withClient(async (ctx, vmName: string, d: string, o: JobOpts & { base?: string; speed?: number; keepMerged?: boolean }) => {
      const body = { ...(o.base ? { base: o.base } : {}), ...(o.speed !== undefined ? { speedBytesPerSec: o.speed } : {}), ...(o.keepMerged ? { keepMerged: true } : {}) }
      await runJob(ctx, o, ctx.client.api.POST('/v1/vms/{vm}/disks/{disk}/pull', { params: { path: { vm: vmName, disk: d } }, body }), () => `pull of ${vmName}/${d} done`)
    }),
  )
  jobOptions(
    disk
      .command('copy')
      .description('copy a disk to a new file (virsh blockcopy)')
      .argument('<vm>')
      .argument('<disk>')
      .argument('<dest>')
      .addOption(new Option('--format <format>').choices(['qcow2', 'raw']))
      .option('--shallow', 'copy only the active layer')
      .option('--pivot', 'switch the VM to the copy once synchronized')
      .option('--speed <bytes/s>', 'throttle, e.g. 1M', sizeArg),
  ).action(
    withClient(async (ctx, vmName: string, d: string, dest: string, o: JobOpts & { format?: 'qcow2' | 'raw'; shallow?: boolean; pivot?: boolean; speed?: number }) => {
      const body = {
        dest,
        ...(o.format ? { format: o.format } : {}),
        ...(o.shallow ? { shallow: true } : {}),
        ...(o.pivot ? { pivot: true } : {}),
        ...(o.speed !== undefined ? { speedBytesPerSec: o.speed } : {}),
      }
      await runJob(ctx, o, ctx.client.api.POST('/v1/vms/{vm}/disks/{disk}/copy', { params: { path: { vm: vmName, disk: d } }, body }), (j) => `copy of ${vmName}/${d} to ${dest}: ${j.state}`)
    }),
  )

  // --- saved state ---
  jobOptions(program.command('save').description('save RAM and device state to a file and stop the VM (virsh save)').argument('<vm>').argument('<file>')).action(
    withClient(async (ctx, vmName: string, file: string, o: JobOpts) => {
      await runJob(ctx, o, ctx.client.api.POST('/v1/vms/{vm}/save', { params: { path: { vm: vmName } }, body: { file } }), () => `${vmName} saved to ${file}`)
    }),
  )
  jobOptions(program.command('restore').description('start the VM from a saved state file (virsh restore)').argument('<vm>').argument('<file>')).action(
    withClient(async (ctx, vmName: string, file: string, o: JobOpts) => {
      await runJob(ctx, o, ctx.client.api.POST('/v1/vms/{vm}/restore', { params: { path: { vm: vmName } }, body: { file } }), () => `${vmName} restored from ${file}`)
    }),
  )
  jobOptions(program.command('managedsave').description('save to the managed-save file and stop; the next start restores it (virsh managedsave)').argument('<vm>').option('--remove', 'discard the managed save instead (virsh managedsave-remove)')).action(
    withClient(async (ctx, vmName: string, o: JobOpts & { remove?: boolean }) => {
      if (o.remove) {
        await raw(ctx.client, 'DELETE', `/v1/vms/${encodeURIComponent(vmName)}/managedsave`)
        if (ctx.g.json) return printJson({ removed: vmName })
        process.stdout.write(`managed save of ${vmName} removed\n`)
        return
      }
      await runJob(ctx, o, ctx.client.api.POST('/v1/vms/{vm}/managedsave', { params: { path: { vm: vmName } }, body: {} }), () => `${vmName} saved (managed save)`)
    }),
  )

  // --- job ---
  const job = program.command('job').description('jobs: list, show, cancel, watch')
  job
    .command('list')
    .description('jobs, newest first')
    .option('--vm <vm>', 'only this VM')
    .option('--limit <n>', 'at most n (default 100)', intArg)
    .action(
      withClient(async ({ client, g }, o: { vm?: string; limit?: number }) => {
        const { body } = await expectOk(client.api.GET('/v1/jobs', { params: { query: { ...(o.vm ? { vm: o.vm } : {}), ...(o.limit ? { limit: o.limit } : {}) } } }))
        if (g.json) return printJson(body)
        printTable(
          ['ID', 'VM', 'OP', 'STATE', 'CREATED', 'ERROR'],
          list(obj(body)['jobs']).map((j) => [text(j['id']), text(j['vm']), text(j['op']), text(j['state']), text(j['createdAt']), text(obj(j['error'])['code'])]),
        )
      }),
    )
  job
    .command('show')
    .description('one job')
    .argument('<id>')
    .action(withClient(async ({ client, g }, id: string) => printJob(g, await getJob(client, id))))
  job
    .command('cancel')
    .description('cancel a queued job or a running block job')
    .argument('<id>')
    .action(
      withClient(async ({ client, g }, id: string) => {
        const { body } = await expectOk(client.api.POST('/v1/jobs/{id}/cancel', { params: { path: { id } } }))
        printJob(g, asJob(body))
      }),
    )
  job
    .command('watch')
    .description('follow a job to its end with its progress')
    .argument('<id>')
    .option('--progress', 'draw the progress bar even when stderr is not a terminal')
    .option('--no-progress', 'never draw the progress bar')
    .action(
      withClient(async ({ client, g }, id: string, o: { progress?: boolean }) => {
        const final = await followJob(client, await getJob(client, id), o.progress !== undefined ? { progress: o.progress } : {})
        printJob(g, final)
      }),
    )

  // --- events ---
  program
    .command('events')
    .description('print the event stream (virsh event --all --loop)')
    .option('--types <list>', 'comma-separated: job,vm,qmp,schedule')
    .option('--vm <vm>', 'only this VM')
    .option('--job <id>', 'only this job')
    .action(
      withClient(async ({ client, g }, o: { types?: string; vm?: string; job?: string }) => {
        const stop = new AbortController()
        const onSigint = (): void => stop.abort()
        process.once('SIGINT', onSigint)
        const types = o.types ? (o.types.split(',') as Array<'job' | 'vm' | 'qmp' | 'schedule'>) : undefined
        try {
          for await (const ev of followEvents(client, { ...(types ? { types } : {}), ...(o.vm ? { vm: o.vm } : {}), ...(o.job ? { job: o.job } : {}), signal: stop.signal })) {
            if (g.json) {
              process.stdout.write(JSON.stringify({ id: ev.id, event: ev.event, data: ev.data }) + '\n')
              continue
            }
            const d = obj(ev.data)
            const j = obj(d['job'])
            const what =
              ev.event === 'job'
                ? `job ${text(j['id'])} ${text(j['op'])} ${text(j['state'])}${obj(j['progress'])['total'] ? ` ${text(obj(j['progress'])['current'])}/${text(obj(j['progress'])['total'])}` : ''}`
                : ev.event === 'vm'
                  ? `state ${text(d['state'])}${d['reason'] ? ` (${text(d['reason'])})` : ''}`
                  : ev.event === 'qmp'
                    ? `qmp ${text(d['event'])}`
                    : ev.event === 'schedule'
                      ? `${text(d['event'])} ${text(d['snapshot'] ?? d['schedule']) ?? '-'}${d['slot'] ? ` ${text(d['slot'])}` : ''}${d['reason'] ? ` (${text(d['reason'])})` : ''}`
                      : `${ev.event} ${JSON.stringify(ev.data)}`
            process.stdout.write(`${new Date().toISOString()} ${text(d['vm']) ?? '-'} ${what}\n`)
          }
        } finally {
          process.off('SIGINT', onSigint)
        }
      }),
    )
}
