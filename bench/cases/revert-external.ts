// Revert to an external checkpoint (a new QEMU with the RAM state loaded): qmpd (POST
// snapshots/{snap}/revert ?wait=true) vs the same steps over raw QMP: quit the running QEMU, fresh
// overlays on the frozen images (qemu-img create -b), spawn with -incoming defer, migrate-incoming
// from the state file, cont.
import { join } from 'node:path'
import type { ActiveDisk } from '../../src/vm/argv.ts'
import { bothSides, compare, noteFailure, withFailures, type Case } from '../lib/case.ts'
import { GUEST, WARMUP_MS, withGuestPair } from '../lib/guestvm.ts'
import { run } from '../lib/images.ts'
import { feedFile, launchRaw, migrationEnd, rawCont, rmrf, vmDef, type RawVm } from '../lib/raw.ts'
import { summarize } from '../lib/stats.ts'
import { rawCheckpoint } from './live.ts'

/** Spawns a raw QEMU with -incoming defer on `disks`, loads `file` into it and resumes the guest. */
export async function rawRestore(runDir: string, name: string, disks: Array<{ id: string; file: string }>, file: string): Promise<RawVm> {
  const active: ActiveDisk[] = disks.map((d) => ({ id: d.id, file: d.file, format: 'qcow2', gen: 0 }))
  const vm = await launchRaw(runDir, vmDef(name, GUEST.memoryMiB, disks), active, { incoming: true })
  try {
    await vm.qmp.cmd('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] })
    const done = migrationEnd(vm.qmp)
    await vm.qmp.cmd('migrate-incoming', { uri: 'unix:mig-in.sock' })
    const { sent, sock } = await feedFile(join(runDir, 'mig-in.sock'), file)
    try {
      const status = await done
      if (status !== 'completed') throw new Error(`raw incoming migration ${status}`)
      await sent
    } finally {
      sock.destroy()
      await rmrf(join(runDir, 'mig-in.sock'))
    }
    await rawCont(vm.qmp)
    return vm
  } catch (err) {
    await vm.quit()
    throw err
  }
}

export const revertExternalCase: Case = {
  name: 'revert-external',
  title: 'revert to an external checkpoint (new QEMU, RAM loaded)',
  async run(ctx) {
    return withGuestPair(ctx, 'xr', async (pair) => {
      const { bd, rawDir, rawDisks: disks, alt } = pair
      await alt.qmpdSide(WARMUP_MS)
      const cp = await bd.op('/v1/vms/xr/snapshots', { name: 'c1', kind: 'external', memory: true, live: false })
      await alt.rawSide(WARMUP_MS)
      const stateFile = join(rawDir, 'c1.vmstate')
      await rawCheckpoint(pair.raw, { file: stateFile, overlayDir: join(rawDir, 'disks'), tag: 'c1', gen: { vda: 0, vdb: 0 }, background: false })
      const q: number[] = []
      const r: number[] = []
      const failures: string[] = []
      for (let i = 0; i < ctx.reps; i++) {
        await bothSides(
          i,
          async () => {
            await alt.qmpdSide(300)
            const t0 = performance.now()
            try {
              const job = await bd.op('/v1/vms/xr/snapshots/c1/revert', {})
              q.push(performance.now() - t0)
              if (job.result.state !== 'running') throw new Error(`revert left the VM ${job.result.state}`)
            } catch (err) {
              // A failed revert is a finding, not a number: count it, then get the VM running again
              // (untimed) so that the next repetition starts from the same place.
              noteFailure(ctx, failures, i, 'revert', err)
              const st = bd.daemon.vms.record('xr').runtime.state
              if (st === 'running' || st === 'paused') await bd.op('/v1/vms/xr/stop', { force: true })
              await bd.op('/v1/vms/xr/snapshots/c1/revert', {})
            }
          },
          async () => {
            await alt.rawSide(300)
            const t1 = performance.now()
            await pair.raw.quit()
            const overlays = disks.map((d) => ({ id: d.id, file: join(rawDir, 'disks', `${d.id}-c1-r${i}.qcow2`) }))
            for (const [j, o] of overlays.entries()) await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', disks[j]!.file, '-F', 'qcow2', o.file])
            const restored = await rawRestore(join(rawDir, 'run'), 'rawxr', overlays, stateFile)
            r.push(performance.now() - t1)
            pair.setRaw(restored)
          },
        )
        ctx.log(`rep ${i}: qmpd ${q.at(-1)?.toFixed(0)} ms, raw ${r.at(-1)?.toFixed(0)} ms`)
      }
      if (q.length === 0) throw new Error(`every qmpd revert failed: ${failures.join(' | ')}`)
      return [
        withFailures(
          compare(
            {
              case: 'revert-external',
              metric: 'revert external checkpoint → running (quit, new overlays, spawn -incoming, load RAM, cont)',
              unit: 'ms',
              qmpd: { name: 'qmpd POST revert', stats: summarize(q) },
              baseline: { name: 'raw quit+qemu-img create+spawn+migrate-incoming+cont', stats: summarize(r) },
              extra: { checkpointRamMethod: String(cp.result.snapshot.ramMethod) },
            },
            { maxRatio: 1.3 },
          ),
          failures,
          ctx.reps,
        ),
      ]
    })
  },
}
