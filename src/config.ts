// Daemon-wide settings from flags and environment, resolved once at start; reads nothing else at
// run time.
import { availableParallelism, homedir } from 'node:os'
import { join, resolve } from 'node:path'
import { checkAllowEntry } from './vm/passthrough.ts'

/** Daemon-wide settings, resolved once at start from flags and environment. */
export interface Config {
  /** Root of everything qmpd writes: the store, the token, every VM's directory. */
  stateDir: string
  /** "host:port" or "unix:/path". */
  listen: string
  /** Optional second listener serving only GET /metrics, without a token (localhost or a private address). */
  metricsListen?: string
  qemuBinary: string
  qemuImgBinary: string
  /** 'auto' picks kvm when /dev/kvm is usable, else tcg. */
  accel: 'auto' | 'kvm' | 'tcg'
  /** Directories outside stateDir where user-named files (disks, overlays, saves) may live. */
  allowedDirs: string[]
  logLevel: string
  /** Fixed API token (QMPD_TOKEN); when absent one is generated into <stateDir>/token. */
  token?: string
  /**
   * How many disk-only snapshots may be switching disks in QEMU at the same moment, over all VMs
   * (QMPD_PARALLEL_DISK_SNAPSHOTS; default twice the CPUs). A burst of snapshots on many VMs then
   * creates overlays a few at a time instead of all at once, which keeps the host (and the
   * daemon's event loop) responsive without slowing the burst down.
   */
  parallelDiskSnapshots: number
  /**
   * How long a stopping QEMU gets to exit after `quit` before qmpd sends SIGKILL (default 10 s).
   * Not taken from the environment: tests shorten it to exercise a wedged QEMU.
   */
  quitTimeoutMs?: number
  /**
   * Whether POST /v1/vms/{vm}/qmp (the QMP escape hatch) is served at all (--qmp-passthrough,
   * QMPD_QMP_PASSTHROUGH=1). Off by default: it hands QEMU commands that reach host files.
   */
  qmpPassthrough: boolean
  /**
   * Allow-list entries added to the escape hatch's defaults (query-*, stop, cont): command names,
   * prefixes ending in `*`, or `*` (--qmp-allow, repeatable; QMPD_QMP_ALLOW, comma-separated).
   * A command in RISKY_QMP_COMMANDS (src/vm/passthrough.ts) is allowed only by its exact name.
   */
  qmpAllow: string[]
  /**
   * Start with an empty store even though <stateDir>/vms holds VM directories (--fresh-store,
   * QMPD_FRESH_STORE=1); without it a missing or empty qmpd.db next to them is refused.
   */
  freshStore?: boolean
}

/** The default state directory: $XDG_STATE_HOME/qmpd, else ~/.local/state/qmpd. */
export function defaultStateDir(env: NodeJS.ProcessEnv = process.env): string {
  const xdg = env['XDG_STATE_HOME']
  return join(xdg && xdg.startsWith('/') ? xdg : join(homedir(), '.local', 'state'), 'qmpd')
}

/** Builds a Config from partial overrides and the environment (QMPD_STATE_DIR, QMPD_TOKEN, QMPD_QEMU…). */
export function makeConfig(over: Partial<Config> = {}, env: NodeJS.ProcessEnv = process.env): Config {
  const stateDir = resolve(over.stateDir ?? env['QMPD_STATE_DIR'] ?? defaultStateDir(env))
  const token = over.token ?? (env['QMPD_TOKEN'] || undefined)
  const metricsListen = over.metricsListen ?? (env['QMPD_METRICS_LISTEN'] || undefined)
  return {
    stateDir,
    listen: over.listen ?? env['QMPD_LISTEN'] ?? '127.0.0.1:7777',
    ...(metricsListen ? { metricsListen } : {}),
    qemuBinary: over.qemuBinary ?? env['QMPD_QEMU'] ?? 'qemu-system-x86_64',
    qemuImgBinary: over.qemuImgBinary ?? env['QMPD_QEMU_IMG'] ?? 'qemu-img',
    accel: over.accel ?? parseAccel(env['QMPD_ACCEL']),
    allowedDirs: (over.allowedDirs ?? (env['QMPD_ALLOW_DIRS'] ?? '').split(':').filter(Boolean)).map((d) => resolve(d)),
    logLevel: over.logLevel ?? env['QMPD_LOG_LEVEL'] ?? 'info',
    parallelDiskSnapshots: over.parallelDiskSnapshots ?? parseCount(env['QMPD_PARALLEL_DISK_SNAPSHOTS'], 'QMPD_PARALLEL_DISK_SNAPSHOTS') ?? 2 * availableParallelism(),
    qmpPassthrough: over.qmpPassthrough ?? parseFlag(env['QMPD_QMP_PASSTHROUGH'], 'QMPD_QMP_PASSTHROUGH') ?? false,
    qmpAllow: (over.qmpAllow ?? (env['QMPD_QMP_ALLOW'] ?? '').split(',').map((e) => e.trim()).filter(Boolean)).map(checkAllowEntry),
    ...(token ? { token } : {}),
    ...(over.quitTimeoutMs !== undefined ? { quitTimeoutMs: over.quitTimeoutMs } : {}),
    ...((over.freshStore ?? parseFlag(env['QMPD_FRESH_STORE'], 'QMPD_FRESH_STORE')) ? { freshStore: true } : {}),
  }
}

/** A positive integer from the environment, or undefined when unset; anything else is an error. */
export function parseCount(v: string | undefined, name: string): number | undefined {
  if (v === undefined || v === '') return undefined
  const n = Number(v)
  if (!Number.isInteger(n) || n < 1 || n > 1024) throw new Error(`${name} must be an integer from 1 to 1024, got ${JSON.stringify(v)}`)
  return n
}

/** A boolean from the environment (1/true/on, 0/false/off), or undefined when unset; anything else is an error. */
export function parseFlag(v: string | undefined, name: string): boolean | undefined {
  if (v === undefined || v === '') return undefined
  if (/^(1|true|on|yes)$/i.test(v)) return true
  if (/^(0|false|off|no)$/i.test(v)) return false
  throw new Error(`${name} must be 1 or 0 (true/false, on/off), got ${JSON.stringify(v)}`)
}

function parseAccel(v: string | undefined): Config['accel'] {
  return v === 'kvm' || v === 'tcg' ? v : 'auto'
}
