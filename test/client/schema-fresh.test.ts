// The committed client types are what openapi-typescript makes of the document the app serves now.
import { execFile } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import t from 'tap'

const run = promisify(execFile)
const root = new URL('../..', import.meta.url).pathname

t.test('src/client/schema.d.ts is regenerated from the served document without a difference', async (t) => {
  const dir = t.testdir()
  const doc = join(dir, 'openapi.json')
  const types = join(dir, 'schema.d.ts')
  // The script runs through tsx like the daemon; it records no coverage (see test/helpers/qmpd-cmd.ts).
  await run(process.execPath, ['--import', 'tsx', join(root, 'scripts/openapi.ts'), doc], { cwd: root, env: { ...process.env, _TAPJS_PROCESSINFO_COVERAGE_: '0' } })
  await run(process.execPath, [join(root, 'node_modules/openapi-typescript/bin/cli.js'), doc, '-o', types], { cwd: root })
  const fresh = await readFile(types, 'utf8')
  const committed = await readFile(join(root, 'src/client/schema.d.ts'), 'utf8')
  t.ok(JSON.parse(await readFile(doc, 'utf8')).paths['/v1/jobs/{id}'], 'the document has the job route')
  t.equal(committed, fresh, 'committed types match the document (run npm run gen:client and commit)')
})
