// CPU profiles of a window of the bench process (node:inspector), for finding where qmpd spends
// its time in a case that misses. The .cpuprofile opens in Chrome DevTools or speedscope.
import { Session } from 'node:inspector/promises'
import { writeFileSync } from 'node:fs'

interface ProfileNode {
  id: number
  callFrame: { functionName: string; url: string; lineNumber: number }
  hitCount?: number
  children?: number[]
}
interface Profile {
  nodes: ProfileNode[]
  startTime: number
  endTime: number
  samples?: number[]
  timeDeltas?: number[]
}

/** Profiles `fn`; writes the profile to `file` and returns the top self-time frames (ms). */
export async function profiled<T>(
  file: string,
  fn: () => Promise<T>,
  intervalUs = 200,
): Promise<{ value: T; top: Array<{ frame: string; selfMs: number }>; files: Array<{ frame: string; selfMs: number }>; longestTaskMs: number }> {
  const session = new Session()
  session.connect()
  await session.post('Profiler.enable')
  await session.post('Profiler.setSamplingInterval', { interval: intervalUs })
  await session.post('Profiler.start')
  let value: T
  let profile: Profile
  try {
    value = await fn()
  } finally {
    profile = ((await session.post('Profiler.stop')) as unknown as { profile: Profile }).profile
    writeFileSync(file, JSON.stringify(profile))
    session.disconnect()
  }
  return { value, top: topSelf(profile, 25), files: topSelf(profile, 25, true), longestTaskMs: longestBusy(profile) }
}

/** Self time per frame (function + file:line), or per file with `byFile`, largest first. */
export function topSelf(p: Profile, n: number, byFile = false): Array<{ frame: string; selfMs: number }> {
  const byId = new Map(p.nodes.map((x) => [x.id, x]))
  const self = new Map<string, number>()
  const samples = p.samples ?? []
  const deltas = p.timeDeltas ?? []
  for (let i = 0; i < samples.length; i++) {
    const node = byId.get(samples[i]!)
    if (!node) continue
    const cf = node.callFrame
    const url = cf.url.replace(/^file:\/\/.*?\/(node_modules|src|bench|test)\//, '$1/')
    const key = byFile ? url.replace(/^node:.*/, 'node:*') || cf.functionName : `${cf.functionName || '(anonymous)'} ${url}:${cf.lineNumber + 1}`
    self.set(key, (self.get(key) ?? 0) + (deltas[i + 1] ?? deltas[i] ?? 0) / 1000)
  }
  return [...self.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, n)
    .map(([frame, selfMs]) => ({ frame, selfMs: Math.round(selfMs * 10) / 10 }))
}

/** The longest run of consecutive samples that are not (idle)/(program): the longest busy stretch, in ms. */
export function longestBusy(p: Profile): number {
  const byId = new Map(p.nodes.map((x) => [x.id, x]))
  let best = 0
  let cur = 0
  const samples = p.samples ?? []
  const deltas = p.timeDeltas ?? []
  for (let i = 0; i < samples.length; i++) {
    const name = byId.get(samples[i]!)?.callFrame.functionName
    const dt = (deltas[i] ?? 0) / 1000
    if (name === '(idle)') {
      best = Math.max(best, cur)
      cur = 0
    } else {
      cur += dt
    }
  }
  return Math.round(Math.max(best, cur) * 10) / 10
}
