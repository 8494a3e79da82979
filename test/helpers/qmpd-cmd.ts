// The command line and environment that run `qmpd` in a child process of a test; starts nothing
// itself (qmpdServeCommand builds, once per test process, the bundle it runs).
import { buildSync } from 'esbuild'
import { copyFileSync, mkdirSync, rmSync } from 'node:fs'
import { join } from 'node:path'

const ROOT = new URL('../..', import.meta.url).pathname
const BIN = join(ROOT, 'bin/qmpd.js')

/**
 * [executable, args, env] for `qmpd ARGS...` with `env`: the real binary (bin/qmpd.js, the sources
 * through tsx). The child records no coverage: it runs the sources through tsx, whose coverage tap
 * cannot map, and merging it spoiled tap's whole report (files a child had loaded vanished from it
 * or showed false numbers). Running the child through tap's own TypeScript loader instead would
 * count it, but starts it in ~6 s instead of ~1 s. So the coverage tap reports is that of the code
 * the test processes themselves run.
 */
export function qmpdCommand(args: string[], env: NodeJS.ProcessEnv = process.env): [string, string[], NodeJS.ProcessEnv] {
  return [process.execPath, [BIN, ...args], { ...env, _TAPJS_PROCESSINFO_COVERAGE_: '0' }]
}

let bundle: string | undefined

/**
 * The same as qmpdCommand, for the crash matrix's hundreds of `qmpd serve` children: the same
 * sources (src/cli/main.ts) bundled once per test process by esbuild (the transform tsx itself
 * uses; the packages stay imports from node_modules), which starts in about half the CPU time of
 * tsx's per-module loader hooks (0.5 s against 1.4 s here, and far less waiting on a loaded host).
 * The one file qmpd spawns by path, src/state/receiver.mjs, is copied beside the bundle, where its
 * import.meta.url-relative lookup finds it. Tests of the binary itself (serve, lock, the client
 * commands) use qmpdCommand.
 */
export function qmpdServeCommand(args: string[], env: NodeJS.ProcessEnv = process.env): [string, string[], NodeJS.ProcessEnv] {
  if (!bundle) {
    // Inside the checkout (node_modules resolves from there), one directory per test process.
    const dir = join(ROOT, '.tap', `qmpd-bundle-${process.pid}`)
    mkdirSync(dir, { recursive: true })
    process.once('exit', () => rmSync(dir, { recursive: true, force: true }))
    const out = join(dir, 'qmpd.mjs')
    buildSync({ entryPoints: [join(ROOT, 'src/cli/main.ts')], bundle: true, platform: 'node', format: 'esm', packages: 'external', target: 'node20', outfile: out, logLevel: 'warning' })
    copyFileSync(join(ROOT, 'src/state/receiver.mjs'), join(dir, 'receiver.mjs'))
    bundle = out
  }
  return [process.execPath, [bundle, ...args], { ...env, _TAPJS_PROCESSINFO_COVERAGE_: '0' }]
}
