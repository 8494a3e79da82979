// Capability probe of one QEMU binary (QMP schema, migration capabilities, command-line options),
// read once per binary from a short-lived `-machine none` QEMU of its own; never decides by version string.
import { spawn } from 'node:child_process'
import { mkdtempSync, realpathSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import pino, { type Logger } from 'pino'
import { QmpdError } from '../errors.ts'
import { QmpClient } from '../qmp/index.ts'
import { sleep } from '../util.ts'
import { SANDBOX } from './argv.ts'
import { isAlive, waitForExit } from './proc.ts'

/** What one QEMU binary offers, from its own QMP introspection (qapi/introspect.json). */
export interface QemuCaps {
  readonly binary: string
  /** "10.0.2 (Debian …)": for logs only; nothing may branch on it. */
  readonly version: string
  /** query-version's numbers, for GET /v1/host; nothing may branch on them either. */
  readonly qmpVersion: { major: number; minor: number; micro: number; package: string }
  /** Every capability query-migrate-capabilities names, sorted. */
  readonly migrateCapabilities: readonly string[]
  hasCommand(name: string): boolean
  hasEvent(name: string): boolean
  /** A capability query-migrate-capabilities names. */
  hasMigrateCapability(name: string): boolean
  /** A member of migrate-set-parameters' arguments. */
  hasMigrateParameter(name: string): boolean
  /**
   * Member names of the command's argument object, or of the object reached by following the
   * members in `path` (through alternates, arrays and union branches). Empty when unknown.
   */
  commandArgs(command: string, path?: string[]): ReadonlySet<string>
  /** Enum values of the member at `path` of the command's arguments (empty when not an enum). */
  argEnum(command: string, path: string[]): ReadonlySet<string>
  /** Whether query-command-line-options lists `-option` (and, given, its parameter `param`). */
  hasCommandLineOption(option: string, param?: string): boolean
  /** The drivers blockdev-add accepts. */
  blockdevDrivers(): ReadonlySet<string>
}

/** One entry of query-qmp-schema (qapi/introspect.json SchemaInfo); type names other than commands and events are masked. */
export interface SchemaEntry {
  name: string
  'meta-type': string
  'arg-type'?: string
  'element-type'?: string
  /** object: {name, type}; alternate: {type}; enum (6.2+): {name}. */
  members?: Array<{ name?: string; type?: string }>
  variants?: Array<{ case: string; type: string }>
  /** enum values (deprecated since 6.2 in favour of members). */
  values?: string[]
}

/** The raw answers a QemuCaps is built from. */
export interface QemuCapsData {
  binary: string
  version: string
  qmpVersion: { major: number; minor: number; micro: number; package: string }
  schema: SchemaEntry[]
  migrateCapabilities: string[]
  commandLineOptions: Array<{ option: string; parameters: Array<{ name: string }> }>
}

/** Builds the queries over the probe's answers (pure; the probe and tests call it). */
export function capsFromData(d: QemuCapsData): QemuCaps {
  const byName = new Map<string, SchemaEntry>()
  const commands = new Map<string, SchemaEntry>()
  const events = new Set<string>()
  for (const e of d.schema) {
    if (e['meta-type'] === 'command') commands.set(e.name, e)
    else if (e['meta-type'] === 'event') events.add(e.name)
    else byName.set(e.name, e)
  }
  const migrateCaps = new Set(d.migrateCapabilities)
  const cmdline = new Map(d.commandLineOptions.map((o) => [o.option, new Set(o.parameters.map((p) => p.name))]))

  // Alternates and arrays are looked through: a member typed `[T]` or `T | str` leads to T.
  const leaves = (type: string, seen = new Set<string>()): SchemaEntry[] => {
    if (seen.has(type)) return []
    seen.add(type)
    const e = byName.get(type)
    if (!e) return []
    if (e['meta-type'] === 'array') return e['element-type'] ? leaves(e['element-type'], seen) : []
    if (e['meta-type'] === 'alternate') return (e.members ?? []).flatMap((m) => (m.type ? leaves(m.type, seen) : []))
    return [e]
  }
  // An object's members with those of every union branch (the branch types are objects too).
  const members = (obj: SchemaEntry, seen = new Set<string>()): Array<{ name: string; type: string }> => {
    if (seen.has(obj.name)) return []
    seen.add(obj.name)
    const own = (obj.members ?? []).flatMap((m) => (m.name !== undefined && m.type !== undefined ? [{ name: m.name, type: m.type }] : []))
    const branches = (obj.variants ?? []).flatMap((v) => leaves(v.type).filter((b) => b['meta-type'] === 'object').flatMap((b) => members(b, seen)))
    return [...own, ...branches]
  }
  const objectsAt = (command: string, path: string[]): SchemaEntry[] => {
    const argType = commands.get(command)?.['arg-type']
    if (argType === undefined) return []
    let types = [argType]
    for (const seg of path) {
      types = types.flatMap((t) => leaves(t)).filter((e) => e['meta-type'] === 'object').flatMap((o) => members(o).filter((m) => m.name === seg).map((m) => m.type))
    }
    return types.flatMap((t) => leaves(t))
  }
  const commandArgs = (command: string, path: string[] = []): ReadonlySet<string> =>
    new Set(objectsAt(command, path).filter((e) => e['meta-type'] === 'object').flatMap((o) => members(o).map((m) => m.name)))
  const argEnum = (command: string, path: string[]): ReadonlySet<string> =>
    new Set(objectsAt(command, path).filter((e) => e['meta-type'] === 'enum').flatMap((e) => e.members?.flatMap((m) => (m.name !== undefined ? [m.name] : [])) ?? e.values ?? []))
  const drivers = argEnum('blockdev-add', ['driver'])

  return {
    binary: d.binary,
    version: d.version,
    qmpVersion: d.qmpVersion,
    migrateCapabilities: [...migrateCaps].sort(),
    hasCommand: (name) => commands.has(name),
    hasEvent: (name) => events.has(name),
    hasMigrateCapability: (name) => migrateCaps.has(name),
    hasMigrateParameter: (name) => commandArgs('migrate-set-parameters').has(name),
    commandArgs,
    argEnum,
    hasCommandLineOption: (option, param) => {
      const params = cmdline.get(option)
      return params !== undefined && (param === undefined || params.has(param))
    },
    blockdevDrivers: () => drivers,
  }
}

/** Knobs of qemuCaps; the daemon takes the defaults. */
export interface QemuCapsOptions {
  log?: Logger
  /** Bounds the probe QEMU's start and QMP greeting (default 10 s). */
  connectTimeoutMs?: number
}

const known = new Map<string, Promise<QemuCaps>>()

/** The cache key of a binary: its real path and mtime, so an upgrade in place is probed again. */
function cacheKey(binary: string): string {
  try {
    const real = realpathSync(binary)
    return `${real}\0${statSync(real).mtimeMs}`
  } catch {
    // Not a path (a name looked up on PATH): the name itself.
    return `${binary}\0`
  }
}

/**
 * The capabilities of `binary`, probed once per binary (real path + mtime) and kept in memory; a
 * failed probe is not kept.
 * @throws QmpdError QEMU_NOT_FOUND when the binary cannot be run; QEMU_START_FAILED when its QMP never answers.
 */
export function qemuCaps(binary: string, opts: QemuCapsOptions = {}): Promise<QemuCaps> {
  const key = cacheKey(binary)
  let p = known.get(key)
  if (!p) {
    p = probeCaps(binary, opts).then(capsFromData)
    known.set(key, p)
    p.catch(() => known.delete(key))
  }
  return p
}

/**
 * Starts `binary -machine none -nodefaults -display none -S` on a private QMP unix socket, reads
 * query-version, query-qmp-schema, query-migrate-capabilities and query-command-line-options, then
 * quits it (SIGKILL by PID after 2 s) and removes its directory. About 0.1 s under TCG.
 * @throws QmpdError QEMU_NOT_FOUND when the binary cannot be run; QEMU_START_FAILED when its QMP never answers.
 */
export async function probeCaps(binary: string, opts: QemuCapsOptions = {}): Promise<QemuCapsData> {
  const log = opts.log ?? pino({ level: 'silent' })
  const dir = mkdtempSync(join(tmpdir(), 'qmpd-caps-'))
  const socket = join(dir, 'qmp.sock')
  // -S: no vCPU ever runs; -no-user-config: /etc/qemu/*.conf cannot add devices to the probe.
  const argv = ['-machine', 'none', '-nodefaults', '-no-user-config', '-display', 'none', '-sandbox', SANDBOX, '-S', '-qmp', `unix:${socket},server=on,wait=off`]
  const child = spawn(binary, argv, { stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.setEncoding('utf8')
  child.stderr.on('data', (s: string) => {
    stderr = (stderr + s).slice(-2048)
  })
  let exited = false
  const failed = new Promise<never>((_, reject) => {
    child.once('error', (err) => reject(new QmpdError('QEMU_NOT_FOUND', `cannot start ${binary}: ${err.message}`, { binary }, { cause: err })))
    child.once('exit', (code, signal) => reject(new QmpdError('QEMU_START_FAILED', `capability probe QEMU exited (${signal ?? code})${stderr ? `: ${stderr.trim()}` : ''}`, { binary })))
  })
  failed.catch(() => {
    exited = true
  })
  const qmp = new QmpClient({ logger: log.child({ component: 'qemu-caps' }) })
  const deadline = Date.now() + (opts.connectTimeoutMs ?? 10_000)
  try {
    const connect = async (): Promise<void> => {
      for (;;) {
        try {
          await qmp.connect({ path: socket }, { timeoutMs: 2_000 })
          return
        } catch (err) {
          // A QEMU that exited answers no more: the race below has already failed.
          if (exited) return
          if (Date.now() >= deadline) throw new QmpdError('QEMU_START_FAILED', `capability probe QEMU's QMP did not answer: ${(err as Error).message}`, { binary }, { cause: err })
          await sleep(25)
        }
      }
    }
    await Promise.race([connect(), failed])
    const v = await qmp.execute('query-version')
    const schema = (await qmp.execute('query-qmp-schema')) as SchemaEntry[]
    const caps = await qmp.execute('query-migrate-capabilities')
    const cmdline = await qmp.execute('query-command-line-options')
    return {
      binary,
      version: `${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}${v.package ? ` (${v.package.trim()})` : ''}`,
      qmpVersion: { ...v.qemu, package: v.package },
      schema,
      migrateCapabilities: caps.map((c) => c.capability),
      commandLineOptions: cmdline.map((o) => ({ option: o.option, parameters: o.parameters.map((p) => ({ name: p.name })) })),
    }
  } finally {
    await qmp.execute('quit').catch(() => {})
    await qmp.disconnect().catch(() => {})
    if (child.pid !== undefined && !(await waitForExit(child.pid, 2_000)) && isAlive(child.pid)) child.kill('SIGKILL')
    if (child.pid !== undefined) await waitForExit(child.pid, 5_000)
    rmSync(dir, { recursive: true, force: true })
  }
}

/** The few capabilities worth one start-up log line and GET /v1/host (what qmpd chooses by). */
export function capsSummary(c: QemuCaps): Record<string, boolean> {
  return {
    'snapshot-save': c.hasCommand('snapshot-save'),
    'blockdev-reopen': c.hasCommand('blockdev-reopen'),
    'background-snapshot': c.hasMigrateCapability('background-snapshot'),
    'mapped-ram': c.hasMigrateCapability('mapped-ram'),
    multifd: c.hasMigrateCapability('multifd'),
    'direct-io': c.hasMigrateParameter('direct-io'),
    'migrate-channels': c.commandArgs('migrate').has('channels'),
    'migrate-blk': c.commandArgs('migrate').has('blk'),
    'snapshot-access': c.blockdevDrivers().has('snapshot-access'),
    'query-stats': c.hasCommand('query-stats'),
  }
}
