// What one check reads from QEMU and the files, read once per check; changes nothing.
import type { ImageInfo, QemuImg } from '../images/qemu-img.ts'
import type { BlockDeviceInfo, BlockInfo, JobInfo, MigrationInfo } from '../qmp/commands.ts'
import type { ImageRow } from '../store/snapshots.ts'
import type { VmRecord } from '../store/vms.ts'
import type { Snapshot } from '../snapshot/model.ts'
import type { CheckReport, Finding } from './check-model.ts'

/** What QEMU says, read once per check while the VM runs with a live QMP session. */
export interface LiveFacts {
  blocks: BlockInfo[]
  nodes: BlockDeviceInfo[]
  jobs: JobInfo[]
  migration: MigrationInfo
}

/**
 * The state of one check while it runs: the records it compares, QEMU's answers, the findings so
 * far and a per-run cache of `qemu-img info -U` (each image is read once, however many checks
 * look at it).
 */
export class CheckRun {
  readonly findings: Finding[] = []
  readonly counts: CheckReport['checked'] = { processes: 0, disks: 0, images: 0, snapshots: 0, files: 0, journal: 0, qemuJobs: 0 }
  readonly graph: ReadonlyMap<string, ImageRow>
  /** Every layer of every disk's chain as QEMU or the headers have it: in use, never an orphan. */
  readonly chainFiles = new Set<string>()
  private readonly infos = new Map<string, Promise<ImageInfo>>()

  constructor(
    readonly rec: VmRecord,
    readonly dir: string,
    readonly images: ImageRow[],
    readonly snapshots: Snapshot[],
    /** A job of the VM is queued or running: skip what an operation in flight upsets. */
    readonly busy: boolean,
    /** QEMU's view, when the VM runs and QMP answered. */
    readonly live: LiveFacts | undefined,
    private readonly qemuImg: QemuImg,
  ) {
    this.graph = new Map(images.map((i) => [i.file, i]))
  }

  /** Records a finding. */
  add(f: Finding): void {
    this.findings.push(f)
  }

  /**
   * One image's header (qemu-img info -U: the image may be open in QEMU; reading the header of an
   * image QEMU writes is safe, only writing it is not).
   */
  info(file: string): Promise<ImageInfo> {
    let p = this.infos.get(file)
    if (!p) {
      p = this.qemuImg.info(file, { forceShare: true })
      p.catch(() => {}) // awaited by every caller; keep an early failure from being "unhandled"
      this.infos.set(file, p)
    }
    return p
  }
}
