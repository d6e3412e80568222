#!/bin/bash
# The test command: on a fresh Debian machine, as root, installs what is
# missing and runs the whole suite against real ZFS, ssh and network
# namespaces (on zfs-fuse each test gets a daemon of its own: tests/bed.py).
#   bash contrib/test.sh              # everything
#   bash contrib/test.sh -k config    # extra arguments go to pytest
#   bash contrib/test.sh -n 2         # 2 tests at a time (-n 0: one)
# The tests mostly wait (for daemons, dead times, ssh, zfs), so pytest-xdist
# runs 6 at a time (on 2 cores: 3 took 551 s, 4 459 s, 5 410 s with timing
# failures; once the bed ran the program imported, 4 took 374 s and 6
# 292-314 s; with the test modules compiled once (below) and the program's
# records, 6 took 288-307 s, see README),
# each worker with its own test beds; the longest tests start first
# (tests/conftest.py), handed out as workers finish (--dist loadgroup),
# and the heartbeat-timing tests one after the other (conftest's
# HEARTBEAT_TIMING).  The resource agent's tests under Pacemaker (marked
# 'pacemaker', some 150 s) run among the others, started first as the
# longest; bash contrib/ocf/test runs them alone.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/setup-debian.sh"
# postgresql: the example user system's test runs it; pacemaker...libxml2-utils:
# the resource agent's (tests/test_ocf.py)
flocker_setup_debian postgresql pacemaker pacemaker-cli-utils corosync resource-agents \
    libxml2-utils
cd "$here/.."
# Each worker imports every test module, and pytest rewrites the asserts of
# each as it imports it: 2.7 s of CPU per worker here, 6 at once, before the
# first test.  One collection first does it once, into a bytecode cache the
# workers then read (FLOCKER_TEST_PYCACHE, see tests/conftest.py), removed
# at the end.
FLOCKER_TEST_PYCACHE="$(mktemp -d /var/tmp/flocker-test-pycache.XXXXXX)"
export FLOCKER_TEST_PYCACHE
trap 'rm -rf "$FLOCKER_TEST_PYCACHE"' EXIT
# Debian's interpreter and its python3-pytest, whatever else is on PATH
/usr/bin/python3 -m pytest -p no:cacheprovider -q --collect-only tests/ >/dev/null 2>&1 || true
/usr/bin/python3 -m pytest -p no:cacheprovider -q -rs \
    -n 6 --dist loadgroup tests/ "$@"
