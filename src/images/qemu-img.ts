// Runs qemu-img (create, info, snapshot, commit, rebase, convert) for offline image work; knows
// nothing of VMs.
import { execFile, spawn } from 'node:child_process'
import { z } from 'zod'
import { QmpdError } from '../errors.ts'
import { checkChain, type CheckedLayer, type Confine } from './headers.ts'

/** One layer of an image's backing chain, as qemu-img reports it. */
export const ImageInfo = z.looseObject({
  filename: z.string(),
  format: z.string(),
  'virtual-size': z.number(),
  'actual-size': z.number().optional(),
  'backing-filename': z.string().optional(),
  'full-backing-filename': z.string().optional(),
  'backing-filename-format': z.string().optional(),
  snapshots: z
    .array(z.looseObject({ id: z.string(), name: z.string(), 'vm-state-size': z.number(), 'date-sec': z.number() }))
    .optional(),
})
export type ImageInfo = z.output<typeof ImageInfo>

/**
 * Runs qemu-img with an argument vector (never a shell). Never use it on an image a running QEMU
 * has open for writing: image locking refuses, and forcing it corrupts. Before each command that
 * opens an image (create with a backing file, info, chain, snapshot, commit, rebase), the image's
 * whole chain is checked (src/images/headers.ts): every layer a header names must be a regular
 * file, and, with `confine` (the path policy), inside the allowed roots; an image with an external
 * data file is refused.
 */
export class QemuImg {
  constructor(
    private readonly binary = 'qemu-img',
    private readonly confine?: Confine,
  ) {}

  /**
   * Checks the chain of `file` before qemu-img opens it (see the class).
   * @throws QmpdError INVALID_PATH, as checkChain().
   */
  async guard(file: string, format: string, field = 'image'): Promise<CheckedLayer[]> {
    return checkChain(file, format, this.confine, field)
  }

  /**
   * Runs qemu-img; rejects with QEMU_IMG_FAILED carrying its stderr, or QEMU_NOT_FOUND.
   * @throws QmpdError QEMU_IMG_FAILED with qemu-img's stderr; QEMU_NOT_FOUND when the binary is missing.
   */
  run(args: string[], opts: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<string> {
    return new Promise((resolve, reject) => {
      execFile(
        this.binary,
        args,
        { timeout: opts.timeoutMs ?? 600_000, maxBuffer: 64 * 1024 * 1024, ...(opts.signal ? { signal: opts.signal } : {}) },
        (err, stdout, stderr) => {
          if (!err) return resolve(stdout)
          if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
            return reject(new QmpdError('QEMU_NOT_FOUND', `${this.binary} not found; install qemu-utils`, { binary: this.binary }))
          }
          const msg = stderr.trim().split('\n').pop() || err.message
          reject(new QmpdError('QEMU_IMG_FAILED', `qemu-img ${args[0]}: ${msg}`, { args, stderr: stderr.trim() }))
        },
      )
    })
  }

  /**
   * Creates an image; with a backing file the size defaults to the backing file's.
   * @throws QmpdError INVALID_PATH from the confinement and chain checks; QEMU_IMG_FAILED or QEMU_NOT_FOUND, as run().
   */
  async create(file: string, format: 'qcow2' | 'raw', opts: { sizeBytes?: number; backing?: { file: string; format: string } }): Promise<void> {
    this.confine?.(file, 'image')
    if (opts.backing) await this.guard(opts.backing.file, opts.backing.format, 'backing file')
    const args = ['create', '-q', '-f', format]
    if (opts.backing) args.push('-b', opts.backing.file, '-F', opts.backing.format)
    args.push(file)
    if (opts.sizeBytes !== undefined) args.push(String(opts.sizeBytes))
    await this.run(args)
  }

  /**
   * The whole backing chain, top first. `forceShare` reads an image a QEMU has open (-U); without
   * `format` the top's format is probed (from the magic: qcow2 or raw).
   * @throws QmpdError INVALID_PATH from the chain check (nothing is run then); QEMU_IMG_FAILED or QEMU_NOT_FOUND, as run().
   */
  async chain(file: string, opts: { forceShare?: boolean; format?: 'qcow2' | 'raw' } = {}): Promise<ImageInfo[]> {
    const layers = await this.guard(file, opts.format ?? 'probe')
    const args = ['info', '--output=json', '--backing-chain']
    if (opts.forceShare) args.push('-U')
    // Never let qemu-img probe: a raw disk whose guest wrote a vmdk descriptor would name extents.
    const format = opts.format ?? layers[0]?.format
    if (format) args.push('-f', format)
    args.push(file)
    const out = await this.run(args, { timeoutMs: 30_000 })
    return z.array(ImageInfo).parse(JSON.parse(out))
  }

  /**
   * One image alone, without opening its backing file (qemu-img info opens with
   * BDRV_O_NO_BACKING): what its header says, `full-backing-filename` included. `forceShare`
   * reads an image a QEMU has open (-U).
   * @throws QmpdError INVALID_PATH from the chain check; QEMU_IMG_FAILED or QEMU_NOT_FOUND, as run().
   */
  async info(file: string, opts: { forceShare?: boolean } = {}): Promise<ImageInfo> {
    const layers = await this.guard(file, 'probe')
    const args = ['info', '--output=json']
    if (opts.forceShare) args.push('-U')
    if (layers[0]) args.push('-f', layers[0].format)
    args.push(file)
    const out = await this.run(args, { timeoutMs: 30_000 })
    return ImageInfo.parse(JSON.parse(out))
  }

  /** Internal snapshots offline: create (-c), apply (-a) or delete (-d) a tag in a qcow2. */
  async snapshot(op: 'create' | 'apply' | 'delete', file: string, tag: string): Promise<void> {
    await this.guard(file, 'qcow2')
    const flag = { create: '-c', apply: '-a', delete: '-d' }[op]
    await this.run(['snapshot', '-q', flag, tag, file])
  }

  /**
   * Commits `top` into its backing file `base` (must be top's direct backing). `top` keeps its data (-d).
   * @throws QmpdError INVALID_PATH from the chain check; QEMU_IMG_FAILED or QEMU_NOT_FOUND, as run().
   */
  async commit(top: string, base: string): Promise<void> {
    await this.guard(top, 'qcow2')
    await this.run(['commit', '-q', '-f', 'qcow2', '-d', '-b', base, top])
  }

  /**
   * Rebases `file` onto `backing` (null: no backing, `file` becomes standalone). Safe mode copies
   * whatever differs so the guest-visible data stays the same; unsafe (-u) only rewrites the header,
   * for when the new backing already holds the same data.
   */
  async rebase(file: string, backing: { file: string; format: string } | null, opts: { unsafe?: boolean } = {}): Promise<void> {
    await this.guard(file, 'qcow2')
    if (backing) await this.guard(backing.file, backing.format, 'backing file')
    const args = ['rebase', '-q', '-f', 'qcow2']
    if (opts.unsafe) args.push('-u')
    if (backing) args.push('-b', backing.file, '-F', backing.format)
    else args.push('-b', '')
    args.push(file)
    await this.run(args)
  }

  /**
   * Runs a long qemu-img command with -p and reports its progress (percent, parsed from the
   * "(12.34/100%)" lines it prints). Rejects like run().
   */
  runWithProgress(args: string[], onProgress: (percent: number) => void, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      const child = spawn(this.binary, args, { stdio: ['ignore', 'pipe', 'pipe'], ...(signal ? { signal } : {}) })
      let stderr = ''
      child.stdout.setEncoding('utf8')
      child.stdout.on('data', (chunk: string) => {
        for (const m of chunk.matchAll(/\((\d+(?:\.\d+)?)\/100%\)/g)) onProgress(Number(m[1]))
      })
      child.stderr.setEncoding('utf8')
      child.stderr.on('data', (c: string) => {
        if (stderr.length < 65536) stderr += c
      })
      child.once('error', (err: NodeJS.ErrnoException) =>
        reject(err.code === 'ENOENT' ? new QmpdError('QEMU_NOT_FOUND', `${this.binary} not found; install qemu-utils`) : err),
      )
      child.once('close', (code) => {
        if (code === 0) return resolve()
        const msg = stderr.trim().split('\n').pop() || `exit code ${code}`
        reject(new QmpdError('QEMU_IMG_FAILED', `qemu-img ${args[0]}: ${msg}`, { args, stderr: stderr.trim() }))
      })
    })
  }
}
