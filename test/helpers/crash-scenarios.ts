// The operations the crash matrix runs: how to bring a VM to the point where the operation can
// start, the request that starts it, and what to check beyond the common judgement.
import { execFile } from 'node:child_process'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { promisify } from 'node:util'
import type { Test } from 'tap'
import { defineGuestVm, eventually, guestCounters, op, type TestDaemon } from './daemon.ts'
import { makeGuestDisk } from './guest.ts'
import { snap } from './snap.ts'

const run = promisify(execFile)

/** One operation of the matrix. */
export interface Scenario {
  /** Which test file runs it: test/ops/crash-<family>.test.ts. */
  family?: string
  name: string
  vm: string
  /** The journal name of the operation (the first part of its fail points). */
  op: string
  /** The qmpd job op that runs it (none: the operation acts at once, like deleting a VM). */
  jobOp?: string
  /** The operation runs on a VM that is off (no QEMU to kill at its steps). */
  offline?: boolean
  /** The operation removes the VM itself. */
  removesVm?: boolean
  /** Steps whose points are tried on every CI run (all are under QMPD_CRASH_FULL=1). */
  risky: string[]
  /** A snapshot the operation deletes (it may be gone afterwards). */
  deletes?: string
  setup(td: TestDaemon): Promise<Record<string, unknown>>
  request(setup: Record<string, unknown>): { method: string; path: string; body?: unknown }
  after?(t: Test, td: TestDaemon, setup: Record<string, unknown>): Promise<void>
}

/** A running counting guest with two disks and an external disk snapshot s0 taken while it ran. */
async function runningWithExternal(td: TestDaemon, vm: string): Promise<void> {
  await defineGuestVm(td, vm, { disks: 2, stampMiB: 1 })
  await op(td, vm, 'start')
  await eventually(async () => (await guestCounters(td, vm)).counter > 20)
  await snap(td, vm, { name: 's0', kind: 'external', memory: false })
  await eventually(async () => (await guestCounters(td, vm)).counter > 40)
}

/** Lets the guest count on a little, so that what comes next differs from what was captured. */
async function countOn(td: TestDaemon, vm: string, by = 15): Promise<void> {
  const c = (await guestCounters(td, vm)).counter
  await eventually(async () => (await guestCounters(td, vm)).counter > c + by)
}

/** A running counting guest with two disks and snapshots of one kind taken while it counts. */
async function runningWith(td: TestDaemon, vm: string, snaps: Array<Record<string, unknown>>): Promise<void> {
  await defineGuestVm(td, vm, { disks: 2, stampMiB: 1 })
  await op(td, vm, 'start')
  await countOn(td, vm, 20)
  for (const body of snaps) {
    await snap(td, vm, body)
    await countOn(td, vm)
  }
}

/**
 * A running guest whose first disk is an overlay chain built outside qmpd: base.qcow2 <- mid.qcow2
 * <- top.qcow2 (the guest writes into top), for block jobs that no snapshot constrains.
 */
async function runningOnChain(td: TestDaemon, vm: string): Promise<void> {
  const dir = join(td.stateDir, 'vms', vm)
  await mkdir(dir, { recursive: true })
  await makeGuestDisk(join(dir, 'base.qcow2'), { format: 'qcow2', sizeMiB: 16, boot: true, stampMiB: 1 })
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(dir, 'base.qcow2'), '-F', 'qcow2', join(dir, 'mid.qcow2')])
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', join(dir, 'mid.qcow2'), '-F', 'qcow2', join(dir, 'top.qcow2')])
  const res = await td.api('POST', '/v1/vms', { name: vm, memoryMiB: 32, disks: [{ id: 'vda', file: join(dir, 'top.qcow2') }] })
  if (res.status !== 201) throw new Error(`define ${vm}: ${JSON.stringify(res.body)}`)
  await op(td, vm, 'start')
  await countOn(td, vm, 40)
}

/** The VM must be usable again: saved → starts from its managed save; running → counts on. */
async function usable(t: Test, td: TestDaemon, vm: string): Promise<void> {
  const st = (await td.api('GET', `/v1/vms/${vm}`)).body.state
  if (st === 'saved') {
    const r = await op(td, vm, 'start')
    t.equal((r.result as { restoredFromManagedSave?: boolean }).restoredFromManagedSave, true, 'the next start restores the managed save')
  } else if (st === 'shutoff' || st === 'crashed') {
    await op(td, vm, 'start')
  } else if (st === 'paused') {
    await op(td, vm, 'resume')
  }
  const c0 = (await guestCounters(td, vm)).counter
  t.ok(await eventually(async () => (await guestCounters(td, vm)).counter > c0 + 5), `the guest runs and counts on (from ${c0})`)
}

const create = (name: string, vm: string, pre: Array<Record<string, unknown>>, body: Record<string, unknown>, risky: string[], stopped = false): Scenario => ({
  name,
  offline: stopped,
  vm,
  op: 'snapshot-create',
  jobOp: 'snapshot-create',
  risky,
  setup: async (td) => {
    await runningWith(td, vm, pre)
    if (stopped) await op(td, vm, 'stop', { force: true })
    return {}
  },
  request: () => ({ method: 'POST', path: `/v1/vms/${vm}/snapshots`, body }),
  after: (t, td) => usable(t, td, vm),
})

/** A revert of a running guest with snapshots `pre` to `target`, judged usable afterwards. */
export const revertTo = (name: string, vm: string, pre: Array<Record<string, unknown>>, target: string, risky: string[]): Scenario => ({
  name,
  vm,
  op: 'snapshot-revert',
  jobOp: 'snapshot-revert',
  risky,
  setup: async (td) => {
    await runningWith(td, vm, pre)
    return {}
  },
  request: () => ({ method: 'POST', path: `/v1/vms/${vm}/snapshots/${target}/revert`, body: {} }),
  after: (t, td) => usable(t, td, vm),
})

const deleteOf = (name: string, vm: string, pre: Array<Record<string, unknown>>, target: string, risky: string[], extra: (td: TestDaemon) => Promise<void> = async () => {}): Scenario => ({
  name,
  vm,
  op: 'snapshot-delete',
  jobOp: 'snapshot-delete',
  risky,
  deletes: target,
  setup: async (td) => {
    await runningWith(td, vm, pre)
    await extra(td)
    return {}
  },
  request: () => ({ method: 'DELETE', path: `/v1/vms/${vm}/snapshots/${target}` }),
  after: (t, td) => usable(t, td, vm),
})

const chainJob = (name: string, vm: string, job: 'commit' | 'pull' | 'copy', body: Record<string, unknown>, risky: string[], stopped = false): Scenario => ({
  name,
  offline: stopped,
  vm,
  op: job,
  jobOp: job,
  risky,
  setup: async (td) => {
    await runningOnChain(td, vm)
    if (stopped) await op(td, vm, 'stop', { force: true })
    return {}
  },
  request: () => ({ method: 'POST', path: `/v1/vms/${vm}/disks/vda/${job}`, body }),
  after: (t, td) => usable(t, td, vm),
})

/** Bodies of an external and an internal snapshot for the scenarios. */
export const EXT = (name: string, memory = false, live?: boolean) => ({ name, kind: 'external', memory, ...(live !== undefined ? { live } : {}) })
export const INT = (name: string, memory = true) => ({ name, kind: 'internal', memory })

export const SCENARIOS: Scenario[] = [
  create('create internal checkpoint', 'ci', [INT('i0')], INT('n'), ['snapshot-save', 'commit']),
  create('create internal disk snapshot, live', 'cid', [INT('i0')], INT('n', false), ['transaction', 'commit']),
  create('create internal disk snapshot, offline', 'cio', [INT('i0', false)], INT('n', false), ['tags', 'commit'], true),
  create('create external disk snapshot, live', 'ced', [EXT('s0')], EXT('n'), ['transaction', 'commit']),
  create('create external checkpoint, paused', 'cep', [EXT('s0')], EXT('n', true, false), ['save-ram', 'transaction', 'commit']),
  create('create external checkpoint, live', 'cel', [EXT('s0')], EXT('n', true, true), ['transaction', 'save-ram', 'commit']),
  create('create external disk snapshot, offline', 'ceo', [EXT('s0')], EXT('n'), ['overlays', 'commit'], true),
  revertTo('revert internal checkpoint', 'ri', [INT('i0'), INT('i1')], 'i0', ['snapshot-load', 'commit']),
  revertTo('revert internal disk snapshot', 'rid', [INT('i0', false), INT('i1', false)], 'i0', ['quit', 'apply', 'commit']),
  revertTo('revert external checkpoint', 'rec', [EXT('c0', true), EXT('c1', true)], 'c0', ['overlays', 'commit', 'load-ram']),
  revertTo('revert external disk snapshot', 'red', [EXT('s0'), EXT('s1')], 's0', ['quit', 'overlays', 'commit']),
  {
    ...revertTo('revert internal checkpoint taken under an older definition', 'rdd', [INT('i0')], 'i0', ['definition', 'launch', 'snapshot-load']),
    setup: async (td) => {
      await runningWith(td, 'rdd', [INT('i0')])
      await op(td, 'rdd', 'stop', { force: true })
      const r = await td.api('PATCH', '/v1/vms/rdd', { memoryMiB: 48 })
      if (r.status !== 200) throw new Error(`PATCH rdd: ${r.status} ${JSON.stringify(r.body)}`)
      await op(td, 'rdd', 'start')
      await countOn(td, 'rdd')
      return {}
    },
    after: async (t, td) => {
      // A revert is always finished: once the job succeeded, the definition is the checkpoint's.
      const job = ((await td.api('GET', '/v1/jobs?vm=rdd')).body.jobs as Array<{ op: string; state: string }>).filter((j) => j.op === 'snapshot-revert').at(-1)
      const def = (await td.api('GET', '/v1/vms/rdd')).body.definition
      if (job?.state === 'succeeded') t.equal(def.memoryMiB, 32, 'the revert restored the checkpoint\'s definition')
      else t.ok(def.memoryMiB === 32 || def.memoryMiB === 48, `the definition is the old or the new one (${def.memoryMiB})`)
      await usable(t, td, 'rdd')
    },
  },
  deleteOf('delete internal snapshot', 'di', [INT('i0'), INT('i1')], 'i0', ['tags', 'forget']),
  deleteOf('delete middle external snapshot, live', 'dem', [EXT('s0'), EXT('s1'), EXT('s2')], 's1', ['commit', 'rebase', 'forget']),
  deleteOf('delete latest external snapshot, live', 'del', [EXT('s0'), EXT('s1')], 's1', ['commit', 'forget']),
  deleteOf('delete external snapshot with two branches', 'deb', [EXT('s0'), EXT('s1')], 's0', ['stream', 'forget'], async (td) => {
    await op(td, 'deb', 'snapshots/s0/revert', { state: 'running' })
    await countOn(td, 'deb')
  }),
  { ...deleteOf('delete middle external snapshot, offline', 'deo', [EXT('s0'), EXT('s1'), EXT('s2')], 's1', ['commit', 'forget'], async (td) => {
    await op(td, 'deo', 'stop', { force: true })
  }), offline: true },
  chainJob('active commit with pivot', 'bca', 'commit', {}, ['block-job', 'pivot', 'record']),
  chainJob('intermediate commit', 'bci', 'commit', { top: 'mid.qcow2' }, ['block-job', 'record']),
  chainJob('pull', 'bpl', 'pull', {}, ['block-job', 'record']),
  chainJob('copy with pivot', 'bcp', 'copy', { dest: 'copy.qcow2', pivot: true }, ['create', 'block-job', 'record']),
  chainJob('offline commit', 'bco', 'commit', {}, ['block-job', 'record'], true),
  {
    name: 'start from a managed save',
    vm: 'sm',
    op: 'start',
    jobOp: 'start',
    risky: ['launch', 'load-ram', 'discard-save', 'cont'],
    setup: async (td) => {
      await runningWith(td, 'sm', [EXT('s0')])
      await op(td, 'sm', 'managedsave')
      return {}
    },
    request: () => ({ method: 'POST', path: '/v1/vms/sm/start' }),
    after: (t, td) => usable(t, td, 'sm'),
  },
  {
    name: 'delete a VM with its storage',
    vm: 'dv',
    op: 'vm-delete',
    risky: ['forget', 'remove-files'],
    removesVm: true,
    offline: true,
    setup: async (td) => {
      await runningWith(td, 'dv', [EXT('s0', true)])
      await op(td, 'dv', 'stop', { force: true })
      return {}
    },
    request: () => ({ method: 'DELETE', path: '/v1/vms/dv?deleteStorage=true' }),
  },
  {
    name: 'managed save',
    vm: 'ms',
    op: 'save',
    jobOp: 'managedsave',
    risky: ['save-ram', 'quit', 'mark-saved'],
    setup: async (td) => {
      await runningWithExternal(td, 'ms')
      return {}
    },
    request: () => ({ method: 'POST', path: '/v1/vms/ms/managedsave' }),
    after: (t, td) => usable(t, td, 'ms'),
  },
  {
    name: 'save to a file',
    vm: 'sv',
    op: 'save',
    jobOp: 'save',
    risky: ['save-ram', 'quit'],
    setup: async (td) => {
      await runningWithExternal(td, 'sv')
      return {}
    },
    request: () => ({ method: 'POST', path: '/v1/vms/sv/save', body: { file: 'out.save' } }),
    after: async (t, td) => {
      const st = (await td.api('GET', '/v1/vms/sv')).body.state
      if (st === 'shutoff') {
        const r = await td.api('POST', '/v1/vms/sv/restore?wait=true&timeoutSec=120', { file: 'out.save' })
        t.equal(r.status, 200, `the saved file restores (${JSON.stringify(r.body?.error ?? '')})`)
      }
      await usable(t, td, 'sv')
    },
  },
  {
    name: 'restore from a file',
    vm: 'rs',
    op: 'restore',
    jobOp: 'restore',
    risky: ['launch', 'load-ram', 'cont'],
    setup: async (td) => {
      await runningWithExternal(td, 'rs')
      await op(td, 'rs', 'save', { file: 'in.save' })
      return {}
    },
    request: () => ({ method: 'POST', path: '/v1/vms/rs/restore', body: { file: 'in.save' } }),
    after: (t, td) => usable(t, td, 'rs'),
  },
]

/** The test file a scenario belongs to, from its journal name. */
export function familyOf(sc: Scenario): string {
  if (sc.family) return sc.family
  if (sc.op === 'snapshot-create') return 'create'
  if (sc.op === 'snapshot-revert') return 'revert'
  if (sc.op === 'snapshot-delete') return 'delete'
  if (sc.op === 'commit' || sc.op === 'pull' || sc.op === 'copy') return 'chain'
  return 'state'
}
