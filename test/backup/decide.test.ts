// The mode a backup runs in (never a silent full one) and the chains a revert invalidates; no QEMU.
import { mkdirSync } from 'node:fs'
import t from 'tap'
import { decideMode, type BitmapState } from '../../src/backup/bitmaps.ts'
import { invalidateOnRevert } from '../../src/backup/invalidate.ts'
import { readManifest, writeManifest } from '../../src/backup/manifest.ts'
import type { BackupChain } from '../../src/backup/model.ts'
import { EventBus } from '../../src/events/bus.ts'

const chain = (over: Partial<BackupChain> = {}): BackupChain => ({
  id: 'c00000001',
  dir: '/b',
  bitmap: 'qmpd-c00000001',
  disks: ['vda'],
  points: [{ id: 'b00000001', mode: 'full', requested: 'full', at: '2026-01-01T00:00:00.000Z', ms: 1, disks: [{ id: 'vda', file: '/b/1.qcow2', backing: null, layer: '/d/vda.qcow2', copiedBytes: 1 }] }],
  ...over,
})
const state = (over: Partial<BitmapState> = {}): BitmapState => ({ disk: 'vda', node: 'vda-f0', file: '/d/vda.qcow2', state: 'active', dirtyBytes: 0, ...over })

t.test('an incremental runs incremental only when every bitmap can be trusted, else full with the reason', async (t) => {
  t.same(decideMode('incremental', chain(), [state()]), { mode: 'incremental' })
  t.same(decideMode('full', chain(), [state({ state: 'inconsistent' })]), { mode: 'full' }, 'a requested full needs no reason')
  t.same(decideMode('differential', chain(), [state()]), { mode: 'differential' })
  t.match(decideMode('differential', chain(), [state({ state: 'inconsistent' })]), { mode: 'full', reason: /bitmap inconsistent/ }, 'a differential falls back like an incremental')
  t.match(decideMode('incremental', undefined, [state()]), { mode: 'full', reason: /first backup of a chain/ })
  t.match(decideMode('incremental', chain({ points: [] }), [state()]), { mode: 'full', reason: /first backup/ })
  t.match(decideMode('incremental', chain(), [state({ state: 'inconsistent' })]), { mode: 'full', reason: /bitmap inconsistent after unclean exit/ })
  t.match(decideMode('incremental', chain(), [state({ state: 'missing' })]), { mode: 'full', reason: /bitmap missing on disk vda/ })
  t.match(decideMode('incremental', chain(), [state({ file: '/d/overlay.qcow2' })]), { mode: 'full', reason: /active layer is \/d\/overlay\.qcow2/ })
  const moved = state({ file: '/d/overlay.qcow2' })
  t.same(decideMode('incremental', chain(), [moved], new Map([['vda', { sources: [{ node: 'vda-f0', file: '/d/vda.qcow2' }] }]])), { mode: 'incremental' }, 'a new overlay whose base bitmap can be merged stays incremental')
  t.same(
    decideMode('incremental', chain(), [moved], new Map([['vda', { reason: 'layer /d/x.qcow2 of disk vda lacks a usable bitmap' }]])),
    { mode: 'full', reason: 'layer /d/x.qcow2 of disk vda lacks a usable bitmap' },
    'a layer without the bitmap in between: full, with the planner\'s reason',
  )
  t.match(decideMode('incremental', chain(), [state({ file: '/d/overlay.qcow2', state: 'missing' })], new Map([['vda', { sources: [{ node: 'vda-f0', file: '/d/vda.qcow2' }] }]])), { mode: 'full', reason: /bitmap missing/ }, 'mergeable, but the overlay has no bitmap: full')
  t.match(decideMode('incremental', chain({ invalid: { reason: 'snapshot revert changed the disks', at: 'x' } }), [state()]), { mode: 'full', reason: 'snapshot revert changed the disks' })
})

t.test('a revert starting on a VM marks each of its chains invalid; other jobs and VMs leave them alone', async (t) => {
  const root = t.testdir()
  const dirOf = (vm: string): string => `${root}/${vm}`
  for (const vm of ['a', 'b']) {
    mkdirSync(dirOf(vm))
    writeManifest(dirOf(vm), { chains: [chain()] })
  }
  const bus = new EventBus()
  const warned: string[] = []
  const off = invalidateOnRevert(bus, dirOf, { warn: (_o, msg) => warned.push(msg) })
  t.teardown(off)
  const job = (op: string, state: string, vm: string) => ({ type: 'job' as const, vm, job: { id: 'j1', vm, op, state, params: { snapshot: 's1' }, createdAt: 'x' } as never })
  bus.emit(job('snapshot-create', 'running', 'a'))
  bus.emit(job('snapshot-revert', 'queued', 'a'))
  t.notOk(readManifest(dirOf('a')).chains[0]!.invalid, 'a snapshot creation or a queued revert changes nothing')
  bus.emit(job('snapshot-revert', 'running', 'a'))
  t.match(readManifest(dirOf('a')).chains[0]!.invalid, { reason: /snapshot revert to s1 \(job j1\)/ })
  t.notOk(readManifest(dirOf('b')).chains[0]!.invalid, 'the other VM\'s chain is untouched')
  t.equal(warned.length, 1)
})
