// Writes the served OpenAPI document to openapi.json (or the path given) without listening: a
// throw-away daemon on a temporary state dir answers GET /openapi.json through fastify.inject.
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pino } from 'pino'
import { makeConfig } from '../src/config.ts'
import { startDaemon } from '../src/daemon.ts'

const out = process.argv[2] ?? 'openapi.json'
const stateDir = await mkdtemp(join(tmpdir(), 'qmpd-openapi-'))
try {
  const daemon = await startDaemon(makeConfig({ stateDir }, {}), pino({ level: 'silent' }))
  try {
    const app = await daemon.app()
    const res = await app.inject({ method: 'GET', url: '/openapi.json' })
    if (res.statusCode !== 200) throw new Error(`GET /openapi.json answered ${res.statusCode}: ${res.body}`)
    await writeFile(out, JSON.stringify(JSON.parse(res.body), null, 2) + '\n')
    await app.close()
  } finally {
    await daemon.close()
  }
} finally {
  await rm(stateDir, { recursive: true, force: true })
}
