#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for qmpd: QEMU and qemu-img from the distribution's
# packages when missing, then the npm dependencies from the lock file; with --qemu10 (or
# QMPD_SETUP_QEMU10=1, and always under CI=true) also a private QEMU 10 in .qemu/10 (see
# scripts/setup-qemu10.sh). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

qemu10=0
for arg in "$@"; do
  case "$arg" in
    --qemu10) qemu10=1 ;;
    *) echo "setup: unknown option $arg (known: --qemu10)" >&2; exit 2 ;;
  esac
done
[ "${QMPD_SETUP_QEMU10:-}" = 1 ] && qemu10=1
[ "${CI:-}" = true ] && qemu10=1

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || need+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need+=(qemu-utils)
# UEFI VMs (firmware: uefi) and their test: OVMF and its firmware descriptors.
[ -e /usr/share/qemu/firmware/60-edk2-x86_64.json ] || need+=(ovmf)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  echo "setup: qmpd needs Node.js >= 20 (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi

if [ "$qemu10" = 1 ]; then
  bash scripts/setup-qemu10.sh
fi
