#!/bin/bash
# The test command: on a fresh Debian machine, as root, installs what is
# missing and runs the whole suite against real ZFS, ssh and network
# namespaces (the test bed starts the zfs-fuse daemon when no ZFS answers).
#   bash contrib/test.sh              # everything
#   bash contrib/test.sh -k config    # extra arguments go to pytest
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/setup-debian.sh"
flocker_setup_debian
cd "$here/.."
# Debian's interpreter and its python3-pytest, whatever else is on PATH
exec /usr/bin/python3 -m pytest -p no:cacheprovider -q -rs tests/ "$@"
