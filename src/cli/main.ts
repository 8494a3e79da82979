// The qmpd command line: parses flags into a Config and starts the daemon; no daemon logic of its
// own.
import { parseArgs } from 'node:util'
import { VERSION } from '../version.ts'

const HELP = `qmpd ${VERSION}: snapshots, checkpoints and saved state of QEMU VMs over QMP

Usage:
  qmpd serve [--listen ADDR] [--metrics-listen ADDR] [--state-dir DIR]
             [--qemu-binary PATH] [--qemu-img PATH]
             [--accel auto|kvm|tcg] [--allow-dir DIR]... [--log-level LEVEL]
             [--parallel-disk-snapshots N] [--qmp-passthrough [--qmp-allow CMD]...]
             [--fresh-store]
  qmpd vm|snapshot|disk|save|restore|managedsave|job|events|completion ...
                      the client commands (qmpd vm --help, …; README "Command line")
  qmpd --help | --version

Options:
  --listen ADDR       host:port (default 127.0.0.1:7777; needs the bearer token) or unix:/path
                      (mode 0660, no token)
  --metrics-listen ADDR
                      also serve GET /metrics alone on ADDR, without a token (give it
                      127.0.0.1:PORT or a private address; also $QMPD_METRICS_LISTEN)
  --state-dir DIR     everything qmpd keeps (default $QMPD_STATE_DIR, $XDG_STATE_HOME/qmpd,
                      or ~/.local/state/qmpd)
  --qemu-binary PATH  qemu-system-x86_64 to run (default $QMPD_QEMU or from PATH)
  --qemu-img PATH     qemu-img to run (default $QMPD_QEMU_IMG or from PATH)
  --accel A           auto (kvm where the host probe runs a long-mode guest under it, else tcg), kvm or tcg
  --allow-dir DIR     a directory outside the state dir where disks and snapshot files may live
  --log-level LEVEL   trace, debug, info (default), warn, error
  --parallel-disk-snapshots N
                      disk-only snapshots switching disks in QEMU at once, over all VMs
                      (default $QMPD_PARALLEL_DISK_SNAPSHOTS or twice the CPUs)
  --qmp-passthrough   serve POST /v1/vms/{vm}/qmp, the QMP escape hatch (off by default, or
                      $QMPD_QMP_PASSTHROUGH=1); it then allows query-*, stop and cont
  --qmp-allow CMD     also allow CMD through the escape hatch: a command name, a prefix ending
                      in * (block-job-*), or * (repeatable; $QMPD_QMP_ALLOW, comma-separated).
                      Commands that reach host files or processes (migrate, blockdev-add,
                      human-monitor-command, pmemsave, …) are allowed only by their exact name
  --fresh-store       start with an empty store although <state-dir>/vms holds VM directories
                      (without it a missing or 0-byte qmpd.db is refused; also QMPD_FRESH_STORE=1)

Environment: QMPD_TOKEN fixes the API token; otherwise it is generated into <state-dir>/token.
`

/** Entry point of the qmpd command. */
export async function main(argv: string[]): Promise<number> {
  // Everything but `serve` (and a bare qmpd, --help or --version) is a client command.
  if (argv[0] !== 'serve' && !(argv.length <= 1 && ['--help', '-h', '--version', undefined].includes(argv[0]))) {
    // A client command loads the client alone (commander, openapi-fetch), not the daemon: about a
    // second less per invocation.
    const { runClient } = await import('./client-main.ts')
    return runClient(argv)
  }
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      listen: { type: 'string' },
      'metrics-listen': { type: 'string' },
      'state-dir': { type: 'string' },
      'qemu-binary': { type: 'string' },
      'qemu-img': { type: 'string' },
      accel: { type: 'string' },
      'allow-dir': { type: 'string', multiple: true },
      'log-level': { type: 'string' },
      'parallel-disk-snapshots': { type: 'string' },
      'qmp-passthrough': { type: 'boolean' },
      'qmp-allow': { type: 'string', multiple: true },
      'fresh-store': { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
      version: { type: 'boolean' },
    },
  })
  if (values.version) {
    process.stdout.write(`${VERSION}\n`)
    return 0
  }
  if (values.help || positionals[0] !== 'serve') {
    process.stdout.write(HELP)
    return values.help ? 0 : 2
  }
  const [{ makeConfig, parseCount }, { startDaemon }, { listenMetrics }, { listen }, { capsSummary, qemuCaps }, { qemuVersion }] = await Promise.all([
    import('../config.ts'),
    import('../daemon.ts'),
    import('../http/metrics-server.ts'),
    import('../http/server.ts'),
    import('../vm/qemu-caps.ts'),
    import('../vm/qemu-version.ts'),
  ])
  const accel = values.accel
  if (accel !== undefined && accel !== 'auto' && accel !== 'kvm' && accel !== 'tcg') {
    process.stderr.write(`--accel must be auto, kvm or tcg\n`)
    return 2
  }
  const parallel = parseCount(values['parallel-disk-snapshots'], '--parallel-disk-snapshots')
  const config = makeConfig({
    ...(values.listen ? { listen: values.listen } : {}),
    ...(values['metrics-listen'] ? { metricsListen: values['metrics-listen'] } : {}),
    ...(values['state-dir'] ? { stateDir: values['state-dir'] } : {}),
    ...(values['qemu-binary'] ? { qemuBinary: values['qemu-binary'] } : {}),
    ...(values['qemu-img'] ? { qemuImgBinary: values['qemu-img'] } : {}),
    ...(accel ? { accel } : {}),
    ...(values['allow-dir'] ? { allowedDirs: values['allow-dir'] } : {}),
    ...(values['log-level'] ? { logLevel: values['log-level'] } : {}),
    ...(parallel !== undefined ? { parallelDiskSnapshots: parallel } : {}),
    ...(values['qmp-passthrough'] ? { qmpPassthrough: true } : {}),
    ...(values['qmp-allow'] ? { qmpAllow: values['qmp-allow'] } : {}),
    ...(values['fresh-store'] ? { freshStore: true } : {}),
  })
  if (config.qmpAllow.length && !config.qmpPassthrough) process.stderr.write('qmpd: --qmp-allow has no effect without --qmp-passthrough (the escape hatch stays off)\n')
  const daemon = await startDaemon(config)
  // A bug in one operation must not take the control plane down with it: QEMUs keep running
  // either way, but an exiting daemon would leave every VM unmanaged. Log loudly and serve on.
  process.on('unhandledRejection', (err) => daemon.log.error({ err }, 'unhandled rejection (a qmpd bug)'))
  // Once per start: which QEMU the VMs will run (a missing binary is a warning; adopted VMs need none).
  // The capability probe runs here once (cached per binary for VM starts and GET /v1/host).
  const [qemu, caps] = await Promise.all([
    qemuVersion(config.qemuBinary),
    qemuCaps(config.qemuBinary, { log: daemon.log }).then((c) => ({ capabilities: capsSummary(c) }), (err: Error) => ({ capabilitiesError: err.message })),
  ])
  if (qemu.line !== undefined) daemon.log.info({ qemuBinary: config.qemuBinary, qemuVersion: qemu.line, ...caps }, 'QEMU binary')
  else daemon.log.warn({ qemuBinary: config.qemuBinary, err: qemu.error }, 'QEMU binary cannot report its version: starting VMs will fail')
  const { app } = await listen(daemon, config.listen)
  const metricsServer = config.metricsListen ? await listenMetrics(app, config.metricsListen) : undefined
  if (metricsServer) daemon.log.info({ address: metricsServer.address }, 'serving GET /metrics without a token')
  daemon.log.info({ stateDir: config.stateDir, version: VERSION }, 'qmpd serving')
  await new Promise<void>((resolve) => {
    const stop = (sig: string): void => {
      daemon.log.info({ signal: sig }, 'shutting down; VMs keep running')
      resolve()
    }
    process.once('SIGINT', stop)
    process.once('SIGTERM', stop)
  })
  await metricsServer?.server.close()
  await app.close()
  await daemon.close()
  return 0
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`qmpd: ${err instanceof Error ? err.message : String(err)}\n`)
    process.exit(1)
  },
)
