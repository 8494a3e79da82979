// The check's snapshot findings (tags, files, tree); changes nothing.
import { existsSync } from 'node:fs'
import { toQmpdError } from '../errors.ts'
import { checkMigrationStream } from '../state/ramfile.ts'
import type { CheckRun } from './check-context.ts'

/** Internal snapshot tags of one image: name -> vm-state-size. */
type Tags = Map<string, number>

const FORMAT_DRIVERS = new Set(['qcow2', 'raw', 'qed', 'vmdk', 'vpc', 'vdi'])

/**
 * Every snapshot record against the files: an external disk's frozen image exists and is in the
 * image graph; a memory snapshot's RAM state file exists and is a migration stream; an internal
 * tag exists in each captured qcow2 (as QEMU has it open, else from the header), with RAM state
 * on the vmstate disk for a checkpoint; parents and the VM's current snapshot exist.
 */
export async function checkSnapshots(run: CheckRun): Promise<void> {
  const names = new Set(run.snapshots.map((s) => s.name))
  const live = liveTags(run)
  await Promise.all(
    run.snapshots.map(async (s) => {
      run.counts.snapshots++
      const what = `snapshot ${s.name}`
      if (s.parent !== undefined && !names.has(s.parent)) {
        run.add({
          code: 'SNAPSHOT_PARENT_MISSING',
          message: `${what}: its parent ${s.parent} does not exist`,
          store: s.parent,
          repair: 'none automatic: flags the VM needs-repair',
        })
      }
      for (const d of s.disks) {
        if (d.mode === 'excluded') continue
        if (!existsSync(d.file)) {
          run.add({
            code: 'SNAPSHOT_FILE_MISSING',
            message: `${what}: disk ${d.id}'s ${d.mode === 'external' ? 'frozen image' : 'image with the tag'} ${d.file} does not exist`,
            store: d.file,
            repair: `none automatic: flags the VM needs-repair (restore the file, or delete snapshot ${s.name})`,
          })
          continue
        }
        if (d.mode === 'external') {
          if (!run.graph.has(d.file)) {
            run.add({
              code: 'SNAPSHOT_FILE_UNTRACKED',
              message: `${what}: disk ${d.id}'s frozen image ${d.file} is not in the image graph`,
              store: d.file,
              repair: 'none automatic: flags the VM needs-repair',
            })
          }
          continue
        }
        let tags = live.get(d.file)
        if (!tags) {
          try {
            tags = new Map(((await run.info(d.file)).snapshots ?? []).map((t) => [t.name, t['vm-state-size']]))
          } catch (err) {
            run.add({
              code: 'CHAIN_UNREADABLE',
              message: `${what}: ${d.file} cannot be read: ${toQmpdError(err).message}`,
              store: d.file,
              repair: 'none automatic: flags the VM needs-repair',
            })
            continue
          }
        }
        const size = tags.get(s.name)
        if (size === undefined) {
          run.add({
            code: 'SNAPSHOT_TAG_MISSING',
            message: `${what}: ${d.file} (disk ${d.id}) has no internal snapshot ${s.name}`,
            store: s.name,
            actual: [...tags.keys()],
            repair: `none automatic: flags the VM needs-repair (delete snapshot ${s.name}: its data is gone)`,
          })
        } else if (s.memory && s.vmstateDisk === d.id && size === 0) {
          run.add({
            code: 'VMSTATE_INVALID',
            message: `${what}: the tag in ${d.file} (vmstate disk ${d.id}) holds no RAM state`,
            store: { vmstateDisk: d.id },
            actual: { vmStateSize: 0 },
            repair: 'none automatic: flags the VM needs-repair',
          })
        }
      }
      if (s.kind === 'external' && s.memory) await checkRamFile(run, what, s.vmstateFile)
    }),
  )
  const current = run.rec.runtime.currentSnapshot
  if (current !== undefined && !names.has(current)) {
    run.add({
      code: 'CURRENT_SNAPSHOT_MISSING',
      message: `the VM's current snapshot ${current} does not exist`,
      store: current,
      repair: 'none automatic: flags the VM needs-repair',
    })
  }
}

async function checkRamFile(run: CheckRun, what: string, file: string | undefined): Promise<void> {
  if (!file || !existsSync(file)) {
    run.add({
      code: 'VMSTATE_MISSING',
      message: `${what}: its RAM state file ${file ?? '(none recorded)'} does not exist`,
      store: file,
      repair: 'none automatic: flags the VM needs-repair (the snapshot can no longer be reverted with memory)',
    })
    return
  }
  try {
    await checkMigrationStream(file)
  } catch (err) {
    run.add({
      code: 'VMSTATE_INVALID',
      message: `${what}: ${toQmpdError(err).message}`,
      store: file,
      repair: 'none automatic: flags the VM needs-repair',
    })
  }
}

/** Tags per file as the running QEMU has them (query-named-block-nodes image.snapshots). */
function liveTags(run: CheckRun): Map<string, Tags> {
  const out = new Map<string, Tags>()
  for (const n of run.live?.nodes ?? []) {
    if (!FORMAT_DRIVERS.has(n.drv) || out.has(n.file)) continue
    out.set(n.file, new Map((n.image.snapshots ?? []).map((t) => [t.name, t['vm-state-size']])))
  }
  return out
}
