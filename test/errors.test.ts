// Every ErrorCode is raised somewhere in src/, and every code src/ raises is an ErrorCode. Reads
// the sources as text: a code only a client ever sees must still be in the union, and a code in
// the union that nothing raises is a promise to clients that qmpd does not keep.
import { readdirSync, readFileSync } from 'node:fs'
import { join, relative } from 'node:path'
import t from 'tap'

const SRC = join(import.meta.dirname, '..', 'src')

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : []))
}

function errorCodeUnion(): Set<string> {
  const text = readFileSync(join(SRC, 'errors.ts'), 'utf8')
  const m = /export type ErrorCode =([^]*?)\n\n/.exec(text)
  if (!m) throw new Error('no ErrorCode union in src/errors.ts')
  return new Set([...m[1]!.matchAll(/'([A-Z_]+)'/g)].map((x) => x[1]!))
}

/** Codes raised: `new QmpdError('X'`, `super('X'` (QmpdError subclasses), `errorBody('X'` (HTTP), and `code: 'X'` of job errors. */
function raisedCodes(): Map<string, string[]> {
  const out = new Map<string, string[]>()
  const note = (code: string, where: string) => out.set(code, [...(out.get(code) ?? []), where])
  for (const file of sources(SRC)) {
    const text = readFileSync(file, 'utf8')
    const rel = relative(SRC, file)
    const patterns = [/new QmpdError\(\s*'([A-Z_]+)'/g, /super\(\s*'([A-Z_]+)'/g, /errorBody\(\s*'([A-Z_]+)'/g, /\?\s*'([A-Z_]+)'\s*:\s*'([A-Z_]+)'/g]
    // The check's findings (src/ops/check*.ts) have codes of their own (ProblemCode), not errors.
    if (!/^ops\/check/.test(rel)) patterns.push(/\bcode: '([A-Z_]+)'/g)
    for (const re of patterns) {
      for (const m of text.matchAll(re)) {
        for (const code of m.slice(1)) if (code) note(code, rel)
      }
    }
  }
  return out
}

t.test('every raised error code is in ErrorCode, and every ErrorCode is raised', async (t) => {
  const union = errorCodeUnion()
  const raised = raisedCodes()
  t.ok(union.size > 10, `read ${union.size} codes from ErrorCode`)
  const unknown = [...raised.keys()].filter((c) => !union.has(c)).map((c) => `${c} (${raised.get(c)!.join(', ')})`)
  t.same(unknown, [], 'codes raised that ErrorCode does not list')
  const neverRaised = [...union].filter((c) => !raised.has(c))
  t.same(neverRaised, [], 'ErrorCode members nothing raises')
})
