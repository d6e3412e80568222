#!/bin/bash
# The main job, demonstrated on one machine: two hosts (network namespaces
# alpha and beta, each with its own address, sshd and ZFS pool), one shared
# configuration, both nodes initialised, status shown on both.
# On a fresh Debian machine, as root:   bash contrib/demo.sh
# Everything it creates is removed at the end, also when it fails.
#
# This is the foundation's demo; the failover issue extends it to start both
# daemons, kill the master and show the slave taking over.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/setup-debian.sh"
flocker_setup_debian
exec /usr/bin/python3 - "$here/../tests" <<'PY'
import sys, time
sys.path.insert(0, sys.argv[1])
import bed as bedmod

t0 = time.monotonic()
def say(msg):
    print("[%6.2f s] %s" % (time.monotonic() - t0, msg), flush=True)

bedmod.ensure_zfs()
bedmod.cleanup_stale()
say("ZFS answers (%s)" % bedmod.zfs_kind())
bed = bedmod.Bed()
try:
    a, b = bed.a, bed.b
    say("host alpha: namespace %s, address %s, pool %s" % (a.ns, a.address, a.pool.name))
    say("host beta:  namespace %s, address %s, pool %s" % (b.ns, b.address, b.pool.name))
    say("shared configuration %s:" % bed.config_path)
    print(open(bed.config_path).read())
    for host, role in ((a, "master"), (b, "slave")):
        say("on %s: flocker_failover.py init --role %s" % (host.name, role))
        print(host.flocker("init", "--role", role, check=True).stdout)
    for host in (a, b):
        say("on %s: flocker_failover.py status" % host.name)
        print(host.flocker("status", check=True).stdout)
    say("ssh from alpha to beta works: %s" % bedmod.sh(a.ssh_argv(b, ["hostname"])).stdout.strip())
    p = bedmod.sh(a.ssh_argv(b, ["zfs list -H -o name " + b.pool.name], gated=True))
    say("flocker's own key reaches beta's ssh gate: 'zfs list -H -o name %s' -> %s"
        % (b.pool.name, p.stdout.strip()))
    p = bedmod.sh(a.ssh_argv(b, ["hostname"], gated=True), check=False)
    say("and nothing else: 'hostname' -> exit %d: %s" % (p.returncode, p.stderr.strip()))
finally:
    bed.close()
    say("cleaned up: namespaces, pools, sshd and files removed")
PY
