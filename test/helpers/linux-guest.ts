// A small Linux test guest that runs qemu-guest-agent: Debian's cloud kernel and an initramfs
// holding busybox-static, qemu-ga with its shared libraries and a few virtio modules, all taken
// from Debian packages with `apt-get download` + `dpkg-deb -x` (nothing is installed on the host).
// The /init script mounts /dev/vda (formatting it ext2 if it has no ext2/3/4 superblock) at
// /mnt/data, starts qemu-ga on the org.qemu.guest_agent.0 virtio-serial port, prints
// LINUX_GUEST_READY on the serial console and then writes a counter to /mnt/data/counter about
// every 100 ms, forever, printing a GUEST_HEARTBEAT line after every 10th write.
// With GUEST_NET_APPEND on the kernel command line it also loads virtio_net, configures eth0 for
// QEMU's user-mode network (10.0.2.15/24, gateway 10.0.2.2) and runs busybox httpd on port 80,
// serving /boot (a random id per boot), /mac (eth0's MAC) and /counter (the counter, in RAM).
// With GUEST_EFI_APPEND too (a UEFI boot) it mounts efivarfs, and the CGI scripts
// /cgi-bin/setvar?VALUE and /cgi-bin/getvar write and read the UEFI variable GUEST_EFIVAR.
//
// The build is cached under /var/tmp/qmpd-linux-guest/<hash>, the hash covering this file's own
// source (recipe, /init, modules) and the architecture: the second run touches neither apt nor the
// network. Package versions are whatever apt offers at build time; manifest.json records them.
//
// QEMU needs, besides -kernel/-initrd/-append from ensureLinuxGuest():
//   -device virtio-serial-pci -device virtserialport,chardev=<id>,name=org.qemu.guest_agent.0
//   a virtio-blk disk (the first one becomes /dev/vda), and -serial for the console.
import { execFile } from 'node:child_process'
import { createHash, randomBytes } from 'node:crypto'
import { chmod, mkdir, readFile, readdir, rename, rm, stat, utimes, writeFile } from 'node:fs/promises'
import { arch } from 'node:os'
import { basename, join, posix } from 'node:path'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

const execFileP = promisify(execFile)

/** Line the guest prints on its serial console once qemu-ga runs and /mnt/data is mounted (or known absent). */
export const LINUX_GUEST_READY = 'QMPD-GUEST-READY'

/**
 * Prefix of the line the guest prints after every 10th counter write (about once a second).
 * The write comes first, so while /mnt/data is frozen the heartbeats stop: the host can see
 * that a freeze really blocks guest writes without reading the guest's disk.
 */
export const GUEST_HEARTBEAT = 'QMPD-GUEST-COUNTER'

/** Virtio-serial port name the agent listens on (QEMU's and libvirt's convention). */
export const QGA_PORT_NAME = 'org.qemu.guest_agent.0'

/** Where the guest mounts /dev/vda, and the counter file it rewrites there about every 100 ms. */
export const GUEST_DATA_MOUNT = '/mnt/data'
export const GUEST_COUNTER_FILE = '/mnt/data/counter'

/**
 * Debian packages fetched with `apt-get download` and unpacked into the guest (never installed).
 * linux-image-cloud-amd64 is a metapackage: its Depends names the versioned kernel package, which
 * is downloaded too. The cloud flavour is the small one meant for VMs: ext4 (which also mounts
 * ext2) and the 8250 serial console are built in; virtio_pci, virtio_blk and virtio_console are
 * modules, loaded by /init.
 */
export const GUEST_DEB_PACKAGES = ['linux-image-cloud-amd64', 'busybox-static', 'qemu-guest-agent'] as const

/**
 * Packages the build needs installed on the HOST: apt (apt-get download), dpkg (dpkg-deb),
 * libc-bin (ldd), e2fsprogs (chattr, copied into the guest with its libraries), and the runtime libraries of qemu-guest-agent, which ldd resolves on the host
 * and which are copied into the initramfs (all of them come with qemu-system-x86 already). The
 * cpio archive is written by this file, so cpio is not needed.
 */
export const HOST_BUILD_PACKAGES = ['apt', 'dpkg', 'libc-bin', 'e2fsprogs', 'libglib2.0-0', 'libnuma1', 'libudev1', 'liburing2', 'libpcre2-8-0'] as const

/** Every apt package the Linux test guest needs: downloaded ones first, then host-side ones. */
export const LINUX_GUEST_PACKAGES: readonly string[] = [...GUEST_DEB_PACKAGES, ...HOST_BUILD_PACKAGES]

/** Modules /init loads (their dependencies are found in the .ko files and loaded first). */
const GUEST_MODULES = ['virtio_pci', 'virtio_blk', 'virtio_console']

/** Modules /init loads only when the command line has GUEST_NET_APPEND (after GUEST_MODULES). */
const GUEST_NET_MODULES = ['virtio_net']

/** Modules /init loads only when the command line has GUEST_EFI_APPEND. */
const GUEST_EFI_MODULES = ['efivarfs']

/** Append this (with GUEST_NET_APPEND) on a UEFI boot: efivarfs is mounted, /cgi-bin/setvar and getvar serve GUEST_EFIVAR. */
export const GUEST_EFI_APPEND = 'qmpd.efi=1'

/** The UEFI variable the guest's CGI scripts write (name-GUID, as efivarfs names it). */
export const GUEST_EFIVAR = 'QmpdTest-5ad3c6a2-8f0e-4b7c-9a51-2e6f0d4c7b19'

/** Append this to the kernel command line to have the guest bring up eth0 and serve HTTP on GUEST_HTTP_PORT. */
export const GUEST_NET_APPEND = 'qmpd.net=1'

/** The port busybox httpd listens on inside the guest, and the address /init gives eth0. */
export const GUEST_HTTP_PORT = 80
export const GUEST_NET_ADDR = '10.0.2.15'

/** Line the guest prints once eth0 is configured and httpd runs (before LINUX_GUEST_READY). */
export const GUEST_NET_READY = 'QMPD-GUEST-NET-UP'

/** Parent directory of the cache entries (QMPD_LINUX_GUEST_CACHE overrides it). /var/tmp survives reboots, unlike /tmp on many hosts. */
export const LINUX_GUEST_CACHE_ROOT = process.env['QMPD_LINUX_GUEST_CACHE'] ?? '/var/tmp/qmpd-linux-guest'

/**
 * Kernel command line. quiet/loglevel keep the serial console (emulated byte by byte) short;
 * panic=-1 reboots at once on a panic, so a QEMU run with -no-reboot exits instead of hanging;
 * the i8042 options skip probing a keyboard controller nobody uses; mitigations=off saves TCG time.
 */
const APPEND = [
  'console=ttyS0',
  'quiet',
  'loglevel=3',
  'panic=-1',
  'rdinit=/init',
  'mitigations=off',
  'i8042.noaux',
  'i8042.nokbd',
  'i8042.nopnp',
].join(' ')

/** What ensureLinuxGuest() returns: paths for -kernel and -initrd and the -append string. */
export interface LinuxGuest {
  kernel: string
  initrd: string
  append: string
}

/** The manifest written beside the kernel and initrd of a cache entry. */
interface Manifest {
  kernel: string
  initrd: string
  append: string
  packages: Record<string, string>
  modules: string[]
  libraries: string[]
  builtAt: string
}

let building: Promise<LinuxGuest> | undefined

/**
 * Returns the Linux test guest (amd64 hosts only), building it on first use (about 12 s on a
 * 2-core machine, downloading ~28 MB of packages) and from the cache afterwards (milliseconds). Safe to call concurrently, also
 * from several processes: each build happens in a private directory that is renamed into place.
 * Runs `apt-get update` (root only) when `apt-get download` fails, then tries once more.
 */
export function ensureLinuxGuest(): Promise<LinuxGuest> {
  building ??= buildOrReuse().catch((err: unknown) => {
    building = undefined
    throw err
  })
  return building
}

async function buildOrReuse(): Promise<LinuxGuest> {
  if (arch() !== 'x64') throw new Error(`linux guest: only amd64 hosts are supported (this one is ${arch()})`)
  const source = await readFile(fileURLToPath(import.meta.url))
  const hash = createHash('sha256').update(source).update(`\0${arch()}`).digest('hex').slice(0, 16)
  const entry = join(LINUX_GUEST_CACHE_ROOT, hash)
  const cached = await readEntry(entry)
  if (cached) {
    // Marks the entry as in use, so that builds of other recipes do not prune it.
    const now = new Date()
    await utimes(join(entry, 'manifest.json'), now, now).catch(() => {})
    return cached
  }

  await mkdir(LINUX_GUEST_CACHE_ROOT, { recursive: true })
  await pruneCache()
  const work = join(LINUX_GUEST_CACHE_ROOT, `${BUILD_PREFIX}${process.pid}-${randomBytes(4).toString('hex')}`)
  await mkdir(work)
  try {
    const out = join(work, 'entry')
    await mkdir(out)
    await build(work, out)
    try {
      await rename(out, entry)
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code
      if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw err
      // Another process finished the same build first (use its entry), or an entry was damaged
      // by hand (replace it).
      if (!(await readEntry(entry))) {
        await rm(entry, { recursive: true, force: true })
        await rename(out, entry)
      }
    }
  } finally {
    await rm(work, { recursive: true, force: true })
  }
  const built = await readEntry(entry)
  if (!built) throw new Error(`linux guest: cache entry ${entry} is incomplete after the build`)
  return built
}

const BUILD_PREFIX = '.build-'

/** Build directories older than this belong to a process that died mid-build. */
const ABANDONED_BUILD_MS = 60 * 60 * 1000

/** Entries of other recipes (older versions of this file) unused for this long are removed. */
const UNUSED_ENTRY_MS = 7 * 24 * 60 * 60 * 1000

/** Removes abandoned build directories and long-unused entries (~22 MiB each) before a build. */
async function pruneCache(): Promise<void> {
  for (const name of await readdir(LINUX_GUEST_CACHE_ROOT)) {
    const path = join(LINUX_GUEST_CACHE_ROOT, name)
    const probe = name.startsWith(BUILD_PREFIX) ? path : join(path, 'manifest.json')
    const maxAge = name.startsWith(BUILD_PREFIX) ? ABANDONED_BUILD_MS : UNUSED_ENTRY_MS
    const st = await stat(probe).catch(() => undefined)
    if (st && Date.now() - st.mtimeMs > maxAge) await rm(path, { recursive: true, force: true })
  }
}

/** A complete cache entry, or undefined. manifest.json is written last, so its presence means complete. */
async function readEntry(entry: string): Promise<LinuxGuest | undefined> {
  let manifest: Manifest
  try {
    manifest = JSON.parse(await readFile(join(entry, 'manifest.json'), 'utf8')) as Manifest
  } catch {
    return undefined
  }
  const kernel = join(entry, manifest.kernel)
  const initrd = join(entry, manifest.initrd)
  try {
    await stat(kernel)
    await stat(initrd)
  } catch {
    return undefined
  }
  return { kernel, initrd, append: manifest.append }
}

async function build(work: string, out: string): Promise<void> {
  const debs = join(work, 'debs')
  await mkdir(debs)
  // apt-get drops privileges to _apt for downloads and warns when _apt cannot write the directory.
  await chmod(debs, 0o777)

  const kernelMeta = await aptDownload(debs, 'linux-image-cloud-amd64')
  const kernelPkg = firstDependency(await debField(kernelMeta.file, 'Depends'), 'linux-image-cloud-amd64')
  const kernelDeb = await aptDownload(debs, kernelPkg.version ? `${kernelPkg.name}=${kernelPkg.version}` : kernelPkg.name)
  const busyboxDeb = await aptDownload(debs, 'busybox-static')
  const qgaDeb = await aptDownload(debs, 'qemu-guest-agent')

  const root = join(work, 'root')
  for (const d of [kernelDeb, busyboxDeb, qgaDeb]) {
    await execFileP('dpkg-deb', ['-x', d.file, root], { maxBuffer: 16 * 1024 * 1024 })
  }

  const modDirs = await readdir(join(root, 'lib/modules'))
  const kver = modDirs[0]
  if (modDirs.length !== 1 || kver === undefined) throw new Error(`linux guest: expected one kernel in ${kernelDeb.file}, found ${modDirs.join(', ')}`)
  const modRoot = join(root, 'lib/modules', kver)
  const modules = await resolveModules(modRoot, GUEST_MODULES)
  const netModules = (await resolveModules(modRoot, [...GUEST_MODULES, ...GUEST_NET_MODULES])).filter((m) => !modules.some((b) => b.name === m.name))
  const efiModules = (await resolveModules(modRoot, GUEST_EFI_MODULES)).filter((m) => ![...modules, ...netModules].some((b) => b.name === m.name))

  const qgaBin = join(root, 'usr/sbin/qemu-ga')
  const busybox = join(root, 'bin/busybox')
  // The host's chattr (e2fsprogs): busybox has none, and efivarfs makes the variables it creates
  // immutable, so rewriting one needs chattr -i first.
  const chattr = '/usr/bin/chattr'
  const libs = [...new Set([...(await sharedLibraries(qgaBin)), ...(await sharedLibraries(chattr))])]

  const cpio = new CpioWriter()
  for (const d of ['bin', 'dev', 'proc', 'sys', 'run', 'tmp', 'mnt', 'mnt/data', 'lib', 'lib/modules', 'lib64', 'etc', 'usr', 'usr/sbin', 'var']) {
    cpio.dir(d)
  }
  // The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
  cpio.charDevice('dev/console', 5, 1)
  cpio.charDevice('dev/null', 1, 3)
  cpio.symlink('var/run', '../run')
  cpio.file('bin/busybox', await readFile(busybox), 0o755)
  cpio.symlink('bin/sh', 'busybox')
  cpio.file('usr/sbin/qemu-ga', await readFile(qgaBin), 0o755)
  cpio.file('usr/sbin/chattr', await readFile(chattr), 0o755)
  for (const lib of libs) {
    const rel = lib.replace(/^\/+/, '')
    for (const d of parentsOf(rel)) cpio.dir(d)
    cpio.file(rel, await readFile(lib), 0o755)
  }
  for (const m of [...modules, ...netModules, ...efiModules]) cpio.file(`lib/modules/${m.name}.ko`, await readFile(m.file), 0o644)
  cpio.file('init', Buffer.from(initScript(modules.map((m) => m.name), netModules.map((m) => m.name), efiModules.map((m) => m.name))), 0o755)

  const kernelName = 'vmlinuz'
  const initrdName = 'initrd.cpio'
  const vmlinuz = join(root, 'boot', `vmlinuz-${kver}`)
  await writeFile(join(out, kernelName), await readFile(vmlinuz))
  // Uncompressed: unpacking is cheap, decompressing under TCG is not, and the size is ~8 MiB.
  await writeFile(join(out, initrdName), cpio.finish())
  const manifest: Manifest = {
    kernel: kernelName,
    initrd: initrdName,
    append: APPEND,
    packages: Object.fromEntries([kernelMeta, kernelDeb, busyboxDeb, qgaDeb].map((d) => [d.name, d.version])),
    modules: [...modules, ...netModules, ...efiModules].map((m) => m.name),
    libraries: libs,
    builtAt: new Date().toISOString(),
  }
  await writeFile(join(out, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n')
}

// ---------------------------------------------------------------------------------------------
// apt / dpkg
// ---------------------------------------------------------------------------------------------

interface Deb {
  file: string
  name: string
  version: string
}

let aptUpdated = false

/** `apt-get download spec` into dir; on failure runs `apt-get update` once (as root) and retries. */
async function aptDownload(dir: string, spec: string): Promise<Deb> {
  const before = new Set(await readdir(dir))
  const run = (): Promise<unknown> => execFileP('apt-get', ['-q', 'download', spec], { cwd: dir, maxBuffer: 16 * 1024 * 1024 })
  try {
    await run()
  } catch (first) {
    if (aptUpdated || process.getuid?.() !== 0) {
      throw new Error(`linux guest: apt-get download ${spec} failed (run apt-get update as root?): ${errText(first)}`, { cause: first })
    }
    aptUpdated = true
    await execFileP('apt-get', ['-q', 'update'], { maxBuffer: 64 * 1024 * 1024 }).catch((err: unknown) => {
      throw new Error(`linux guest: apt-get update failed: ${errText(err)}`, { cause: err })
    })
    try {
      await run()
    } catch (second) {
      throw new Error(`linux guest: apt-get download ${spec} failed after apt-get update: ${errText(second)}`, { cause: second })
    }
  }
  const added = (await readdir(dir)).filter((f) => !before.has(f) && f.endsWith('.deb'))
  const file = added[0]
  if (added.length !== 1 || file === undefined) throw new Error(`linux guest: apt-get download ${spec} produced ${added.length} .deb files`)
  const path = join(dir, file)
  return { file: path, name: await debField(path, 'Package'), version: await debField(path, 'Version') }
}

async function debField(deb: string, field: string): Promise<string> {
  const { stdout } = await execFileP('dpkg-deb', ['-f', deb, field])
  return stdout.trim()
}

/** The first package of a Depends field: "linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)". */
function firstDependency(depends: string, of: string): { name: string; version: string | undefined } {
  const m = /^\s*([a-z0-9][a-z0-9+.-]*)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?/.exec(depends)
  if (!m?.[1]) throw new Error(`linux guest: cannot read the Depends of ${of}: ${JSON.stringify(depends)}`)
  return { name: m[1], version: m[2] }
}

// ---------------------------------------------------------------------------------------------
// Kernel modules and shared libraries
// ---------------------------------------------------------------------------------------------

interface Module {
  name: string
  file: string
}

/**
 * The .ko files for `wanted` and their dependencies, dependencies first. Debian's kernel package
 * ships no modules.dep (depmod runs in its postinst), so dependencies are read from each
 * module's .modinfo section ("depends=a,b"). Modules built into the kernel are skipped.
 */
async function resolveModules(modRoot: string, wanted: string[]): Promise<Module[]> {
  const norm = (n: string): string => n.replace(/-/g, '_')
  const byName = new Map<string, string>()
  for (const rel of (await readFile(join(modRoot, 'modules.order'), 'utf8')).split('\n')) {
    const r = rel.trim()
    if (r) byName.set(norm(basename(r).replace(/\.ko(\.[a-z]+)?$/, '')), join(modRoot, r))
  }
  const builtin = new Set(
    (await readFile(join(modRoot, 'modules.builtin'), 'utf8'))
      .split('\n')
      .filter(Boolean)
      .map((r) => norm(basename(r.trim()).replace(/\.ko$/, ''))),
  )
  const ordered: Module[] = []
  const state = new Map<string, 'visiting' | 'done'>()
  const visit = async (raw: string): Promise<void> => {
    const name = norm(raw)
    if (builtin.has(name) || state.get(name) === 'done') return
    if (state.get(name) === 'visiting') throw new Error(`linux guest: module dependency cycle at ${name}`)
    state.set(name, 'visiting')
    const file = byName.get(name)
    if (!file) throw new Error(`linux guest: module ${name} is neither built in nor in modules.order`)
    if (!file.endsWith('.ko')) throw new Error(`linux guest: ${file} is compressed; busybox insmod needs plain .ko files`)
    for (const dep of modinfoDepends(await readFile(file))) await visit(dep)
    state.set(name, 'done')
    ordered.push({ name, file })
  }
  for (const w of wanted) await visit(w)
  return ordered
}

/** The "depends=" entry of a module's .modinfo section (NUL-separated key=value strings). */
function modinfoDepends(ko: Buffer): string[] {
  const key = Buffer.from('\0depends=')
  const at = ko.indexOf(key)
  if (at < 0) return []
  const start = at + key.length
  const end = ko.indexOf(0, start)
  return ko
    .toString('latin1', start, end < 0 ? start : end)
    .split(',')
    .filter(Boolean)
}

/**
 * Absolute paths of the shared libraries (and the ELF interpreter) of `binary`, as the host's ldd
 * resolves them: qemu-guest-agent comes from the same Debian release as the host's libraries.
 */
async function sharedLibraries(binary: string): Promise<string[]> {
  const { stdout } = await execFileP('ldd', [binary])
  const libs: string[] = []
  const missing: string[] = []
  for (const line of stdout.split('\n')) {
    const arrow = /^\s*(\S+)\s+=>\s+(\S+)/.exec(line)
    if (arrow?.[1] && arrow[2]) {
      if (arrow[2] === 'not') missing.push(arrow[1])
      else libs.push(arrow[2])
      continue
    }
    const direct = /^\s*(\/\S+)\s+\(0x/.exec(line)
    if (direct?.[1]) libs.push(direct[1])
  }
  if (missing.length > 0) {
    throw new Error(
      `linux guest: ldd cannot find ${missing.join(', ')} for qemu-ga on this host; install ${HOST_BUILD_PACKAGES.join(' ')}`,
    )
  }
  return libs
}

function parentsOf(rel: string): string[] {
  const out: string[] = []
  for (let d = posix.dirname(rel); d !== '.' && d !== '/'; d = posix.dirname(d)) out.unshift(d)
  return out
}

function errText(err: unknown): string {
  const e = err as { stderr?: string; message?: string }
  return (e.stderr?.trim() || e.message || String(err)).slice(0, 2000)
}

// ---------------------------------------------------------------------------------------------
// /init
// ---------------------------------------------------------------------------------------------

/**
 * The guest's /init (busybox sh, PID 1: it must never exit, or the kernel panics). No udev: the
 * /dev/virtio-ports/<name> symlink that udev would create is made from sysfs. The port name
 * reaches the guest in a virtio-serial control message after the port appears, hence the wait.
 */
function initScript(modules: string[], netModules: string[], efiModules: string[]): string {
  return `#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin
say() { echo "qmpd-guest: $*"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
for m in ${modules.join(' ')}; do
  insmod /lib/modules/$m.ko || say "insmod $m failed"
done

n=0
while [ ! -b /dev/vda ] && [ $n -lt 30 ]; do usleep 100000; n=$((n + 1)); done
if [ -b /dev/vda ]; then
  # ext2/3/4 superblock magic 0xEF53, little endian, at byte 1080.
  magic=$(dd if=/dev/vda bs=1 skip=1080 count=2 2>/dev/null | hexdump -v -e '1/1 "%02x"')
  if [ "$magic" != "53ef" ]; then
    say "formatting /dev/vda as ext2"
    mke2fs /dev/vda >/dev/null 2>&1 || say "mke2fs /dev/vda failed"
  fi
  mount -t ext2 /dev/vda ${GUEST_DATA_MOUNT} || say "mount /dev/vda failed"
else
  say "no /dev/vda: ${GUEST_DATA_MOUNT} is on the initramfs"
fi

mkdir -p /dev/virtio-ports
n=0
while [ ! -e /dev/virtio-ports/${QGA_PORT_NAME} ] && [ $n -lt 100 ]; do
  for d in /sys/class/virtio-ports/vport*; do
    [ -r "$d/name" ] || continue
    name=$(cat "$d/name")
    [ -n "$name" ] && [ -e "/dev/$(basename "$d")" ] && ln -sf "../$(basename "$d")" "/dev/virtio-ports/$name"
  done
  [ -e /dev/virtio-ports/${QGA_PORT_NAME} ] || { usleep 100000; n=$((n + 1)); }
done
[ -e /dev/virtio-ports/${QGA_PORT_NAME} ] || say "no virtio-serial port ${QGA_PORT_NAME}"

(
  while true; do
    qemu-ga -m virtio-serial -p /dev/virtio-ports/${QGA_PORT_NAME} -t /run -f /run/qemu-ga.pid
    say "qemu-ga exited with status $?; restarting"
    sleep 1
  done
) &
n=0
while ! pidof qemu-ga >/dev/null && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done

www=
if grep -q '${GUEST_NET_APPEND}' /proc/cmdline; then
  for m in ${netModules.join(' ')}; do
    insmod /lib/modules/$m.ko || say "insmod $m failed"
  done
  n=0
  while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
  ip link set lo up
  ip addr add ${GUEST_NET_ADDR}/24 dev eth0 || say "no eth0"
  ip link set eth0 up
  ip route add default via 10.0.2.2
  www=/run/www
  mkdir -p $www
  cat /proc/sys/kernel/random/uuid > $www/boot
  cat /sys/class/net/eth0/address > $www/mac
  echo 0 > $www/counter
  if grep -q '${GUEST_EFI_APPEND}' /proc/cmdline; then
    for m in ${efiModules.join(' ')}; do
      insmod /lib/modules/$m.ko || say "insmod $m failed"
    done
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars || say "mount efivarfs failed"
    mkdir -p $www/cgi-bin
    # efivarfs takes attributes (NV|BS|RT = 7, little endian) and data in one write(): staged in
    # /tmp, copied with one dd block. Rewriting a variable is delete + create; efivarfs makes
    # variables it does not know immutable, hence chattr -i. CGI headers end in
    # CRLF: busybox httpd passes them through, and Node's HTTP parser insists.
    cat > $www/cgi-bin/setvar <<'CGI'
#!/bin/sh
v=/sys/firmware/efi/efivars/${GUEST_EFIVAR}
printf '\\007\\000\\000\\000%s' "$QUERY_STRING" > /tmp/efivar.$$
[ -e $v ] && chattr -i $v
rm -f $v
dd if=/tmp/efivar.$$ of=$v bs=4096 2>/dev/null
rm -f /tmp/efivar.$$
printf 'Content-Type: text/plain\\r\\n\\r\\n'
tail -c +5 $v
CGI
    cat > $www/cgi-bin/getvar <<'CGI'
#!/bin/sh
printf 'Content-Type: text/plain\\r\\n\\r\\n'
tail -c +5 /sys/firmware/efi/efivars/${GUEST_EFIVAR} 2>/dev/null || echo NOVAR
CGI
    chmod 755 $www/cgi-bin/setvar $www/cgi-bin/getvar
  fi
  httpd -p ${GUEST_HTTP_PORT} -h $www && echo ${GUEST_NET_READY} || say "httpd failed"
fi
echo ${LINUX_GUEST_READY}

i=0
while true; do
  i=$((i + 1))
  echo $i > ${GUEST_COUNTER_FILE}
  # Renamed into place: httpd never serves a half-written file.
  [ -n "$www" ] && echo $i > $www/.counter && mv $www/.counter $www/counter
  [ $((i % 10)) -eq 0 ] && echo "${GUEST_HEARTBEAT} $i"
  usleep 100000
done
`
}

// ---------------------------------------------------------------------------------------------
// cpio (newc), the initramfs format (Documentation/driver-api/early-userspace/buffer-format.rst)
// ---------------------------------------------------------------------------------------------

/** Writes a newc cpio archive in memory; every entry is owned by root with mtime 0. */
class CpioWriter {
  private readonly parts: Buffer[] = []
  private readonly seen = new Set<string>()
  private ino = 1

  dir(path: string): void {
    if (this.seen.has(path)) return
    this.entry(path, 0o040755, Buffer.alloc(0))
  }

  file(path: string, data: Buffer, perm: number): void {
    this.entry(path, 0o100000 | perm, data)
  }

  symlink(path: string, target: string): void {
    this.entry(path, 0o120777, Buffer.from(target))
  }

  charDevice(path: string, major: number, minor: number): void {
    this.entry(path, 0o020600, Buffer.alloc(0), major, minor)
  }

  finish(): Buffer {
    this.entry('TRAILER!!!', 0, Buffer.alloc(0))
    return Buffer.concat(this.parts)
  }

  private entry(path: string, mode: number, data: Buffer, rdevMajor = 0, rdevMinor = 0): void {
    if (this.seen.has(path)) throw new Error(`cpio: duplicate entry ${path}`)
    this.seen.add(path)
    const name = Buffer.from(`${path}\0`)
    const isTrailer = path === 'TRAILER!!!'
    const fields = [
      isTrailer ? 0 : this.ino++,
      mode,
      0, // uid
      0, // gid
      (mode & 0o170000) === 0o040000 ? 2 : 1, // nlink
      0, // mtime
      data.length,
      0, // devmajor
      0, // devminor
      rdevMajor,
      rdevMinor,
      name.length,
      0, // check
    ]
    const header = Buffer.from('070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join(''), 'latin1')
    this.parts.push(header, name, pad4(header.length + name.length), data, pad4(data.length))
  }
}

function pad4(n: number): Buffer {
  return Buffer.alloc((4 - (n % 4)) % 4)
}
