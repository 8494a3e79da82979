#!/usr/bin/env bash
# Unpacks QEMU 10 from the distribution's backports into .qemu/10 (gitignored) without installing
# it: a private apt configuration whose source is derived from this machine's own apt sources
# (suite <codename>-backports), `apt-get download`, `dpkg -x`, and wrappers in .qemu/10/bin that
# `exec` the real binaries with their data and module directories. The system's QEMU is untouched.
# Safe to run again: a finished install (the stamp file) is kept; QMPD_QEMU10_REFRESH=1 redoes it.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$(pwd)/.qemu/10
stamp="$top/installed"
# What the tests need besides the emulator: qemu-img/qemu-io/qemu-nbd (qemu-utils), the firmware
# blobs and keymaps QEMU's -L directory holds (qemu-system-data), the shared modules, among them
# accel-tcg (qemu-system-common). SeaBIOS, iPXE ROMs and OVMF come from the system's packages
# (seabios, ipxe-qemu, ovmf, pulled in by qemu-system-x86 7.2), found through the data path; a
# newer seabios when QEMU 10 needs one (below).
packages=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils)

# The stamp's second line names this script's layout: an install by an older one (before the
# SeaBIOS it may need, below) is redone.
layout="layout 2 (seabios)"
if [ -f "$stamp" ] && [ "$(sed -n 2p "$stamp")" = "$layout" ] && [ "${QMPD_QEMU10_REFRESH:-}" != 1 ] && [ -x "$top/bin/qemu-system-x86_64" ]; then
  echo "setup: QEMU 10 already in $top ($(head -1 "$stamp"))" >&2
  exit 0
fi
command -v apt-get >/dev/null && command -v dpkg >/dev/null || { echo "setup: --qemu10 needs apt-get and dpkg (Debian/Ubuntu)" >&2; exit 1; }

. /etc/os-release
codename=${VERSION_CODENAME:-}
[ -n "$codename" ] || { echo "setup: /etc/os-release names no VERSION_CODENAME" >&2; exit 1; }

# The first source of the release suite itself (not -security/-updates): its URI and keyring.
uri="" keyring=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  # deb822 stanzas are separated by blank lines; awk prints "URI<TAB>Signed-By" of the first
  # stanza of Types deb whose Suites list the release codename.
  read -r uri keyring < <(awk -v c="$codename" '
    function flush() { if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " c " ") && uris != "" && !done) { split(uris, u, " "); print u[1] "\t" signed; done = 1 } types = suites = uris = signed = "" }
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { flush(); next }
    { key = $1; sub(/:$/, "", key); $1 = ""; sub(/^ +/, ""); v = $0 }
    key == "Types" { types = v } key == "Suites" { suites = v } key == "URIs" { uris = v } key == "Signed-By" { signed = v }
    END { flush() }' "$f" | tr '\t' ' ') || true
  [ -n "$uri" ] && break
done
if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
  # One-line form: deb [options] URI suite components…
  line=$(grep -E "^[[:space:]]*deb[[:space:]]" /etc/apt/sources.list | sed -E 's/\[[^]]*\]//' | awk -v c="$codename" '$3 == c { print $2; exit }')
  uri=$line
  keyring=$(grep -E "^[[:space:]]*deb[[:space:]]+\[[^]]*signed-by=" /etc/apt/sources.list | sed -nE 's/.*signed-by=([^] ]+).*/\1/p' | head -1)
fi
[ -n "$uri" ] || { echo "setup: no apt source for suite $codename found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list" >&2; exit 1; }

apt="$top/apt"
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$top/deb"
opts=""
[ -n "$keyring" ] && [ -f "$keyring" ] && opts="[signed-by=$keyring] "
echo "deb ${opts}$uri $codename-backports main" >"$apt/sources.list"
aptopts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
echo "setup: fetching ${packages[*]} from $codename-backports into $top" >&2
apt-get "${aptopts[@]}" -qq update
rm -f "$top"/deb/*.deb
(cd "$top/deb" && apt-get "${aptopts[@]}" -qq download "${packages[@]/%//$codename-backports}")

# QEMU 10's own package wants a newer SeaBIOS than the release has (qemu-system-x86 Depends:
# seabios (>> 1.16.3-1~); bookworm has 1.16.2, and with it SeaBIOS stalls on q35's AHCI under QEMU
# 10: a SATA disk never boots, an empty CD-ROM holds the boot ~32 s). When the installed one falls
# short, the seabios package (firmware only, Architecture: all) comes from the same archive's
# current stable suite and is unpacked beside QEMU 10; its wrapper puts it first on the firmware
# path. The system's SeaBIOS stays as it is.
need=$(dpkg-deb -f "$top"/deb/qemu-system-x86_*.deb Depends | tr ',' '\n' | sed -nE 's/^ *seabios \(([<>=]+) ([^)]+)\).*/\1 \2/p' | head -1)
have=$(dpkg-query -W -f '${Version}' seabios 2>/dev/null || true)
seabios=""
if [ -n "$need" ]; then
  op=${need%% *} ver=${need#* }
  case "$op" in '>>') rel=gt ;; '>=') rel=ge ;; '=') rel=eq ;; '<<') rel=lt ;; '<=') rel=le ;; *) rel=ge ;; esac
  if [ -z "$have" ] || ! dpkg --compare-versions "$have" "$rel" "$ver"; then
    echo "setup: QEMU 10 needs seabios $op $ver (installed: ${have:-none}): fetching it from the stable suite" >&2
    echo "deb ${opts}$uri stable main" >"$apt/sources-seabios.list"
    sbopts=(-o "Dir::Etc::SourceList=$apt/sources-seabios.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$apt/lists-seabios" -o "Dir::Cache=$apt/cache")
    mkdir -p "$apt/lists-seabios/partial"
    apt-get "${sbopts[@]}" -qq update || { echo "setup: cannot read the stable suite of $uri (needed for QEMU 10's seabios)" >&2; exit 1; }
    (cd "$top/deb" && apt-get "${sbopts[@]}" -qq download seabios/stable)
    got=$(dpkg-deb -f "$top"/deb/seabios_*.deb Version)
    dpkg --compare-versions "$got" "$rel" "$ver" || { echo "setup: the stable suite's seabios $got is not $op $ver either" >&2; exit 1; }
    seabios=1
  fi
fi

new="$top/root.new"
rm -rf "$new"
mkdir -p "$new"
for deb in "$top"/deb/*.deb; do dpkg -x "$deb" "$new"; done
[ -x "$new/usr/bin/qemu-system-x86_64" ] || { echo "setup: the packages held no usr/bin/qemu-system-x86_64" >&2; exit 1; }
rm -rf "$top/root"
mv "$new" "$top/root"

root="$top/root"
mkdir -p "$top/bin"
# The wrappers exec: the QEMU's PID is the wrapper's, and its argv[0] is .../usr/bin/<name>, so
# qmpd's /proc scanners (argv[0] containing qemu-system, basename qemu-img) see the real name.
# -L adds QEMU 10's data directory before the built-in firmware path (SeaBIOS, iPXE, OVMF).
write_wrapper() {
  local name=$1 extra=$2
  cat >"$top/bin/$name.tmp" <<WRAP
#!/bin/sh
# Written by scripts/setup-qemu10.sh: runs the private QEMU 10's $name.
export QEMU_MODULE_DIR='$root/usr/lib/x86_64-linux-gnu/qemu'
exec '$root/usr/bin/$name'$extra "\$@"
WRAP
  chmod 755 "$top/bin/$name.tmp"
  mv "$top/bin/$name.tmp" "$top/bin/$name"
}
firmware=" -L '$root/usr/share/qemu'"
[ -n "$seabios" ] && firmware="$firmware -L '$root/usr/share/seabios'"
write_wrapper qemu-system-x86_64 "$firmware"
for tool in qemu-img qemu-io qemu-nbd qemu-storage-daemon; do write_wrapper "$tool" ""; done

{ "$top/bin/qemu-system-x86_64" --version | head -1; echo "$layout"; } >"$stamp.tmp"
mv "$stamp.tmp" "$stamp"
echo "setup: $(head -1 "$stamp") in $top/bin" >&2
