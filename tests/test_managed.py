"""The one-shot commands a cluster manager drives (contrib/ocf/flocker):
compare, rejoin, demote --even-if-unsent, and promote --force without a
daemon taking an epoch above every one its replica carries.  Real ZFS and
ssh on the bed, no daemon, no Pacemaker (tests/test_ocf.py runs the agent
under a real one)."""

import contextlib
import json
import os

import bed as bedmod
from conftest import ff


def L(*snaps, marker=None):
    props = {ff.ROLE_PROPERTY: marker} if marker else {}
    return ff.Listing("p/d", props, tuple(ff.Snap(n, g, 0, i) for i, (n, g) in
                                          enumerate(snaps)))


def test_replica_relation_by_guid():
    a, b, c = ("flocker-2-x", "1"), ("flocker-2-y", "2"), ("flocker-3-z", "3")
    rel = ff.replica_relation
    assert rel(L(a, b), L(a, b)) == ff.RELATION_SAME
    assert rel(L(a, b), L(a)) == ff.RELATION_AHEAD
    assert rel(L(a), L(a, b)) == ff.RELATION_BEHIND
    assert rel(L(a, b), L(a, c)) == ff.RELATION_DIVERGED
    assert rel(L(), L(a)) == ff.RELATION_NO_REPLICA
    assert rel(None, L(a)) == ff.RELATION_NO_REPLICA
    assert rel(L(a), L()) == ff.RELATION_PEER_EMPTY
    assert rel(L(), None) == ff.RELATION_SAME
    # by GUID, not by name
    assert rel(L(("other-name", "1")), L(a)) == ff.RELATION_SAME


def test_epoch_in_listing_counts_snapshot_names_and_the_role_marker():
    assert ff.epoch_in_listing(None) == 0
    assert ff.epoch_in_listing(L()) == 0
    four = ("flocker-4-19700101T000000.000Z", "1")
    assert ff.epoch_in_listing(L(four, ("manual", "2"))) == 4
    assert ff.epoch_in_listing(L(four, marker="beta master 7")) == 7


def write(host, name, text):
    mp = bedmod.sh(["zfs", "get", "-H", "-o", "value", "mountpoint", host.dataset]).stdout.strip()
    with open(os.path.join(mp, name), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def status(host):
    return json.loads(host.flocker("status", "--json").stdout)


def compare(host):
    p = host.flocker("compare", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_a_master_demoted_without_its_peer_keeps_its_tail_which_rejoin_keeps_aside(bed):
    a, b = bed.a, bed.b
    assert a.flocker("init", "--role", "master").returncode == 0
    assert b.flocker("init", "--role", "slave").returncode == 0
    write(a, "f1", "one")
    assert a.flocker("sync").returncode == 0
    r = compare(b)
    assert r["relation"] == "same" and r["peer_role"] == "master", r
    p = b.flocker("rejoin")
    assert p.returncode == 0 and "already alpha's slave" in p.stdout, p.stderr
    # the replication link fails; alpha writes on, then is demoted: the
    # final snapshot cannot be sent, and --even-if-unsent demotes all the same
    write(a, "f2", "two")
    b.kill_sshd()
    p = a.flocker("demote")
    assert p.returncode == 1 and "called off" in p.stderr      # alpha stays master
    p = a.flocker("demote", "--even-if-unsent")
    assert p.returncode == 0 and "could NOT be sent" in p.stdout, p.stderr
    assert status(a)["role"] == "slave"
    r = compare(a)
    assert not r["reachable"] and r["relation"] is None and r["error"]
    b.start_sshd()
    bedmod.sh(b.ssh_argv(a, ["true"]))
    assert compare(a)["relation"] == "ahead"      # f2 is in a snapshot of its own
    assert compare(b)["relation"] == "behind"
    # beta is promoted anyway (the operator, or a cluster manager told so):
    # its epoch is above alpha's, though it never heard alpha (no daemon)
    p = b.flocker("promote", "--force")
    assert p.returncode == 0, p.stderr
    assert status(b)["epoch"] == 3 > status(a)["epoch"] == 2    # (1 before: its own parity
    #                                                           above the 0 it had seen)
    write(b, "f3", "three")
    # alpha's tail is in the way of beta's replication until alpha rejoins
    assert b.flocker("sync").returncode == ff.EXIT_REPLICATION
    p = b.flocker("rejoin")
    assert p.returncode == 1 and "alpha is not master" in p.stderr
    p = a.flocker("rejoin")
    assert p.returncode == 0 and "kept this node's data" in p.stdout, p.stderr
    kept = status(a)["preserved"][-1]["dataset"]
    assert kept.startswith(a.dataset + "-diverged-")
    p = b.flocker("sync")
    assert p.returncode == 0, p.stderr
    assert compare(a)["relation"] == "same"
    # alpha's replica holds beta's data; the kept dataset alpha's f2
    bedmod.sh(["zfs", "mount", kept])
    try:
        mp = bedmod.sh(["zfs", "get", "-H", "-o", "value", "mountpoint", kept]).stdout.strip()
        with open(os.path.join(mp, "f2")) as f:
            assert f.read() == "two"
    finally:
        bedmod.sh(["zfs", "unmount", kept], check=False)
    assert a.flocker("rejoin").stdout.startswith("already beta's slave")


def test_a_recursive_master_with_changes_stops_and_says_so_when_rejoin_refuses(bed):
    """rejoin with recursive = yes: the tool does not keep the divergent
    data of datasets with children (README, "Divergent data"), so a master
    that wrote after the common snapshot cannot rejoin by itself.  The peer
    is master by the cluster manager's (or the operator's) decision, so this
    node's user system stops all the same (two writers must not go on, as
    the older of two serving masters stops: split_brain_yields), and the
    refusal says so, with how to keep the data by hand; role and data stay.
    (It said "nothing was changed" after stopping the user system.)  One
    with nothing to keep rejoins."""
    a, b = bed.a, bed.b
    said = os.path.join(bed.workdir, "service-")
    bed.write_config(cluster={"recursive": "yes"},
                     service={"start_command": "sh -c 'echo start >> %s$FLOCKER_NODE'" % said,
                              "stop_command": "sh -c 'echo stop >> %s$FLOCKER_NODE'" % said})

    def service(host):
        with contextlib.suppress(FileNotFoundError):
            with open(said + host.name) as f:
                return f.read().split()
        return []

    assert a.flocker("init", "--role", "master").returncode == 0
    assert b.flocker("init", "--role", "slave").returncode == 0
    bedmod.sh(["zfs", "create", a.dataset + "/kid"])
    write(a, "f1", "one")
    assert a.flocker("sync").returncode == 0
    # beta is promoted (a cluster manager's decision); alpha, which wrote
    # nothing since, rejoins: it stops its user system and becomes slave
    assert b.flocker("promote", "--force").returncode == 0
    p = a.flocker("rejoin")
    assert p.returncode == 0 and "nothing after" in p.stdout, p.stdout + p.stderr
    assert status(a)["role"] == "slave" and set(service(a)) == {"stop"}    # (stops are
    #                                                      idempotent: demote stops again)

    # alpha is made master again and writes in its child dataset; beta,
    # told it is master, stays so: alpha's rejoin stops its user system and
    # refuses, keeping its data for the operator
    assert a.flocker("promote", "--force").returncode == 0
    assert service(a)[-1] == "start"
    before = service(a)
    kid = bedmod.sh(["zfs", "get", "-H", "-o", "value", "mountpoint",
                     a.dataset + "/kid"]).stdout.strip()
    with open(os.path.join(kid, "k1"), "w") as f:
        f.write("only on alpha")
    epoch = status(a)["epoch"]
    p = a.flocker("rejoin")
    assert p.returncode != 0, p.stdout
    assert "recursive = yes" in p.stderr and "zfs rename" in p.stderr, p.stderr
    assert "user system was stopped" in p.stderr and "nothing was changed" not in p.stderr
    assert service(a) == before + ["stop"]
    st = status(a)
    assert st["role"] == "master" and st["epoch"] == epoch
    with open(os.path.join(kid, "k1")) as f:
        assert f.read() == "only on alpha"
