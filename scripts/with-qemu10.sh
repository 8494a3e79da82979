#!/usr/bin/env bash
# Runs a command (the test suite, qmpd) on the private QEMU 10 of scripts/setup-qemu10.sh: its bin
# directory first on PATH (what the tests run) and as QMPD_QEMU / QMPD_QEMU_IMG (what qmpd runs).
set -euo pipefail
bin="$(cd "$(dirname "$0")/.." && pwd)/.qemu/10/bin"
if [ ! -x "$bin/qemu-system-x86_64" ]; then
  echo "QEMU 10 is not in $bin: run bash scripts/setup.sh --qemu10" >&2
  exit 1
fi
export PATH="$bin:$PATH" QMPD_QEMU="$bin/qemu-system-x86_64" QMPD_QEMU_IMG="$bin/qemu-img"
exec "$@"
