#!/bin/bash
# Runs the whole test suite inside a qemu guest with real OpenZFS (kernel
# module and tools), instead of zfs-fuse. Builds the guest image the first
# time (about 6 minutes), boots it (about 30 s), runs the suite with this
# checkout shared at /src, prints the OpenZFS version tested, and stops the
# guest again, also on failure. Not part of .ci/run: under software
# emulation the suite takes several minutes more than on the host.
#   bash contrib/test-openzfs.sh            # everything
#   bash contrib/test-openzfs.sh -k state   # extra arguments go to pytest
#   bash contrib/test-openzfs.sh tests/test_gate.py tests/test_replication.py
#                                           # only these (no tests/ added)
# The VM scripts live in shared/openzfs-vm beside the checkout (or set VM_DIR).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$(cd "$here/.." && pwd)"
vm="${VM_DIR:-$(cd "$src/.." && pwd)/shared/openzfs-vm}"
[ -x "$vm/start-vm.sh" ] || vm="$(cd "$src/../.." && pwd)/shared/openzfs-vm"
if [ ! -x "$vm/start-vm.sh" ]; then
    echo "cannot find the OpenZFS VM scripts (shared/openzfs-vm); set VM_DIR" >&2
    exit 2
fi
build="${VM_BUILD:-/var/tmp/openzfs-vm}"
if [ ! -f "$build/rootfs.img" ]; then
    echo "building the OpenZFS guest image (once, about 6 minutes)..." >&2
    "$vm/build-image.sh"
fi
export VM_SRC="$src"
"$vm/stop-vm.sh" >/dev/null 2>&1 || true     # a VM sharing another directory cannot be reused
trap '"$vm/stop-vm.sh" >/dev/null 2>&1 || true' EXIT
"$vm/start-vm.sh" >/dev/null
# How much slower the guest runs than this host (much slower under TCG):
# the same calibration on both, the ratios passed to the tests, which scale
# their heartbeat timings and packet rates by them (see tests/bed.py).
# Set FLOCKER_TEST_SLOW (and FLOCKER_TEST_SLOW_PACKETS) to skip measuring.
if [ -z "${FLOCKER_TEST_SLOW:-}" ]; then
    read -r host_cpu host_pkt < <(/usr/bin/python3 "$src/tests/bed.py" calibrate)
    read -r guest_cpu guest_pkt < <("$vm/vm-run.sh" "python3 tests/bed.py calibrate")
    read -r FLOCKER_TEST_SLOW FLOCKER_TEST_SLOW_PACKETS < <(/usr/bin/python3 -c '
import math, sys
h, hp, g, gp = map(float, sys.argv[1:])
print(*(max(1, math.ceil(x)) for x in (g / h, gp / hp)))' \
        "$host_cpu" "$host_pkt" "$guest_cpu" "$guest_pkt")
fi
FLOCKER_TEST_SLOW_PACKETS="${FLOCKER_TEST_SLOW_PACKETS:-$FLOCKER_TEST_SLOW}"
echo "guest timing scale: FLOCKER_TEST_SLOW=$FLOCKER_TEST_SLOW" \
     "FLOCKER_TEST_SLOW_PACKETS=$FLOCKER_TEST_SLOW_PACKETS"
args=""
where=" tests/"         # the whole suite, unless test files are named
for a in "$@"; do
    args="$args $(printf '%q' "$a")"
    case "$a" in tests/*|./tests/*) where="" ;; esac
done
"$vm/vm-run.sh" "export FLOCKER_TEST_SLOW=$(printf '%q' "$FLOCKER_TEST_SLOW")\
 FLOCKER_TEST_SLOW_PACKETS=$(printf '%q' "$FLOCKER_TEST_SLOW_PACKETS");\
 echo \"testing against: \$(zfs version | tr '\n' ' ')\";\
 python3 -m pytest -p no:cacheprovider -q -rs$where$args"
