// Writes the API's OpenAPI document (as GET /openapi.json serves it) to a file or stdout, without
// listening and without a state directory: the routes are built over no services (none is called;
// the metrics get an idle bus and no VMs).
import { writeFileSync } from 'node:fs'
import { pino } from 'pino'
import { EventBus } from '../src/events/bus.ts'
import { buildApp, type Services } from '../src/http/app.ts'

/** The document as the app serves it. */
export async function openapiDocument(): Promise<unknown> {
  const pkg = (await import('../package.json', { with: { type: 'json' } })).default as { version: string }
  const app = await buildApp({ services: { bus: new EventBus(), vms: { list: async () => [] } } as unknown as Services, logger: pino({ level: 'silent' }), version: pkg.version, token: 'document-only' })
  try {
    const res = await app.inject({ method: 'GET', url: '/openapi.json' })
    if (res.statusCode !== 200) throw new Error(`GET /openapi.json: ${res.statusCode} ${res.body}`)
    return res.json()
  } finally {
    await app.close()
  }
}

const out = process.argv[2]
const text = JSON.stringify(await openapiDocument(), null, 2) + '\n'
if (out) writeFileSync(out, text)
else process.stdout.write(text)
