// The command line and environment that run `qmpd` in a child process of a test; starts nothing
// itself.
const BIN = new URL('../../bin/qmpd.js', import.meta.url).pathname

/**
 * [executable, args, env] for `qmpd ARGS...` with `env`. The child records no coverage: it runs
 * the sources through tsx, whose coverage tap cannot map, and merging it spoiled tap's whole
 * report (files a child had loaded vanished from it or showed false numbers). Running the child
 * through tap's own TypeScript loader instead would count it, but starts it in ~6 s instead of
 * ~1 s, which the crash matrix's hundreds of daemons cannot afford. So the coverage tap reports
 * is that of the code the test processes themselves run.
 */
export function qmpdCommand(args: string[], env: NodeJS.ProcessEnv = process.env): [string, string[], NodeJS.ProcessEnv] {
  return [process.execPath, [BIN, ...args], { ...env, _TAPJS_PROCESSINFO_COVERAGE_: '0' }]
}
