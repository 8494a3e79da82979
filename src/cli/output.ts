// How the CLI prints: JSON as the API sent it, tables, the snapshot tree, sizes; it formats and
// writes to stdout, nothing else.
import Table from 'cli-table3'

/** Prints the API's JSON, pretty, for scripts (--json). */
export function printJson(body: unknown): void {
  process.stdout.write(JSON.stringify(body, null, 2) + '\n')
}

/** Prints rows under a header as a table without borders (virsh-like). */
export function printTable(head: string[], rows: Array<Array<string | number | undefined>>): void {
  const table = new Table({
    head,
    chars: { top: '', 'top-mid': '', 'top-left': '', 'top-right': '', bottom: '', 'bottom-mid': '', 'bottom-left': '', 'bottom-right': '', left: '', 'left-mid': '', mid: '', 'mid-mid': '', right: '', 'right-mid': '', middle: '  ' },
    style: { head: [], border: [], 'padding-left': 0, 'padding-right': 0 },
  })
  for (const r of rows) table.push(r.map((c) => (c === undefined ? '-' : String(c))))
  process.stdout.write(table.toString() + '\n')
}

/** Key: value lines. */
export function printFields(fields: Array<[string, unknown]>): void {
  const width = Math.max(...fields.map(([k]) => k.length)) + 1
  for (const [k, v] of fields) if (v !== undefined) process.stdout.write(`${(k + ':').padEnd(width)} ${typeof v === 'string' ? v : JSON.stringify(v)}\n`)
}

/** Bytes as B/KiB/MiB/GiB. */
export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024
    i++
  }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`
}

/** A snapshot as the tree needs it. */
export interface TreeNode {
  name: string
  parent?: string | undefined
  label: string
}

/**
 * The snapshot tree as text lines (virsh snapshot-list --tree): roots at the left, children below
 * their parent by their `parent` link, in the order given (oldest first).
 */
export function treeLines(nodes: TreeNode[]): string[] {
  const names = new Set(nodes.map((n) => n.name))
  const kids = new Map<string | undefined, TreeNode[]>()
  for (const n of nodes) {
    const p = n.parent !== undefined && names.has(n.parent) ? n.parent : undefined
    kids.set(p, [...(kids.get(p) ?? []), n])
  }
  const out: string[] = []
  const walk = (n: TreeNode, prefix: string, last: boolean, root: boolean): void => {
    out.push(root ? n.label : `${prefix}${last ? '└── ' : '├── '}${n.label}`)
    const children = kids.get(n.name) ?? []
    const next = root ? '' : prefix + (last ? '    ' : '│   ')
    children.forEach((c, i) => walk(c, next, i === children.length - 1, false))
  }
  for (const r of kids.get(undefined) ?? []) walk(r, '', true, true)
  return out
}
