// Managed save and restore: qmpd (POST managedsave ?wait=true; POST start ?wait=true, which
// restores the managed save and resumes) vs raw QMP: stop, migrate to a unix socket the bench serves
// into a file (fsynced), quit; and spawn -incoming defer, migrate-incoming from the file, cont.
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import { bothSides, compare, noteFailure, withFailures, type Case } from '../lib/case.ts'
import { WARMUP_MS, withGuestPair } from '../lib/guestvm.ts'
import { migrationEnd, serveToFile, type RawVm } from '../lib/raw.ts'
import { summarize } from '../lib/stats.ts'
import { rawRestore } from './revert-external.ts'

/** stop, migrate into `file` through a served unix socket, fsync, quit (waiting for the exit). */
async function rawSave(raw: RawVm, file: string): Promise<number> {
  const { qmp } = raw
  const t0 = performance.now()
  const server = await serveToFile(join(raw.dir, 'mig-out.sock'), file)
  try {
    await qmp.cmd('stop')
    await qmp.cmd('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] })
    await qmp.cmd('migrate-set-parameters', { 'max-bandwidth': 2 ** 40 })
    const done = migrationEnd(qmp)
    await qmp.cmd('migrate', { uri: 'unix:mig-out.sock' })
    const status = await done
    if (status !== 'completed') throw new Error(`raw save: migration ${status}`)
    await server.done()
    await raw.quit()
    return performance.now() - t0
  } finally {
    server.close()
  }
}

export const managedSaveCase: Case = {
  name: 'managedsave',
  title: 'managed save and restore',
  async run(ctx) {
    return withGuestPair(ctx, 'ms', async (pair) => {
      const { bd, rawDir, rawDisks: disks, alt } = pair
      const qSave: number[] = []
      const qRestore: number[] = []
      const rSave: number[] = []
      const rRestore: number[] = []
      const unlink: number[] = []
      const failures: string[] = []
      const file = join(rawDir, 'managed.save')
      for (let i = 0; i < ctx.reps; i++) {
        await bothSides(
          i,
          async () => {
            await alt.qmpdSide(i === 0 ? WARMUP_MS : 500)
            let t0 = performance.now()
            const saved = await bd.op('/v1/vms/ms/managedsave')
            qSave.push(performance.now() - t0)
            if (saved.result.state !== 'saved') throw new Error(`managedsave: ${JSON.stringify(saved.result)}`)
            t0 = performance.now()
            try {
              const started = await bd.op('/v1/vms/ms/start')
              qRestore.push(performance.now() - t0)
              if (!started.result.restoredFromManagedSave) throw new Error(`start did not restore: ${JSON.stringify(started.result)}`)
            } catch (err) {
              // Counted as a failure, not timed; the VM is started again (untimed) for the next repetition.
              noteFailure(ctx, failures, i, 'restore', err)
              const st = bd.daemon.vms.record('ms').runtime.state
              if (st === 'running' || st === 'paused') await bd.op('/v1/vms/ms/stop', { force: true })
              await bd.op('/v1/vms/ms/start')
            }
          },
          async () => {
            await alt.rawSide(i === 0 ? WARMUP_MS : 500)
            rSave.push(await rawSave(pair.raw, file))
            const t1 = performance.now()
            const restored = await rawRestore(join(rawDir, 'run'), 'rawms', disks, file)
            rRestore.push(performance.now() - t1)
            pair.setRaw(restored)
            // What a synchronous unlink of the save file costs here, timed for the notes (qmpd did
            // one between the load and cont until it switched to rename + background delete).
            const u0 = performance.now()
            rmSync(file)
            unlink.push(performance.now() - u0)
          },
        )
        ctx.log(`rep ${i}: save qmpd ${qSave.at(-1)?.toFixed(0)} / raw ${rSave.at(-1)?.toFixed(0)} ms; restore qmpd ${qRestore.at(-1)?.toFixed(0)} / raw ${rRestore.at(-1)?.toFixed(0)} ms`)
      }
      if (qRestore.length === 0) throw new Error(`every qmpd restore failed: ${failures.join(' | ')}`)
      return [
        compare(
          {
            case: 'managedsave',
            metric: 'managed save (stop, RAM to file + fsync, quit)',
            unit: 'ms',
            qmpd: { name: 'qmpd POST managedsave', stats: summarize(qSave) },
            baseline: { name: 'raw stop+migrate to served socket+quit', stats: summarize(rSave) },
          },
          { maxRatio: 1.2 },
        ),
        withFailures(
          compare(
            {
              case: 'managedsave',
              metric: 'restore managed save → running (POST start)',
              unit: 'ms',
              qmpd: { name: 'qmpd POST start (restore)', stats: summarize(qRestore) },
              baseline: { name: 'raw spawn -incoming defer+migrate-incoming+cont', stats: summarize(rRestore) },
              extra: { unlinkSaveFileMedianMs: summarize(unlink).median },
              note: 'qmpd renames managed.save before cont and deletes it in the background; unlinkSaveFileMedianMs is what a synchronous unlink of it costs here (not in either time)',
            },
            { maxRatio: 1.2 },
          ),
          failures,
          ctx.reps,
        ),
      ]
    })
  },
}
