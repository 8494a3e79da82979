// CPU model and topology of a VM definition (zod schema, -smp/-cpu values, the check of a model
// against QEMU's own list); chooses no accelerator.
import { execFile } from 'node:child_process'
import { z } from 'zod'
import { QmpdError } from '../errors.ts'

/** A QEMU CPU model name: no commas or '=' (no feature flags or other options ride along). */
export const CPU_MODEL = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/

/** The `cpu` field of a definition. */
export const CpuSpec = z.strictObject({
  model: z
    .string()
    .regex(CPU_MODEL, 'must be a QEMU CPU model name (qemu-system-x86_64 -cpu help), without feature flags')
    .optional()
    .describe('QEMU CPU model; default: host under a KVM the probe found working, qemu64 under TCG'),
  sockets: z.number().int().min(1).max(64).optional(),
  cores: z.number().int().min(1).max(64).optional(),
  threads: z.number().int().min(1).max(64).optional(),
})
export type CpuSpec = z.output<typeof CpuSpec>

/** The most vCPUs a definition may have (as `cpus` allows). */
export const MAX_CPUS = 64

/** A VM's vCPU topology, every member known. */
export interface CpuTopology {
  cpus: number
  sockets: number
  cores: number
  threads: number
}

/** True when the definition gives any of sockets, cores, threads. */
function hasTopology(cpu: CpuSpec | undefined): boolean {
  return cpu?.sockets !== undefined || cpu?.cores !== undefined || cpu?.threads !== undefined
}

/**
 * Why `cpus` and `cpu` do not fit together, or undefined. With a topology, its product is the
 * number of vCPUs: `cpus`, when given too, must equal it.
 */
export function topologyIssue(cpus: number | undefined, cpu: CpuSpec | undefined): string | undefined {
  if (!hasTopology(cpu)) return undefined
  const t = topologyOf(cpus, cpu)
  const product = t.sockets * t.cores * t.threads
  if (product > MAX_CPUS) return `sockets*cores*threads is ${product}, more than ${MAX_CPUS} vCPUs`
  if (cpus !== undefined && cpus !== product) return `sockets*cores*threads is ${product} but cpus is ${cpus}`
  return undefined
}

/** The topology a definition asks for: `cpus` alone means that many sockets of one core (QEMU's default). */
export function topologyOf(cpus: number | undefined, cpu: CpuSpec | undefined): CpuTopology {
  if (!hasTopology(cpu)) {
    const n = cpus ?? 1
    return { cpus: n, sockets: n, cores: 1, threads: 1 }
  }
  const sockets = cpu?.sockets ?? 1
  const cores = cpu?.cores ?? 1
  const threads = cpu?.threads ?? 1
  return { cpus: sockets * cores * threads, sockets, cores, threads }
}

/** The value of QEMU's -smp for a definition. */
export function smpArg(cpus: number | undefined, cpu: CpuSpec | undefined): string {
  if (!hasTopology(cpu)) return String(cpus ?? 1)
  const t = topologyOf(cpus, cpu)
  return `cpus=${t.cpus},sockets=${t.sockets},cores=${t.cores},threads=${t.threads}`
}

const models = new Map<string, Promise<Set<string> | undefined>>()

/** The CPU models `qemu -cpu help` lists (undefined when it cannot be run), once per binary. */
export function cpuModelsOf(binary: string): Promise<Set<string> | undefined> {
  let p = models.get(binary)
  if (!p) {
    p = new Promise((resolve) => {
      execFile(binary, ['-cpu', 'help'], { timeout: 10_000, maxBuffer: 1 << 20 }, (err, stdout) => {
        if (err) return resolve(undefined)
        const names = new Set<string>()
        // QEMU 7.2 writes "x86 Broadwell …", QEMU 10 "  Broadwell …" (indented, no arch prefix);
        // the indented CPUID flag list that follows is no model.
        for (const line of stdout.split('\n')) {
          if (/^Recognized CPUID flags/.test(line)) break
          const m = /^(?:x86\s+|\s+)(\S+)/.exec(line)
          if (m) names.add(m[1]!)
        }
        resolve(names.size ? names : undefined)
      })
    })
    models.set(binary, p)
  }
  return p
}

/**
 * Refuses a CPU model the QEMU binary does not know. When the binary cannot list its models, the
 * model is let through: the start reports QEMU's own error.
 * @throws QmpdError INVALID_INPUT.
 */
export async function assertKnownCpuModel(binary: string, model: string): Promise<void> {
  const known = await cpuModelsOf(binary)
  if (known && !known.has(model)) {
    throw new QmpdError('INVALID_INPUT', `cpu.model: ${binary} knows no CPU model ${model} (see ${binary} -cpu help)`, {
      issues: [{ path: ['cpu', 'model'], message: `unknown CPU model ${model}` }],
    })
  }
}
