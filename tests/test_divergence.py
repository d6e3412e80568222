"""Split brain with two real daemons: both serve while the link is cut and
both write; when the link returns, both reach the same verdict, the winner
serves its version, the loser keeps its own in a preserved dataset and
replicates the winner's.  Every file written on either side stays readable
somewhere (checksums)."""

import hashlib
import os
import time

import bed as bedmod
from conftest import ff
from test_daemon import Running, init, wait_for
from test_failover import (START, STOP, lanbed, serving, replicated, zget,  # noqa: F401
                           svc_running)

DEAD = 1.0


def configure(bed, policy, nodes=None):
    w = bed.workdir
    return bed.write_config(
        cluster={"replication_interval": "0.5", "divergence_policy": policy},
        service={"start_command": START.format(w=w), "stop_command": STOP.format(w=w)},
        nodes=nodes)


class Pair:
    """Two running daemons; alpha starts as master."""

    def __init__(self, bed, policy):
        self.bed = bed
        configure(bed, policy)
        init(bed)
        for h in bed.hosts:
            bedmod.sh(["zfs", "set", "atime=off", h.pool.name])
        self.d = {bed.a: Running(bed.a).wait_ready(), bed.b: Running(bed.b).wait_ready()}
        wait_for(lambda: serving(self.d[bed.a]) and replicated(self.d[bed.a]), 30, step=0.05)

    def master(self):
        return [h for h, d in self.d.items() if d.status()["role"] == "master"][0]

    def restart(self, host, **kw):
        self.d[host] = Running(host, tag="-%d" % time.monotonic_ns(), **kw).wait_ready()

    def stop(self):
        for d in self.d.values():
            d.stop()

    def split(self, writes):
        """Cut the link until both serve, write {host: bytes} on each, and
        return {host: {file: sha256}} of what each wrote."""
        bed = self.bed
        bed.cut_link()
        wait_for(lambda: all(serving(d) for d in self.d.values()), 15, step=0.05)
        written = {}
        for h, size in writes.items():
            written[h] = {}
            if size:
                mnt = zget(h.dataset, "mountpoint")
                name = "from-%s-%d.bin" % (h.name, time.time_ns())
                data = os.urandom(size)
                with open(os.path.join(mnt, name), "wb") as f:
                    f.write(data)
                written[h][name] = hashlib.sha256(data).hexdigest()
        return written

    def heal(self):
        self.bed.restore_link()

    def settled(self):
        """One serving master, one slave holding its newest snapshot, and
        no resolution under way."""
        st = {h: d.status() for h, d in self.d.items()}
        masters = [h for h in st if st[h]["role"] == "master" and st[h]["serving"]]
        slaves = [h for h in st if st[h]["role"] == "slave"]
        if len(masters) != 1 or len(slaves) != 1:
            return None
        if any(s["divergence"]["resolving"] or s["divergence"]["unresolved"]
               for s in st.values()):
            return None
        m = masters[0]
        if not (st[m]["snapshot"] and st[m]["peer"].get("snapshot") == st[m]["snapshot"]):
            return None
        return m


def files_in(dataset):
    """{file: sha256} of a dataset, mounting it for the look when needed."""
    mounted = zget(dataset, "mounted") == "yes"
    if not mounted:
        bedmod.sh(["zfs", "mount", dataset])
    try:
        return bedmod.tree_digest(zget(dataset, "mountpoint"))
    finally:
        if not mounted:
            bedmod.sh(["zfs", "unmount", dataset], check=False)


def preserved(host):
    with ff.StateStore.open(host.state_db) as s:
        return [p["dataset"] for p in s.preserved()]


def check_nothing_lost(winner, loser, written):
    """The winner serves its version (and its own writes); the loser's
    writes are in its preserved dataset; the loser's replica is the
    winner's version."""
    have = files_in(winner.dataset)
    for name, digest in written[winner].items():
        assert have.get(name) == digest, (winner, name)
    kept = preserved(loser)
    if written[loser]:
        assert len(kept) == 1, kept
        old = files_in(kept[0])
        for name, digest in written[loser].items():
            assert old.get(name) == digest, (loser, name)
            assert name not in have
    else:
        assert kept == []


def test_most_changes_the_master_wins_then_the_slave_wins(lanbed):
    bed = lanbed
    a, b = bed.a, bed.b
    p = Pair(bed, "most-changes")
    try:
        written = p.split({a: 300000, b: 100000})
        p.heal()
        m = wait_for(p.settled, 60, step=0.1)
        assert m is a                     # the original master changed more
        check_nothing_lost(a, b, written)
        st = p.d[a].status()
        assert st["epoch"] == 4           # above both (2 and 3)
        assert "alpha wins: it changed more" in a.flocker("history").stdout
        assert "alpha wins: it changed more" in b.flocker("history").stdout
        # the loser's replica is the winner's version
        wait_for(lambda: files_in(b.dataset) == files_in(a.dataset), 30, step=0.2)
    finally:
        p.stop()
