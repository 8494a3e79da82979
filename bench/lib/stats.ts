// Summary statistics of a sample of timings (milliseconds or any other unit).

/** min / median / p95 / p99 / max / mean of a sample, and how many values it has. */
export interface Stats {
  n: number
  min: number
  median: number
  p95: number
  p99: number
  max: number
  mean: number
}

/** Nearest-rank percentile of an ascending sample (p in 0..100). */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN
  const rank = Math.ceil((p / 100) * sorted.length)
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]!
}

/** The median: the mean of the two middle values for an even count. */
export function median(sorted: readonly number[]): number {
  if (sorted.length === 0) return NaN
  const mid = sorted.length >> 1
  return sorted.length % 2 ? sorted[mid]! : (sorted[mid - 1]! + sorted[mid]!) / 2
}

/** Summarizes a sample. Throws on an empty one: a number is never made up. */
export function summarize(values: readonly number[]): Stats {
  if (values.length === 0) throw new Error('no measurements')
  const s = [...values].sort((a, b) => a - b)
  return {
    n: s.length,
    min: s[0]!,
    median: median(s),
    p95: percentile(s, 95),
    p99: percentile(s, 99),
    max: s[s.length - 1]!,
    mean: s.reduce((a, b) => a + b, 0) / s.length,
  }
}

/** Rounds for display and JSON: 3 significant decimals below 10, 1 decimal below 1000, else integers. */
export function round(v: number): number {
  if (!Number.isFinite(v)) return v
  const a = Math.abs(v)
  if (a < 10) return Math.round(v * 1000) / 1000
  if (a < 1000) return Math.round(v * 10) / 10
  return Math.round(v)
}

/** A Stats object with every field rounded. */
export function rounded(s: Stats): Stats {
  return {
    n: s.n,
    min: round(s.min),
    median: round(s.median),
    p95: round(s.p95),
    p99: round(s.p99),
    max: round(s.max),
    mean: round(s.mean),
  }
}
