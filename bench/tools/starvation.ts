// Side experiment (not part of npm run bench): with N raw 16 MiB TCG guests spinning, how long do
// trivial synchronous operations take on this process's main thread, at nice 0 and nice -10?
// Separates "the host starves the daemon" from "the daemon does too much work".
//   node --import tsx bench/tools/starvation.ts [N]
import { mkdtempSync, realpathSync, statSync, writeFileSync } from 'node:fs'
import { setPriority } from 'node:os'
import { join } from 'node:path'
import { bootDisk } from '../lib/images.ts'
import { installExitHandlers, reapAll } from '../lib/reaper.ts'
import { launchRaw, rawCont, rmrf, vmDef, type RawVm } from '../lib/raw.ts'
import { summarize } from '../lib/stats.ts'

const n = Number(process.argv[2] ?? 50)
installExitHandlers()
const work = mkdtempSync('/var/tmp/qb-starve-')
const vms: RawVm[] = []

function spin(ms: number): void {
  const end = performance.now() + ms
  while (performance.now() < end) {
    /* busy */
  }
}

function measure(label: string): void {
  const cpu: number[] = []
  const st: number[] = []
  const rp: number[] = []
  const wr: number[] = []
  const f = join(work, 'probe.txt')
  const t0 = performance.now()
  while (performance.now() - t0 < 5000) {
    let t = performance.now()
    spin(0.2)
    cpu.push(performance.now() - t)
    t = performance.now()
    statSync(work)
    st.push(performance.now() - t)
    t = performance.now()
    realpathSync(f.replace('probe.txt', ''))
    rp.push(performance.now() - t)
    t = performance.now()
    writeFileSync(f, 'x')
    wr.push(performance.now() - t)
  }
  const fmt = (name: string, v: number[]): string => {
    const s = summarize(v)
    return `${name} median ${s.median.toFixed(3)} p99 ${s.p99.toFixed(2)} max ${s.max.toFixed(1)} ms`
  }
  console.log(`${label} (${cpu.length} iterations):\n  ${fmt('0.2 ms of CPU', cpu)}\n  ${fmt('statSync', st)}\n  ${fmt('realpathSync', rp)}\n  ${fmt('writeFileSync', wr)}`)
}

try {
  measure('no guests')
  for (let i = 0; i < n; i++) {
    const dir = join(work, `g${i}`)
    const disk = join(dir, 'vda.qcow2')
    await import('node:fs').then((fs) => fs.mkdirSync(dir, { recursive: true }))
    await bootDisk(disk, 16, 0)
    const vm = await launchRaw(join(dir, 'run'), vmDef(`g${i}`, 16, [{ id: 'vda', file: disk }]), [{ id: 'vda', file: disk, format: 'qcow2', gen: 0 }])
    await rawCont(vm.qmp)
    vms.push(vm)
  }
  await new Promise((r) => setTimeout(r, 2000))
  measure(`${n} guests running, nice 0`)
  setPriority(process.pid, -10)
  measure(`${n} guests running, main thread nice -10`)
  setPriority(process.pid, 0)
  await Promise.all(vms.map((v) => v.qmp.cmd('stop')))
  await new Promise((r) => setTimeout(r, 1000))
  measure(`${n} guests paused`)
} finally {
  await Promise.all(vms.map((v) => v.quit()))
  await reapAll()
  await rmrf(work)
}
