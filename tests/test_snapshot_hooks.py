"""snapshot_command and snapshot_done_command: a database made consistent
(a CHECKPOINT, fsfreeze, a lock) right before each replication snapshot,
and let go right after, also when the snapshot failed.  Through `sync` on
the bed: the hooks' order against the snapshot by their own time stamps,
what the first hook wrote is in the snapshot the slave receives, a failing
and a hanging first hook take no snapshot and are recorded."""

import os
import sys

import pytest

import bed as bedmod
from conftest import ff

HOOK = r'''
import os, sys, time
log, what = sys.argv[1], sys.argv[2]
now = time.time()
with open(log, "a") as f:
    f.write("%s %.6f %s %s\n" % (what, now, os.environ.get("FLOCKER_SNAPSHOT", "-"),
                                 os.environ.get("FLOCKER_SNAPSHOT_RESULT", "-")))
if what == "freeze":
    mp = os.environ["FLOCKER_MOUNTPOINT"]
    with open(os.path.join(mp, "checkpoint"), "w") as f:   # the database's consistent state
        f.write("checkpoint at %.6f" % now)
if what == "fail":
    sys.exit(3)
if what == "hang":
    time.sleep(100)
'''


@pytest.fixture
def hooked(bed):
    script = os.path.join(bed.workdir, "hook.py")
    with open(script, "w") as f:
        f.write(HOOK)
    log = os.path.join(bed.workdir, "hooks.log")

    def configure(first, timeout="10"):
        bed.write_config(service={
            "snapshot_command": "%s %s %s %s" % (sys.executable, script, log, first),
            "snapshot_done_command": "%s %s %s thaw" % (sys.executable, script, log),
            "snapshot_timeout": timeout})
    configure("freeze")
    assert bed.a.flocker("init", "--role", "master").returncode == 0
    assert bed.b.flocker("init", "--role", "slave").returncode == 0

    def entries():
        if not os.path.exists(log):
            return []
        with open(log) as f:
            return [line.split() for line in f]
    return bed, configure, entries


def snaps(ds):
    out = bedmod.sh(["zfs", "get", "-H", "-o", "name", "guid", "-d", "1", ds]).stdout
    return [line.split("@")[1] for line in out.split() if "@" in line]


def test_the_hooks_bracket_the_snapshot_and_its_content(hooked):
    bed, configure, entries = hooked
    a, b = bed.a, bed.b
    r = a.flocker("sync")
    assert r.returncode == 0, r.stderr
    (what1, t1, snap1, _), (what2, t2, snap2, result) = entries()
    assert (what1, what2, result) == ("freeze", "thaw", "ok")
    # the first hook runs before the snapshot has a name; the second gets it
    assert snap1 == "-" and snaps(a.dataset)[-1] == snap2 == snaps(b.dataset)[-1]
    # freeze, then the snapshot (its name is its time, to the millisecond), then thaw
    taken = ff.snapshot_time(snap2)
    assert float(t1) <= taken + 0.001 and taken <= float(t2), (t1, taken, t2)
    # what the first hook wrote is in the snapshot the slave holds
    bedmod.sh(["zfs", "mount", b.dataset], check=False)
    with open(os.path.join(b.pool.mountpoint, "shop", "checkpoint")) as f:
        assert f.read() == "checkpoint at %s" % t1


@pytest.mark.parametrize("first,timeout,why", [
    ("fail", "10", "exited 3"),
    ("hang", "1", "did not finish within 1 s"),
])
def test_a_failing_or_hanging_first_hook_takes_no_snapshot(hooked, first, timeout, why):
    bed, configure, entries = hooked
    a = bed.a
    assert a.flocker("sync").returncode == 0
    before = snaps(a.dataset)
    with open(os.path.join(a.pool.mountpoint, "shop", "new"), "w") as f:
        f.write("changed, so a cycle would snapshot")
    configure(first, timeout)
    r = a.flocker("sync")
    assert r.returncode != 0
    assert "snapshot_command" in r.stderr and why in r.stderr, r.stderr
    assert "no snapshot was taken" in r.stderr, r.stderr
    assert snaps(a.dataset) == before
    # the second hook ran all the same, told that no snapshot was taken
    assert entries()[-1][0] == "thaw" and entries()[-1][3] == "failed", entries()
    with ff.StateStore.open(a.state_db) as s:
        last = s.last_replication()
    assert last["result"] == "failed" and "snapshot_command" in last["error"], last
