// Shapes of pull-mode NBD exports: the request body, the stored record of an open export (also its
// journal plan) and the names qmpd gives its QEMU objects; pure, touches nothing.
import { z } from 'zod'

/** Journal names of the two export operations (their recovery rules: src/export/recovery.ts). */
export const EXPORT_ADD_OP = 'export-add'
export const EXPORT_REMOVE_OP = 'export-remove'

const DiskId = z.string().regex(/^[a-z][a-z0-9]{0,15}$/, 'a disk id such as vda')
const BitmapName = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/, 'a dirty bitmap name: letters, digits, . _ -, at most 63')

/** Body of POST /v1/vms/{vm}/exports. */
export const CreateExportBody = z.strictObject({
  disks: z.array(DiskId).min(1).max(16).optional().describe('disks to export (default: every disk of the VM)'),
  bitmap: BitmapName.optional().describe('a dirty bitmap every exported disk has: exported, frozen at the export instant, as the meta context qemu:dirty-bitmap:<bitmap>'),
  tcp: z
    .strictObject({
      host: z.enum(['127.0.0.1', '::1']).default('127.0.0.1'),
      port: z.number().int().min(0).max(65535).default(0).describe('0: any free port'),
    })
    .optional()
    .describe('also serve the export on a loopback TCP port (forwarded to the unix socket; every local user can connect to it: no TLS, no authentication)'),
})
export type CreateExportBody = z.output<typeof CreateExportBody>

/** One exported disk of an export, with everything recovery needs to take it down again. */
export const ExportDisk = z.strictObject({
  disk: z.string(),
  /** The disk's top node when the export began (the backup job's source, the scratch's backing). */
  source: z.string(),
  /** Scratch qcow2 in the VM directory: receives the old data the guest overwrites. */
  scratch: z.string(),
  /** Node name of the scratch's qcow2 node; also the NBD export id and the backup job id stem. */
  node: z.string(),
  job: z.string(),
  exportId: z.string(),
  bitmap: z.string().optional(),
})
export type ExportDisk = z.output<typeof ExportDisk>

/** An open export as qmpd keeps it (<vmDir>/exports.json) and journals it. */
export const ExportRecord = z.strictObject({
  id: z.string().regex(/^[0-9a-f]{8}$/),
  vm: z.string(),
  /** The NBD server's unix socket (absolute). */
  socket: z.string(),
  /** The QEMU PID the export lives in: a record of another PID is stale (QEMU ended). */
  pid: z.number().int().optional(),
  disks: z.array(ExportDisk),
  /** The loopback TCP forwarder's bound address, while it listens (it ends with the daemon). */
  tcp: z.strictObject({ host: z.string(), port: z.number().int() }).optional(),
  createdAt: z.string(),
})
export type ExportRecord = z.output<typeof ExportRecord>

/** The names of the QEMU objects of one exported disk: node, job and export ids (all ≤ 31 chars). */
export function exportNames(id: string, disk: string): { node: string; job: string; exportId: string } {
  return { node: `qmpdx${id}-${disk}`, job: `qmpd-x${id}-${disk}`, exportId: `qmpd-x${id}-${disk}` }
}

/** The scratch image of one exported disk, in the VM directory. */
export function scratchName(id: string, disk: string): string {
  return `export-${id}-${disk}.qcow2`
}

/** File names in the VM directory: the NBD socket and the open exports' records. */
export const EXPORT_FILES = { socket: 'nbd.sock', records: 'exports.json' } as const

/** What GET/POST answer for one export. */
export const ExportView = z
  .strictObject({
    id: z.string(),
    socket: z.string().describe('unix socket of the VM\'s NBD server (mode 0600, owned by qmpd\'s user)'),
    disks: z.array(
      z.strictObject({
        disk: z.string(),
        exportName: z.string().describe('the NBD export name: nbd+unix:///<exportName>?socket=<socket>'),
        bitmap: z.string().optional().describe('the meta context of the frozen bitmap: qemu:dirty-bitmap:<name>'),
      }),
    ),
    tcp: z
      .strictObject({ host: z.string(), port: z.number().int(), uri: z.string().describe('nbd://host:port/<exportName> of the first disk') })
      .optional()
      .describe('the loopback TCP address qmpd forwards to the unix socket, when asked for'),
    createdAt: z.string(),
  })
  .meta({ id: 'Export' })
export type ExportView = z.output<typeof ExportView>

/** The answer of a record. */
export function viewOf(r: ExportRecord): ExportView {
  return {
    id: r.id,
    socket: r.socket,
    disks: r.disks.map((d) => ({ disk: d.disk, exportName: d.disk, ...(d.bitmap ? { bitmap: `qemu:dirty-bitmap:${d.bitmap}` } : {}) })),
    ...(r.tcp ? { tcp: { ...r.tcp, uri: `nbd://${r.tcp.host.includes(':') ? `[${r.tcp.host}]` : r.tcp.host}:${r.tcp.port}/${r.disks[0]?.disk ?? ''}` } } : {}),
    createdAt: r.createdAt,
  }
}
