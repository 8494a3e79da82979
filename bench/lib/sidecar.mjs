// A helper process for the 50-VM case, driven by JSON lines on stdin (one JSON reply line each):
//   {"cmd":"eld-start"} / {"cmd":"eld-stop"}: this process's own event-loop delay (the floor: an
//     idle Node.js process on the same host at the same moment, next to the daemon's measurement);
//   {"cmd":"burst","port":N,"requests":[{"path":..,"body":..}]}: fires the POSTs at once over
//     loopback keep-alive HTTP and returns each request's latency, so that the client's work is
//     not in the daemon's process.
// Plain JavaScript, no dependencies: it starts in ~50 ms and shares no code with qmpd.
import { Agent, request } from 'node:http'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { createInterface } from 'node:readline'

let eld
const agent = new Agent({ keepAlive: true, maxSockets: 1000 })
const reply = (o) => process.stdout.write(JSON.stringify(o) + '\n')

function post(port, path, body) {
  const payload = JSON.stringify(body)
  return new Promise((resolve) => {
    const t0 = performance.now()
    const req = request(
      { host: '127.0.0.1', port, path, method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } },
      (res) => {
        let text = ''
        res.setEncoding('utf8')
        res.on('data', (c) => (text += c))
        res.on('end', () => resolve({ ms: performance.now() - t0, status: res.statusCode, body: res.statusCode === 200 ? '' : text.slice(0, 300) }))
        res.on('error', (e) => resolve({ ms: performance.now() - t0, status: 0, body: String(e) }))
      },
    )
    req.on('error', (e) => resolve({ ms: performance.now() - t0, status: 0, body: String(e) }))
    req.end(payload)
  })
}

for await (const line of createInterface({ input: process.stdin })) {
  const m = JSON.parse(line)
  if (m.cmd === 'eld-start') {
    // A fresh histogram each time: after disable()/enable() a histogram would count the pause
    // in between as one long delay.
    eld = monitorEventLoopDelay({ resolution: 1 })
    eld.enable()
    reply({ ok: true })
  } else if (m.cmd === 'eld-stop') {
    eld.disable()
    reply({ p99: eld.percentile(99) / 1e6, max: eld.max / 1e6, count: eld.count })
  } else if (m.cmd === 'burst') {
    const results = await Promise.all(m.requests.map((r) => post(m.port, r.path, r.body)))
    reply({ results })
  } else if (m.cmd === 'exit') {
    break
  }
}
agent.destroy()
