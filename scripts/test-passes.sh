#!/usr/bin/env bash
# The tap part of `npm test`: the whole suite on the distribution's QEMU (PATH) with coverage, then
# again on the private QEMU 10 (scripts/with-qemu10.sh) without coverage. Under CI=true a missing
# QEMU 10 fails the run; elsewhere the second pass is left out with a note. Exits non-zero when
# either pass fails. Arguments go to both tap runs.
set -uo pipefail
cd "$(dirname "$0")/.."
echo "pass 1: $(qemu-system-x86_64 --version | head -1)"
npx tap "$@"
first=$?
if [ -x .qemu/10/bin/qemu-system-x86_64 ]; then
  echo "pass 2: $(.qemu/10/bin/qemu-system-x86_64 --version | head -1)"
  # Coverage is gated by pass 1 (same sources); instrumenting again only costs time.
  bash scripts/with-qemu10.sh npx tap --disable-coverage "$@"
  second=$?
elif [ "${CI:-}" = true ]; then
  echo "pass 2: QEMU 10 is missing (.qemu/10/bin): scripts/setup.sh installs it under CI=true" >&2
  second=1
else
  echo "pass 2 (QEMU 10) not run: no .qemu/10 (bash scripts/setup.sh --qemu10 puts it there)" >&2
  second=0
fi
[ "$first" -eq 0 ] && [ "$second" -eq 0 ]
