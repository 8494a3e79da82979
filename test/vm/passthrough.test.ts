// The escape hatch's policy on its own (no QEMU): what the defaults, patterns and exact names allow,
// and the depth count that must not recurse.
import t from 'tap'
import { checkPassthrough, DEFAULT_QMP_ALLOW, isAllowed, jsonDepth, makePassthroughPolicy, RISKY_QMP_COMMANDS } from '../../src/vm/passthrough.ts'

t.test('off refuses everything with QMP_PASSTHROUGH_DISABLED', async (t) => {
  const off = makePassthroughPolicy(false, ['*', 'migrate'])
  for (const c of ['query-status', 'migrate', 'stop']) t.throws(() => checkPassthrough(off, c), { code: 'QMP_PASSTHROUGH_DISABLED', message: /--qmp-passthrough/ }, c)
})

t.test('the defaults: query-*, stop, cont and nothing else', async (t) => {
  const on = makePassthroughPolicy(true, [])
  t.same(on.allow, DEFAULT_QMP_ALLOW)
  for (const c of ['query-status', 'query-block', 'query-migrate', 'stop', 'cont']) t.doesNotThrow(() => checkPassthrough(on, c), c)
  for (const c of ['quit', 'system_reset', 'qom-set', 'block-job-cancel', 'querystatus', 'x-query-foo', ...RISKY_QMP_COMMANDS]) {
    t.throws(() => checkPassthrough(on, c), { code: 'QMP_COMMAND_NOT_ALLOWED', data: { command: c } }, c)
  }
  t.throws(() => checkPassthrough(on, 'migrate'), { message: /only --qmp-allow migrate, by its exact name/ })
  t.throws(() => checkPassthrough(on, 'quit'), { message: /add it with --qmp-allow quit/ })
})

t.test('patterns allow what they match, except a risky command, which only its exact name allows', async (t) => {
  t.ok(isAllowed(['block-job-*'], 'block-job-cancel'))
  t.notOk(isAllowed(['block-job-*'], 'block-commit'))
  t.ok(isAllowed(['*'], 'qom-list'))
  for (const c of RISKY_QMP_COMMANDS) {
    t.notOk(isAllowed(['*', `${c.slice(0, 3)}*`], c), `${c} not by a pattern`)
    t.ok(isAllowed([c], c), `${c} by its name`)
  }
  t.ok(RISKY_QMP_COMMANDS.includes('human-monitor-command') && RISKY_QMP_COMMANDS.includes('blockdev-add') && RISKY_QMP_COMMANDS.includes('migrate'))
})

t.test('jsonDepth counts without recursing and stops past its limit', async (t) => {
  t.equal(jsonDepth(1, 32), 0)
  t.equal(jsonDepth({}, 32), 1)
  t.equal(jsonDepth({ a: [1, { b: [] }] }, 32), 4)
  let v: unknown = 1
  for (let i = 0; i < 1_000_000; i++) v = [v]
  t.equal(jsonDepth(v, 32), 33, 'a million deep: no stack overflow, gives up at 33')
  t.equal(jsonDepth({ a: Array.from({ length: 10_000 }, () => [[1]]) }, 32), 4, 'wide is fine')
})
