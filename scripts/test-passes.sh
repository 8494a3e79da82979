#!/usr/bin/env bash
# The tap part of `npm test`: the whole suite on the distribution's QEMU (PATH) with coverage, then
# again on the private QEMU 10 of scripts/setup-qemu10.sh (scripts/with-qemu10.sh) without
# coverage, when it is installed in .qemu/10 (always under CI=true: setup.sh installs it there).
# QMPD_QEMU10_PASS=1 insists on the second pass (a missing QEMU 10 fails the run), =0 leaves it out.
# Exits non-zero when a pass fails. Arguments go to tap.
set -uo pipefail
cd "$(dirname "$0")/.."
want=${QMPD_QEMU10_PASS:-}
if [ -z "$want" ]; then
  want=0
  { [ -x .qemu/10/bin/qemu-system-x86_64 ] || [ "${CI:-}" = true ]; } && want=1
fi
echo "pass 1: $(qemu-system-x86_64 --version | head -1)"
npx tap "$@"
first=$?
second=0
if [ "$want" = 1 ]; then
  if [ -x .qemu/10/bin/qemu-system-x86_64 ]; then
    echo "pass 2: $(.qemu/10/bin/qemu-system-x86_64 --version | head -1)"
    # Coverage is gated by pass 1 (same sources); instrumenting again only costs time. The crash
    # matrix tries each scenario at 2 of its riskiest points (first and last) with the daemon
    # killed and the first with QEMU killed (test/helpers/crash-matrix.ts); pass 1 tries every
    # riskiest point. The hostile-client fuzz (test/http/fuzz.test.ts) sends half as many requests,
    # under CI=true from another fixed seed: new inputs against this QEMU, not pass 1's again.
    fuzz=(QMPD_FUZZ_COUNT="${QMPD_FUZZ_COUNT:-1000}")
    [ "${CI:-}" = true ] && fuzz+=(QMPD_FUZZ_SEED="${QMPD_FUZZ_SEED:-20261202}")
    env QMPD_CRASH_SAMPLE="${QMPD_CRASH_SAMPLE:-2}" "${fuzz[@]}" bash scripts/with-qemu10.sh npx tap --disable-coverage "$@"
    second=$?
  else
    echo "pass 2: QEMU 10 is missing (.qemu/10/bin): bash scripts/setup.sh --qemu10 installs it" >&2
    second=1
  fi
fi
[ "$first" -eq 0 ] && [ "$second" -eq 0 ]
