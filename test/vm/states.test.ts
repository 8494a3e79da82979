import t from 'tap'
import { VmState } from '../../src/vm/definition.ts'
import { assertState, isRunningState, stateAccepts, VM_STATES, type VmOperation } from '../../src/vm/states.ts'

const ALL = VmState.options

function accepted(op: VmOperation): string[] {
  return ALL.filter((s) => stateAccepts(op, s))
}

t.test('keeps the accepted states each operation had when they were checked inline', async (t) => {
  const expected: Record<VmOperation, string[]> = {
    start: ['shutoff', 'crashed', 'saved'],
    stop: ['running', 'paused', 'unknown'],
    pause: ['running'],
    resume: ['paused'],
    save: ['running', 'paused'],
    managedsave: ['running', 'paused'],
    restore: ['shutoff', 'crashed'],
    'snapshot-create': ['running', 'paused', 'shutoff', 'crashed'],
    'snapshot-create-memory': ['running', 'paused'],
    'snapshot-create-quiesce': ['running'],
    'snapshot-revert': ['running', 'paused', 'shutoff', 'crashed'],
    'snapshot-delete': ['running', 'paused', 'shutoff', 'crashed', 'saved'],
    'snapshot-export': ['running', 'paused', 'shutoff', 'crashed', 'saved'],
    commit: ['running', 'paused', 'shutoff', 'crashed'],
    pull: ['running', 'paused', 'shutoff', 'crashed'],
    copy: ['running', 'paused', 'shutoff', 'crashed'],
    backup: ['running', 'paused'],
    'vm-delete': ['shutoff', 'starting', 'crashed', 'saved'],
    'managedsave-discard': ['saved'],
    'vm-patch': ['shutoff', 'crashed'],
    export: ['running', 'paused'],
  }
  t.same(Object.keys(VM_STATES).sort(), Object.keys(expected).sort(), 'every operation has a row')
  for (const op of Object.keys(expected) as VmOperation[]) t.same(accepted(op).sort(), [...expected[op]].sort(), op)
})

t.test('a VM may be deleted exactly when no QEMU process exists', async (t) => {
  for (const s of ALL) t.equal(stateAccepts('vm-delete', s), !isRunningState(s), s)
})

t.test('refuses with INVALID_STATE naming the operation, the state and what it needs', async (t) => {
  t.throws(() => assertState('web', 'running', 'start'), {
    code: 'INVALID_STATE',
    message: 'cannot start VM web while it is running (needs shutoff or crashed or saved)',
    data: { vm: 'web', state: 'running', op: 'start' },
  })
  t.throws(() => assertState('web', 'saved', 'snapshot-revert'), {
    code: 'INVALID_STATE',
    message: /^cannot snapshot-revert VM web while it is saved \(needs running or paused or shutoff or crashed\): start it or discard the save \(DELETE \/v1\/vms\/web\/managedsave\)/,
  })
  t.throws(() => assertState('web', 'paused', 'vm-delete'), { message: /: stop it first$/ })
  t.doesNotThrow(() => assertState('web', 'paused', 'resume'))
  t.doesNotThrow(() => assertState('web', 'saved', 'snapshot-delete'))
})

t.test('the state an operation leaves is one the VM can be in', async (t) => {
  for (const [op, rule] of Object.entries(VM_STATES)) {
    if ('leaves' in rule) t.ok(ALL.includes(rule.leaves), `${op} leaves ${rule.leaves}`)
  }
  t.equal(VM_STATES.managedsave.leaves, 'saved')
  t.equal(VM_STATES.pause.leaves, 'paused')
})
