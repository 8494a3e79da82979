// Prints, for each HTTP request in a daemon debug log written by `npm run bench -- --log debug`,
// the QMP traffic with milliseconds since the request arrived (and each command's round trip).
//   node --import tsx bench/tools/timeline.ts <work dir>/<case>-*/qmpd.log [url-regex]
import { readFileSync } from 'node:fs'

const [file, pattern] = process.argv.slice(2)
if (!file) {
  console.error('usage: timeline.ts <qmpd.log> [url-regex]')
  process.exit(2)
}
const re = pattern ? new RegExp(pattern) : /./
let t0 = 0
let on = false
for (const line of readFileSync(file, 'utf8').split('\n')) {
  if (!line.trim()) continue
  const l = JSON.parse(line) as Record<string, any>
  if (l['msg'] === 'incoming request') {
    t0 = l['time']
    on = re.test(String(l['req']?.url ?? ''))
    if (on) console.log(`---- ${l['req']?.method} ${l['req']?.url}`)
  }
  if (!on) continue
  const parts = [l['msg'], l['command'], l['event'], l['status'], l['state']].filter((x) => x !== undefined)
  const rtt = l['msg'] === 'qmp recv' ? ` (${l['ms']} ms)` : ''
  console.log(`${String(l['time'] - t0).padStart(6)}  ${parts.join(' ')}${rtt}`)
}
