#!/bin/bash
# Installs what the test suite and the demo need on a Debian machine, as root:
# ZFS (zfs-fuse: real ZFS without a kernel module), ssh, iproute2, pytest
# and pytest-xdist (the suite runs in parallel); extra packages as arguments
# (contrib/test.sh adds postgresql, for contrib/examples/postgresql's test, and
# pacemaker, pacemaker-cli-utils, corosync, resource-agents and libxml2-utils
# for the resource agent's, contrib/ocf/test).
# Sourced by contrib/test.sh and contrib/demo.sh; installs only what is missing.
set -euo pipefail

flocker_setup_debian() {
    if [ "$(id -u)" != 0 ]; then
        echo "run this as root: it creates ZFS pools, network namespaces and sshd instances" >&2
        exit 1
    fi
    local missing=() pkg
    # zfs-fuse is only needed where no ZFS is installed (an OpenZFS host has zfs already)
    command -v zfs >/dev/null 2>&1 || missing+=(zfs-fuse)
    for pkg in openssh-server openssh-client iproute2 util-linux python3 python3-pytest \
               python3-pytest-xdist "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    mkdir -p /run/sshd
}
