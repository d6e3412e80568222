"""Replication (issue 3): pure helpers in microseconds, then real cycles
over real ssh between the bed's two namespaces on real ZFS."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import bed as bedmod
from conftest import ff
from helpers import (fails, link_bytes, master_digest, mnt, ok, pids_of, prepare, prop,
                     slave_digest, snaps, sync, write)


# ---------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------

# Transcribed (abridged to the lines feature detection reads, plus a few
# around them) from the usage text of OpenZFS 2.1: `zfs` alone, then the
# property table `zfs get` prints.  No OpenZFS host was available to record
# it from; the synopsis lines follow cmd/zfs/zfs_main.c of that release.
OPENZFS_2_1_USAGE = """\
usage: zfs command args ...
where 'command' is one of the following:

	version

	create [-Pnpuv] [-o property=value] ... <filesystem>
	create [-Pnpsv] [-b blocksize] [-o property=value] ... -V <size> <volume>
	destroy [-fnpRrv] <filesystem|volume>
	destroy [-dnpRrv] <filesystem|volume>@<snap>[%<snap>][,...]
	destroy <filesystem|volume>#<bookmark>

	snapshot [-r] [-o property=value] ... <filesystem|volume>@<snap> ...
	rollback [-rRf] <snapshot>
	list [-Hp] [-r|-d max] [-o property[,...]] [-s property]...
	    [-S property]... [-t type[,...]] [filesystem|volume|snapshot] ...

	set <property=value> ... <filesystem|volume|snapshot> ...
	get [-rHp] [-d max] [-o "all" | field[,...]]
	    [-t type[,...]] [-s source[,...]]
	    <"all" | property[,...]> [filesystem|volume|snapshot|bookmark] ...

	send [-DLPbcehnpsvw] [-i|-I snapshot]
	     [-R [-X dataset[,dataset]...]]     <snapshot>
	send [-DnvPLecw] [-i snapshot|bookmark] <filesystem|volume|snapshot>
	send [-DnPpvLec] [-i bookmark|snapshot] --redact <bookmark> <snapshot>
	send [-nvPe] -t <receive_resume_token>
	send [-Pnv] --saved filesystem
	receive [-vMnsFhu] [-o <property>=<value>] ... [-x <property>] ...
	    <filesystem|volume|snapshot>
	receive [-vMnsFhu] [-o <property>=<value>] ... [-x <property>] ...
	    [-d | -e] <filesystem>
	receive -A <filesystem|volume>

	hold [-r] <tag> <snapshot> ...
	holds [-rH] <snapshot> ...
	release [-r] <tag> <snapshot> ...

The following properties are supported:

	PROPERTY       EDIT  INHERIT   VALUES

	available        NO       NO   <size>
	clones           NO       NO   <dataset>[,...]
	createtxg        NO       NO   <uint64>
	guid             NO       NO   <uint64>
	receive_resume_token  NO       NO   <string token>
	referenced       NO       NO   <size>
	userrefs         NO       NO   <count>
	written          NO       NO   <size>
	readonly        YES      YES   on | off
	written@<snap>   NO       NO   <size>
"""


def zfs_fuse_usage():
    """The usage text of the zfs on this machine (zfs-fuse in the bed)."""
    out = []
    for args in ([], ["get"]):
        p = subprocess.run(["zfs"] + args, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True)
        out.append(p.stdout)
    return "\n".join(out)


def test_features_of_openzfs_2():
    f = ff.parse_zfs_features(OPENZFS_2_1_USAGE)
    assert f == ff.ZfsFeatures(resumable=True, written=True, destroy_multi=True,
                               list_parsable=True, createtxg=True, clones=True,
                               recv_exclude=True, send_estimate=True,
                               send_flags=frozenset(["-c", "-L", "-e", "-w"]))
    # the modern path of every command built from features
    assert ff.listing_args("t/s", f)[5].split(",")[-4:] == [
        "written", "createtxg", "clones", "receive_resume_token"]
    assert ff.build_recv_argv("t/r", f.resumable) == ["zfs", "recv", "-u", "-s", "t/r"]
    assert ff.destroy_commands("t/s", ["a", "b"], False, f) == [["destroy", "t/s@a,b"]]
    assert ff.usable_send_flags(("-c", "-w"), f, f) == ["-c", "-w"]
    assert ff.build_resume_send_argv("1-abc-def") == ["zfs", "send", "-t", "1-abc-def"]


def test_features_of_a_real_openzfs_2_3():
    """Recorded from OpenZFS 2.3.2 (zfs-2.3.2-2~bpo12+2 in the qemu guest of
    contrib/test-openzfs.sh) with 'zfs 2>&1; zfs get 2>&1': the text the
    ssh gate's features request prints, which feature detection reads."""
    path = os.path.join(os.path.dirname(__file__), "data", "openzfs-2.3.2-usage.txt")
    with open(path) as f:
        f = ff.parse_zfs_features(f.read())
    assert f == ff.ZfsFeatures(resumable=True, written=True, destroy_multi=True,
                               list_parsable=True, createtxg=True, clones=True,
                               recv_exclude=True, send_estimate=True, encryption=True,
                               send_flags=frozenset(["-c", "-L", "-e", "-w"]))


class FakePeer(ff.ZfsBase):
    def __init__(self, features):
        self._features = features


def test_resume_only_when_both_ends_can():
    """A receive_resume_token is acted on only where both zfs support
    resumable streams (nothing is run otherwise)."""
    fuse = ff.ZfsFeatures()
    tok = ff.Listing("p/d", {"receive_resume_token": "1-abc"}, ())
    cfg = ff.Config(path="x", name="c", secret_file="s", secret=b"")
    assert ff._resume_partial(cfg, FakePeer(fuse), FakePeer(fuse), tok) is None
    modern = ff.parse_zfs_features(OPENZFS_2_1_USAGE)
    none = ff.Listing("p/d", {"receive_resume_token": "-"}, ())
    assert ff._resume_partial(cfg, FakePeer(modern), FakePeer(modern), none) is None


def test_features_of_zfs_fuse(zfs_ready):
    if zfs_ready != "zfs-fuse":
        pytest.skip("not on this ZFS: the fallback path is checked against zfs-fuse")
    f = ff.parse_zfs_features(zfs_fuse_usage())
    assert f == ff.ZfsFeatures()     # none of the modern features
    assert ff.listing_args("t/s", f)[5] == \
        "guid,userrefs,readonly,flocker:role,flocker:divergence"
    assert ff.build_recv_argv("t/r", f.resumable) == ["zfs", "recv", "-u", "t/r"]
    assert ff.destroy_commands("t/s", ["a", "b"], False, f) == [
        ["destroy", "t/s@a"], ["destroy", "t/s@b"]]
    modern = ff.parse_zfs_features(OPENZFS_2_1_USAGE)
    assert ff.usable_send_flags(("-c",), modern, f) == []


def test_receive_never_forces_or_rolls_back():
    """The program has no code path that forces a receive, rolls back or
    destroys a dataset: the only destroy is of snapshots retention chose."""
    for resumable in (False, True):
        assert "-F" not in ff.build_recv_argv("t/r", resumable)
    source = open(bedmod.PROGRAM).read()
    assert "rollback" not in re.sub(r'"[^"\n]*"', '""', source)  # only in messages
    assert '"-F"' not in source and "'-F'" not in source
    # every place that destroys, by function, each with the test that shows
    # it cannot destroy data that exists nowhere else:
    #   destroy_commands: retention (test_retention_* here; never a snapshot
    #     a clone depends on: test_retention_skips_snapshots_pinned_by_clones_silently;
    #     never one the slave may hold unconfirmed:
    #     test_sent_but_unconfirmed_snapshot_is_kept_until_the_slave_is_seen)
    #   _snapshot_if_changed: the snapshot it just took, only when its stream
    #     from the previous one is empty, i.e. it holds nothing that one does
    #     not (test_stream_is_empty; the no-change cycle of
    #     test_full_incremental_catchup_and_status); with recursive = yes, -r,
    #     only when that holds in every dataset of the tree
    #     (test_recursive_cycle_snapshots_only_when_the_tree_changed)
    #   _drop_empty_leftover: what a crash left of the same (test_failover.py::
    #     test_drop_empty_leftover_destroys_only_an_empty_unheld_newest_snapshot)
    #   _drop_empty_divergence: a losing side's snapshots after the common
    #     one, only when they carry no change, and only flocker-named ones
    #     (test_divergence.py::
    #     test_drop_empty_divergence_destroys_only_changeless_snapshots,
    #     test_drop_empty_divergence_never_destroys_a_foreign_snapshot,
    #     test_foreign_snapshot_on_the_slave_is_no_split_brain_and_is_kept;
    #     with recursive = yes, -r, only when no child changed either:
    #     test_drop_empty_divergence_counts_child_changes_with_recursive)
    #   discard_preserved: the operator's discard (test_preserve.py::
    #     test_discard_preserved_destroys_only_what_was_recorded,
    #     test_discard_preserved_refuses_a_dataset_with_unrecorded_children,
    #     test_promoted_loser_serves_its_own_path_and_the_copy_stays_aside)
    #   _gate_zfs_destroy: the ssh gate passes on the master's retention
    #     destroys of flocker replication snapshots, and nothing else
    #     (test_gate.py)
    def sites(pattern):
        return [re.findall(r"^\s*def (\w+)", source[:m.start()], re.M)[-1]
                for m in re.finditer(pattern, source)]

    assert sites(r'"destroy"') == ["destroy_commands", "destroy_commands",
                                   "_gate_zfs_destroy", "_snapshot_if_changed",
                                   "_drop_empty_leftover", "discard_preserved",
                                   "_drop_empty_divergence"]
    # zfs recv -A: only the partial state of an interrupted resumable
    # receive, part of a stream whose whole exists on its sender
    # (test_abort_partial_receive_discards_only_the_partial_stream), called
    # by a promotion and after a receive that failed for a full pool
    # (test_target_pool_full)
    # (the ssh gate passes on the same request for its own dataset;
    # kill_receives names "-A" only to leave such a 'zfs recv -A' alone);
    # _drop_child_partials: with recursive = yes, the partial receive a
    # package stream cut inside a child of the replica left there, sent
    # again at once (test_recursive_transfer_cut_inside_a_child_continues,
    # on OpenZFS; every complete snapshot stays)
    assert sites(r'"-A"') == ["abort_partial_receive", "_gate_zfs_recv", "_gate_zfs_recv",
                              "kill_receives", "_drop_child_partials"]
    assert sites(r"\.abort_partial_receive\(") == ["_discard_unresumable", "_promote_steps",
                                                    "_stop_receives"]


def test_abort_partial_receive_discards_only_the_partial_stream(pool):
    """zfs recv -A (OpenZFS) removes what an interrupted resumable receive
    kept, never a complete snapshot, the data of the newest one or a
    dataset without partial state.  zfs-fuse keeps nothing of an interrupted
    receive, and nothing is run there."""
    p = pool.name
    src, dst, mine = p + "/src", p + "/dst", p + "/mine"
    for ds in (src, mine):
        bedmod.sh(["zfs", "create", ds])
        with open(os.path.join(pool.mountpoint, ds.split("/", 1)[1], "one.bin"), "wb") as f:
            f.write(os.urandom(200000))
    bedmod.sh(["zfs", "snapshot", src + "@s1"])
    at_s1 = bedmod.tree_digest(os.path.join(pool.mountpoint, "src"))
    bedmod.zfs_pipe([src + "@s1"], ["-u", dst])
    with open(os.path.join(pool.mountpoint, "src", "two.bin"), "wb") as f:
        f.write(os.urandom(4 << 20))
    bedmod.sh(["zfs", "snapshot", src + "@s2"])
    stream = subprocess.run(["zfs", "send", "-i", "s1", src + "@s2"], check=True,
                            stdout=subprocess.PIPE).stdout
    z = ff.Zfs()
    resumable = z.features().resumable
    half = subprocess.run(["zfs", "recv", "-u"] + (["-s"] if resumable else []) + [dst],
                          input=stream[:len(stream) // 2], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    assert half.returncode != 0
    before = snaps(dst)
    mine_before = bedmod.tree_digest(os.path.join(pool.mountpoint, "mine"))
    ran = []
    real_run = z.run
    z.run = lambda args, **kw: ran.append(list(args)) or real_run(args, **kw)

    assert z.abort_partial_receive(mine) is False      # no partial state: untouched
    assert bedmod.tree_digest(os.path.join(pool.mountpoint, "mine")) == mine_before
    if resumable:      # OpenZFS kept the half stream, named by a token
        assert prop(dst, "receive_resume_token") not in ("", "-")
        assert z.abort_partial_receive(dst) is True
        assert ["recv", "-A", dst] in ran
        assert prop(dst, "receive_resume_token") == "-"
        assert z.abort_partial_receive(dst) is False    # nothing left to discard
    else:              # zfs-fuse kept nothing; abort runs no zfs command
        assert z.abort_partial_receive(dst) is False and ran == []
    assert snaps(dst) == before == {"s1": (snaps(src)["s1"][0], 0)}
    bedmod.sh(["zfs", "mount", dst])
    assert bedmod.tree_digest(os.path.join(pool.mountpoint, "dst")) == at_s1
    # the first receive of a dataset, interrupted: what it kept is only a
    # part of the sender's stream, and goes entirely
    first = p + "/first"
    whole = subprocess.run(["zfs", "send", src + "@s2"], check=True,
                           stdout=subprocess.PIPE).stdout
    half = subprocess.run(["zfs", "recv", "-u"] + (["-s"] if resumable else []) + [first],
                          input=whole[:len(whole) // 2], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    assert half.returncode != 0
    assert z.abort_partial_receive(first) is resumable
    assert snaps(first) is None


def snap(name, guid, refs=0, order=None):
    return ff.Snap(name=name, guid=guid, userrefs=refs, order=order or int(guid))


def listing(*snaps, **props):
    return ff.Listing("p/d", dict(props), tuple(snaps))


def test_find_common_goes_by_guid_not_name():
    local = listing(snap("a", "1"), snap("b", "2"), snap("c", "3"))
    remote = listing(snap("a", "1"), snap("b-renamed", "2"), snap("c", "99"))
    assert ff.find_common(local, remote).name == "b"
    assert ff.find_common(local, listing(snap("c", "98"))) is None
    assert [s.name for s in ff.snaps_after(remote, "2")] == ["c"]


def test_plan_prune_keeps_newest_protected_held_and_foreign():
    names = ["flocker-1-20260101T00000%d.000Z" % i for i in range(6)]
    snaps = [snap(n, str(i + 1)) for i, n in enumerate(names)]
    snaps[1] = snap(names[1], "2", refs=1)            # held
    snaps.insert(3, snap("users-own", "50", order=3))  # not ours
    assert ff.plan_prune(snaps, 2, [names[0]]) == [names[2], names[3]]
    # keep=1: everything old goes except the protected and the held one
    assert ff.plan_prune(snaps, 1, []) == [names[0], names[2], names[3], names[4]]
    assert ff.plan_prune(snaps, 10, []) == []


def test_plan_prune_never_a_snapshot_a_clone_depends_on():
    """The listing's 'clones' (OpenZFS) marks a snapshot pinned: retention
    never plans it (a multi-snapshot destroy would fail as a whole)."""
    names = ["flocker-1-20260101T00000%d.000Z" % i for i in range(4)]
    text = "".join("p/d@%s\tguid\t%d\np/d@%s\tuserrefs\t0\np/d@%s\tclones\t%s\n"
                   % (n, i + 1, n, n, "p/d-diverged-1-x" if i == 1 else "")
                   for i, n in enumerate(names))
    got = ff.parse_listing(text, "p/d")
    assert [s.pinned for s in got.snaps] == [False, True, False, False]
    assert ff.plan_prune(got.snaps, 1, []) == [names[0], names[2]]


def test_together_waits_for_both_and_raises_this_sides_error_first():
    """A cycle's two sides at once: both results; an error only once both
    ended (nothing of a failed cycle still runs), this side's before the
    helper's (the order the two had one after the other)."""
    import threading
    started = threading.Event()

    def slow():
        assert started.wait(10)          # runs while here() runs
        time.sleep(0.05)
        return "there"

    def here():
        started.set()
        return "here"
    assert ff._together(here, slow) == ("here", "there")
    ended = []

    def fails_later():
        time.sleep(0.05)
        ended.append("there")
        raise ff.SshError("peer")

    def fails_now():
        raise ff.ZfsError("local")
    with pytest.raises(ff.ZfsError):
        ff._together(fails_now, fails_later)
    assert ended == ["there"]            # raised only after the helper ended
    with pytest.raises(ff.SshError):
        ff._together(lambda: 1, fails_later)


class _FakeZfs(ff.ZfsBase):
    """Retention's view of one side: listings from a list, commands recorded."""

    def __init__(self, where, listings, log):
        self.where, self._listings, self.log = where, list(listings), log

    def features(self):
        return ff.ZfsFeatures()

    def listing(self, dataset):
        self.log.append((self.where, "listing"))
        return self._listings.pop(0)

    def run(self, args, check=True):
        self.log.append((self.where, " ".join(args)))
        return subprocess.CompletedProcess(args, 0, "", "")


def test_retention_lists_again_only_when_it_could_destroy_and_spares_the_common():
    """After the holds moved, this master lists itself again for retention
    only when the snapshot count could let it destroy one (a hold never
    adds one); when it does, it destroys by that fresh listing, the slave
    first, never the common snapshot (the target), anything after it, or
    a snapshot held there."""
    import types
    n = ["flocker-1-20260101T00000%d.000Z" % i for i in range(4)]
    cfg = types.SimpleNamespace(local=types.SimpleNamespace(dataset="p/d"),
                                peer=types.SimpleNamespace(dataset="q/r"),
                                recursive=False, snapshot_keep=10)
    store = types.SimpleNamespace(preserved=lambda: [])
    # n[2]: the new common snapshot (held now); n[1]: the old one, released
    # just now; n[3]: taken after it (not yet on the slave)
    local = ff.Listing("p/d", {}, (snap(n[0], "1"), snap(n[1], "2", refs=1),
                                   snap(n[2], "3"), snap(n[3], "4")))
    after = ff.Listing("q/r", {}, (snap(n[0], "1"), snap(n[1], "2", refs=1),
                                   snap(n[2], "3")))
    target = local.snaps[2]
    log = []
    zfs, peer = _FakeZfs("here", [], log), _FakeZfs("there", [], log)
    assert ff._retention(cfg, store, zfs, peer, local, target, after, True) == ([], [])
    assert log == []                     # 4 snapshots, keep 10: nothing to list or destroy

    cfg.snapshot_keep = 1
    fresh = ff.Listing("p/d", {}, (snap(n[0], "1", refs=1),    # held here meanwhile
                                   snap(n[1], "2"), snap(n[2], "3", refs=1),
                                   snap(n[3], "4")))
    zfs = _FakeZfs("here", [fresh], log)
    got = ff._retention(cfg, store, zfs, peer, local, target, after, True)
    assert got == ([n[0]], [n[1]])
    destroyed = [entry for entry in log if entry[1].startswith("destroy")]
    assert destroyed == [("there", "destroy q/r@" + n[0]), ("here", "destroy p/d@" + n[1])]
    assert ("here", "listing") in log
    for _, cmd in destroyed:
        assert n[2] not in cmd and n[3] not in cmd     # the common one and what follows


def test_snapshot_names():
    now = 1767225600.25   # 2026-01-01T00:00:00.25Z
    name = ff.snapshot_name(7, now)
    assert name == "flocker-7-20260101T000000.250Z"
    assert ff.is_flocker_snapshot(name) and ff.snapshot_time(name) == now
    assert ff.is_flocker_snapshot(name + "-2")
    assert not ff.is_flocker_snapshot("flocker-x-1") and ff.snapshot_time("mine") is None


def test_role_marker():
    assert ff.parse_role_marker(ff.role_marker("beta", "master", 4)) == ("beta", "master", 4)
    for bad in (None, "-", "", "beta boss 1", "beta master x", "a b c d"):
        assert ff.parse_role_marker(bad) is None


def test_stream_is_empty():
    rec = bytearray(312)
    end = bytearray(312)
    end[0:4] = (5).to_bytes(4, "little")
    assert ff.stream_is_empty(bytes(rec + end))
    assert not ff.stream_is_empty(bytes(rec + end + rec))
    write = bytearray(312)
    write[0:4] = (3).to_bytes(4, "little")
    assert not ff.stream_is_empty(bytes(rec + write))


def test_emptiness_check_reads_no_more_of_the_stream_than_it_needs(pool):
    """Without 'written' (zfs-fuse) every cycle asks whether its new snapshot
    holds anything: an empty incremental stream is exactly 624 bytes, so the
    answer never needs more than that. It used to read the whole stream
    into memory (subprocess.run): a cycle after a 10 GB write held 10 GB,
    and in the fault campaign the daemons' RSS grew with each one."""
    import tracemalloc
    p = pool.name
    ds = p + "/big"
    bedmod.sh(["zfs", "create", ds])
    bedmod.sh(["zfs", "snapshot", ds + "@a"])
    with open(os.path.join(pool.mountpoint, "big", "data.bin"), "wb") as f:
        for _ in range(24):
            f.write(os.urandom(1 << 20))
    bedmod.sh(["zfs", "snapshot", ds + "@b"])
    bedmod.sh(["zfs", "snapshot", ds + "@c"])
    z = ff.Zfs()
    tracemalloc.start()
    try:
        assert not z.send_stream_is_empty(ds, "a", "b")
        held = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert held < 4 << 20, "%d bytes held to look at a 24 MiB stream" % held
    assert z.send_stream_is_empty(ds, "b", "c")
    # an error is "not empty": the cycle keeps its snapshot
    assert not z.send_stream_is_empty(ds, "a", "nosuch")


def test_send_argv():
    assert ff.build_send_argv("t/s", "n", None, False) == ["zfs", "send", "t/s@n"]
    assert ff.build_send_argv("t/s", "n", "b", True, ["-c"]) == [
        "zfs", "send", "-c", "-R", "-I", "t/s@b", "t/s@n"]


def test_explain_transfer_names_each_end():
    o = ff.TransferOutcome(100, 1.0, -9, -9, "", "")
    msg = ff.explain_transfer(o, "t/s@n", "beta", "u/r", 60)
    assert "killed by signal 9" in msg and "Nothing was changed" in msg
    o = ff.TransferOutcome(5, 1.0, 0, 1, "", "Defaulting to 4K blocksize\ncannot "
                           "receive new filesystem stream: out of space\n")
    msg = ff.explain_transfer(o, "t/s@n", "beta", "u/r", 60)
    assert "is full" in msg and "exited 1: cannot receive" in msg and "4K" not in msg
    o = ff.TransferOutcome(0, 9.0, -9, -9, "", "", stalled=True)
    assert "no data moved for 2 s" in ff.explain_transfer(o, "x", "beta", "u/r", 2)


def test_replication_status_lag_and_pending():
    ok = {"snapshot": "flocker-1-20260101T000000.000Z", "guid": "2", "started": 4.0,
          "finished": 5.0, "result": "ok"}
    failed = {"error": "boom", "finished": 9.0, "result": "failed", "id": 2}
    ok["id"] = 1
    local = listing(snap("flocker-1-20260101T000000.000Z", "2"),
                    snap("flocker-1-20260101T000010.000Z", "3"),
                    snap("mine", "4"))
    r = ff.replication_status({"last_ok": ok, "last_failed": failed, "last": failed},
                              "master", local, 1767225630.0)
    assert r == {"slave_newest_snapshot": ok["snapshot"], "lag_seconds": 30.0,
                 "last_ok_at": 5.0, "last_ok_started": 4.0, "pending": 1,
                 "last_result": "failed",
                 "last_error": "boom", "last_error_at": 9.0}
    none = {"last_ok": None, "last_failed": None, "last": None}
    r = ff.replication_status(none, "slave", local, 1767225630.0)
    assert r["slave_newest_snapshot"] == "flocker-1-20260101T000010.000Z"
    assert r["lag_seconds"] == 20.0 and r["pending"] is None


class FakeZfs(ff.ZfsBase):
    """Records commands; answers from a listing (for the modern-path logic
    that zfs-fuse cannot exercise)."""

    def __init__(self, features, listing):
        self._features = features
        self.list_result = listing
        self.commands = []

    stdout = ""

    def run(self, args, check=True):
        self.commands.append(list(args))
        return subprocess.CompletedProcess(args, 0, self.stdout, "")

    def listing(self, dataset):
        return self.list_result

    settled = True

    def settle(self, pool):
        self.commands.append(["(zpool sync)", pool])
        return self.settled

    def written(self, dataset):
        return self.list_result.props.get("written")


def test_written_is_trusted_only_after_the_pool_committed():
    """OpenZFS updates 'written' when a transaction group commits: a write
    of the last seconds reads as 0 (seen on OpenZFS 2.3.2: a sync right
    after a write skipped it).  Without a successful zpool sync, snapshot."""
    modern = ff.parse_zfs_features(OPENZFS_2_1_USAGE)
    cfg = ff.Config(path="x", name="c", secret_file="s", secret=b"")
    unchanged = ff.Listing("p/d", {"written": "0"}, (snap("a", "1"),))
    z = FakeZfs(modern, unchanged)
    z.settled = False
    with pytest.raises(ff.ReplicationError):     # the fake lists no new snapshot
        ff._snapshot_if_changed(cfg, z, unchanged, 1, time.time)
    assert z.commands[0] == ["(zpool sync)", "p"] and z.commands[1][0] == "snapshot"


def test_written_property_skips_the_snapshot():
    modern = ff.parse_zfs_features(OPENZFS_2_1_USAGE)
    cfg = ff.Config(path="x", name="c", secret_file="s", secret=b"")
    unchanged = ff.Listing("p/d", {"written": "0"}, (snap("a", "1"),))
    z = FakeZfs(modern, unchanged)
    assert ff._snapshot_if_changed(cfg, z, unchanged, 1, time.time) is unchanged
    assert z.commands == [["(zpool sync)", "p"]]        # and nothing else
    changed = ff.Listing("p/d", {"written": "4096"}, (snap("a", "1"),))
    z = FakeZfs(modern, changed)
    with pytest.raises(ff.ReplicationError):   # the fake lists no new snapshot
        ff._snapshot_if_changed(cfg, z, changed, 1, time.time)
    assert z.commands[1][0] == "snapshot"
    # with child datasets: the written of every dataset of the tree
    rec = ff.replace(cfg, recursive=True)
    tree = ["get", "-H", "-p", "-o", "value", "-r", "-t", "filesystem,volume", "written",
            "p/d"]
    z = FakeZfs(modern, unchanged)
    z.stdout = "0\n0\n0\n"
    assert ff._snapshot_if_changed(rec, z, unchanged, 1, time.time) is unchanged
    assert z.commands == [["(zpool sync)", "p"], tree]
    z = FakeZfs(modern, unchanged)
    z.stdout = "0\n8192\n0\n"                   # the top unchanged, a child written
    with pytest.raises(ff.ReplicationError):
        ff._snapshot_if_changed(rec, z, unchanged, 1, time.time)
    assert z.commands[1] == tree and z.commands[2][:2] == ["snapshot", "-r"]


def test_openzfs_features_for_real(pool):
    """What the fakes above simulate, on a real OpenZFS: the features are
    detected from the real zfs; 'written' reads 0 after zpool sync when
    nothing changed, and then no snapshot is taken; listings are ordered by
    createtxg, not by name; one destroy removes several snapshots."""
    z = ff.Zfs()
    f = z.features()
    if not f.written:
        pytest.skip("not on this ZFS: zfs-fuse has no 'written', 'createtxg' or "
                    "multi-snapshot destroy (its fallbacks run in the cycles below)")
    assert f.resumable and f.createtxg and f.destroy_multi and f.list_parsable
    ds = pool.name + "/w"
    bedmod.sh(["zfs", "create", ds])
    path = os.path.join(pool.mountpoint, "w", "f.bin")
    for name in ("b", "a"):                 # created b first, a second
        with open(path, "wb") as fh:
            fh.write(os.urandom(100000))
        bedmod.sh(["zfs", "snapshot", "%s@%s" % (ds, name)])
    listing = z.listing(ds)
    assert [s.name for s in listing.snaps] == ["b", "a"]
    assert z.settle(pool.name) and z.written(ds) == "0"

    ran = []
    real_run = z.run
    z.run = lambda args, **kw: ran.append(list(args)) or real_run(args, **kw)
    cfg = ff.Config(path="x", name="c", secret_file="s", secret=b"")
    assert ff._snapshot_if_changed(cfg, z, listing, 1, time.time) is listing
    assert [a for a in ran if a[0] == "snapshot"] == []          # nothing changed
    with open(path, "ab") as fh:
        fh.write(b"more")
    assert z.settle(pool.name) and int(z.written(ds)) > 0
    fresh = ff._snapshot_if_changed(cfg, z, listing, 1, time.time)
    assert [a[0] for a in ran].count("snapshot") == 1
    assert [s.name for s in fresh.snaps][:2] == ["b", "a"] and len(fresh.snaps) == 3

    cmds = ff.destroy_commands(ds, ["b", "a"], False, f)
    assert cmds == [["destroy", "%s@b,a" % ds]]
    assert z.run_many(cmds)[0][0] == 0
    assert [s.name for s in z.listing(ds).snaps] == [fresh.snaps[-1].name]


# ---------------------------------------------------------------------------
# the real thing
# ---------------------------------------------------------------------------


def rows(bed):
    conn = sqlite3.connect(bed.a.state_db)
    try:
        return [dict(zip(("base", "snapshot", "guid", "bytes", "result", "error"), r))
                for r in conn.execute("SELECT base, snapshot, guid, bytes, result, error "
                                      "FROM replications ORDER BY id")]
    finally:
        conn.close()


def status(h):
    p = h.flocker("status", "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def unchanged_since(bed, before_a, before_b, digest_b=None, new_pending_ok=False):
    """Both sides as before: the slave exactly; the master keeps every
    snapshot (same GUID and holds), plus at most the cycle's pending one."""
    after_a, after_b = snaps(bed.a.dataset), snaps(bed.b.dataset)
    assert after_b == before_b
    extra = set(after_a) - set(before_a)
    for name, (guid, refs) in before_a.items():
        # zfs-fuse leaks the temporary holds of a zfs send killed with -9
        # (OpenZFS drops them): more holds, never fewer
        assert after_a[name][0] == guid and after_a[name][1] >= refs
    assert len(extra) <= (1 if new_pending_ok else 0), extra
    if digest_b is not None:
        assert slave_digest(bed) == digest_b


def test_full_incremental_catchup_and_status(bed):
    prepare(bed)
    a, b = bed.a, bed.b
    write(bed, "one.bin", 300000)
    os.makedirs(os.path.join(mnt(a), "sub"))
    write(bed, "sub/two.txt", 1000)
    p = ok(sync(bed))
    assert "full copy" in p.stdout
    first = rows(bed)[-1]
    assert first["base"] is None and first["result"] == "ok" and first["bytes"] > 300000
    assert slave_digest(bed) == master_digest(bed)
    assert prop(b.dataset, "readonly") == "on" and prop(b.dataset, "mounted") == "no"
    sa, sb = snaps(a.dataset), snaps(b.dataset)
    assert sa[first["snapshot"]] == sb[first["snapshot"]] == (first["guid"], 1)  # held

    # nothing changed: no snapshot, nothing sent, still one held common snapshot
    ok(sync(bed))
    assert snaps(a.dataset) == sa and snaps(b.dataset) == sb
    assert rows(bed)[-1]["bytes"] == 0

    # incremental
    write(bed, "one.bin", 300000)
    p = ok(sync(bed))
    second = rows(bed)[-1]
    assert second["base"] == first["snapshot"] and "incremental" not in p.stderr
    assert 0 < second["bytes"] < 1000000
    assert slave_digest(bed) == master_digest(bed)
    sa = snaps(a.dataset)
    assert sa[first["snapshot"]][1] == 0 and sa[second["snapshot"]][1] == 1

    # the peer is away for three cycles: each snapshots, none can send
    before_b, digest_b = snaps(b.dataset), slave_digest(bed)
    bed.cut_link()
    try:
        for i in range(3):
            write(bed, "away%d.bin" % i, 100000)
            fails(sync(bed), ff.EXIT_SSH, "cannot reach node beta")
    finally:
        bed.restore_link()
    assert snaps(b.dataset) == before_b and slave_digest(bed) == digest_b
    st = status(a)["replication"]
    assert st["pending"] == 3 and "cannot reach node beta" in st["last_error"]
    assert st["slave_newest_snapshot"] == second["snapshot"]
    text = a.flocker("status").stdout
    assert "3 pending here" in text and "repl error" in text

    # one cycle, one -I stream, brings all three
    p = ok(sync(bed))
    last = rows(bed)[-1]
    assert last["base"] == second["snapshot"]
    pending = [n for n in snaps(a.dataset) if n > second["snapshot"]]
    assert len(pending) == 3 and all(n in p.stdout for n in pending)
    assert set(pending) <= set(snaps(b.dataset))
    assert slave_digest(bed) == master_digest(bed)
    st = status(a)["replication"]
    assert st["pending"] == 0 and st["last_error"] is None and st["last_result"] == "ok"
    assert 0 <= st["lag_seconds"] < 120
    sb = status(b)["replication"]
    assert sb["slave_newest_snapshot"] == last["snapshot"] and sb["pending"] is None

    # sync refuses on the slave, and while another process holds the lock
    fails(b.flocker("sync"), ff.EXIT_REPLICATION, "is slave", "run sync on alpha")
    with ff.StateStore.open(a.state_db, lock_for="test holds it"):
        fails(sync(bed), ff.EXIT_BUSY, "in use by another flocker-failover process",
              "test holds it")


def test_wrong_host_key_then_fixed(bed):
    prepare(bed)
    bad = os.path.join(bed.workdir, "ssh", "wrong_known_hosts")
    key = os.path.join(bed.workdir, "ssh", "impostor")
    bedmod.sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    with open(key + ".pub") as f, open(bad, "w") as out:
        out.write("%s %s\n" % (bed.b.address, " ".join(f.read().split()[:2])))
    write(bed, "x.bin", 10000)
    prepare(bed, cluster={"ssh_known_hosts": bad}, init=False)
    fails(sync(bed), ff.EXIT_SSH, "host key of node beta", bad, "do not proceed")
    assert snaps(bed.b.dataset) is None
    prepare(bed, init=False)
    ok(sync(bed))
    assert slave_digest(bed) == master_digest(bed)


def test_peer_pool_or_parent_missing(bed):
    prepare(bed)
    prepare(bed, nodes={"beta": {"dataset": "nosuchpool%d/shop" % os.getpid()}}, init=False)
    write(bed, "x.bin", 10000)
    fails(sync(bed), ff.EXIT_REPLICATION, "pool nosuchpool", "does not exist on beta",
          "nothing was sent")
    missing = bed.b.pool.name + "/no/shop"
    prepare(bed, nodes={"beta": {"dataset": missing}}, init=False)
    fails(sync(bed), ff.EXIT_REPLICATION, "zfs create -p %s/no" % bed.b.pool.name)
    assert snaps(missing) is None and snaps(bed.b.pool.name + "/no") is None


def test_target_pool_full(bed):
    """The slave's pool cannot take the stream.  zfs-fuse keeps nothing of
    the failed receive.  OpenZFS (recv -s) keeps the part received for
    resuming, but a full pool cannot take the rest and that part only holds
    space that freeing needs: it is discarded (zfs recv -A).  On both the
    slave is as before and the message says to free space there."""
    small = bedmod.Pool(bed.workdir, "s", size_mb=64)
    bed.pools.append(small)
    replica = small.name + "/shop"
    prepare(bed, nodes={"beta": {"dataset": replica}})
    write(bed, "big.bin", 90 * 1024 * 1024)
    resumable = ff.Zfs().features().resumable
    err = fails(sync(bed, timeout=300), ff.EXIT_REPLICATION, "is full", "free space there",
                "Nothing was changed")
    assert "zfs recv on beta exited" in err
    if resumable:      # OpenZFS: the part received was kept, and discarded
        assert ("the part of the stream beta received was discarded there (zfs recv -A): "
                "a full pool cannot take the rest") in err
    else:              # zfs-fuse: nothing was kept, nothing to discard
        assert "discarded" not in err and "recv -A" not in err
    assert snaps(replica) is None
    assert bedmod.sh(["zfs", "list", "-H", "-o", "name", "-r", small.name]).stdout.split() \
        == [small.name]
    # once the data fits, the next cycle makes the full copy
    os.unlink(os.path.join(mnt(bed.a), "big.bin"))
    write(bed, "small.bin", 100000)
    assert "full copy" in ok(sync(bed)).stdout
    bedmod.sh(["zfs", "mount", replica])
    assert bedmod.tree_digest(os.path.join(small.mountpoint, "shop")) == master_digest(bed)
    bedmod.sh(["zfs", "unmount", replica])


def _wait_for(fn, timeout=30, what="condition"):
    """fn()'s first true value, waited for up to timeout seconds; what
    (or what() when callable) says what was waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError("timed out waiting for %s" % (what() if callable(what) else what))


def _waiting_for_recv(h):
    """What the wait for h's zfs recv reports when it times out: the
    command lines of the processes running on h."""
    def what():
        lines = []
        for pid in bedmod._netns_pids(h.ns):
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    lines.append("%d %s" % (pid, f.read().replace(b"\0", b" ").decode(
                        "utf-8", "replace")[:200]))
            except OSError:
                pass
        return "zfs recv on %s; its processes:\n%s" % (h.name, "\n".join(lines))
    return what


def _slow_link(bed, rate="16mbit"):
    bedmod.sh(["tc", "-n", bed.a.ns, "qdisc", "add", "dev", "eth0", "root", "tbf",
               "rate", rate, "burst", "32kbit", "latency", "400ms"])


def _sync_in_background(bed):
    return bed.a.popen([bedmod.sys.executable, bedmod.PROGRAM, "--config",
                        bed.config_path, "--node", "alpha", "sync"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)


def _settled(bed):
    """No zfs recv of this bed is still running (the peer finished aborting)."""
    return not pids_of(["zfs", "recv"], bed.b.dataset)


def _freeze_sender_mid_stream(bed):
    """Start a sync of a large increment over a slow link and freeze its
    zfs send once the stream reached the peer: a deterministic mid-stream."""
    write(bed, "big.bin", 16 * 1024 * 1024)
    _slow_link(bed, "8mbit")       # 16 MB at 1 MB/s: far from done when frozen
    proc = _sync_in_background(bed)
    try:
        # the receive first: before it, a short 'zfs send -i' may run that
        # only checks whether the new snapshot is empty (zfs-fuse)
        _wait_for(lambda: pids_of(["zfs", "recv"], bed.b.dataset),
                  timeout=max(30, bedmod.scaled(5)), what=_waiting_for_recv(bed.b))
        send = _wait_for(lambda: pids_of(["zfs", "send"], bed.a.dataset),
                         what="zfs send")[0]
        time.sleep(0.3)
        os.kill(send, signal.SIGSTOP)
        assert bedmod._pid_alive(send), "the sender finished before it was frozen"
    except BaseException:
        proc.kill()
        raise
    return proc, send


def test_sender_killed_mid_stream_then_retried(bed):
    prepare(bed)
    write(bed, "base.bin", 50000)
    ok(sync(bed))
    before_a, before_b, digest_b = snaps(bed.a.dataset), snaps(bed.b.dataset), slave_digest(bed)
    proc, send = _freeze_sender_mid_stream(bed)
    try:
        os.kill(send, signal.SIGKILL)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == ff.EXIT_REPLICATION, err
    assert "zfs send was killed by signal 9" in err and "Nothing was changed" in err
    _wait_for(lambda: _settled(bed), what="the peer's zfs recv to end")
    unchanged_since(bed, before_a, before_b, digest_b, new_pending_ok=True)
    assert rows(bed)[-1]["result"] == "failed"
    bedmod.sh(["tc", "-n", bed.a.ns, "qdisc", "del", "dev", "eth0", "root"])
    assert snaps(bed.b.dataset) == before_b     # nothing arrives late either
    ok(sync(bed))
    assert slave_digest(bed) == master_digest(bed)


def test_interrupted_transfer_resumes_from_its_token(bed):
    """kill -9 of zfs send when half the stream has reached the slave.
    OpenZFS (recv -s) keeps what arrived, and the next cycle resumes from
    the receive_resume_token, sending measurably less than the whole stream
    again.  zfs-fuse has no resume tokens: the next cycle sends the whole
    increment again.  The same files on both sides at the end."""
    prepare(bed)
    a, b = bed.a, bed.b
    write(bed, "base.bin", 50000)
    ok(sync(bed))
    first = rows(bed)[-1]["snapshot"]
    resumable = ff.Zfs().features().resumable
    size = 16 << 20
    write(bed, "big.bin", size)
    bed.throttle(a, 8)                 # 1 MB/s: the stream is on the wire for ~16 s
    try:
        rx = link_bytes(b, 0)
        proc = _sync_in_background(bed)
        try:
            _wait_for(lambda: pids_of(["zfs", "recv"], b.dataset),
                      timeout=max(30, bedmod.scaled(5)), what=_waiting_for_recv(b))
            send = _wait_for(lambda: pids_of(["zfs", "send"], a.dataset), what="zfs send")
            _wait_for(lambda: link_bytes(b, 0) - rx > size // 2, timeout=60,
                      what="half the stream to reach beta")
            os.kill(send[0], signal.SIGKILL)
            out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        bed.throttle(a, None)
    assert proc.returncode == ff.EXIT_REPLICATION, err
    assert "zfs send was killed by signal 9" in err
    _wait_for(lambda: _settled(bed), what="the peer's zfs recv to end")
    pending = rows(bed)[-1]["snapshot"]
    assert pending not in snaps(b.dataset)
    full = len(subprocess.run(["zfs", "send", "-I", "%s@%s" % (a.dataset, first),
                               "%s@%s" % (a.dataset, pending)], check=True,
                              stdout=subprocess.PIPE).stdout)
    token = prop(b.dataset, "receive_resume_token") if resumable else None

    tx = link_bytes(a, 8)
    p = ok(sync(bed))
    tx = link_bytes(a, 8) - tx
    row = rows(bed)[-1]
    print("%s: whole stream %d bytes; the next cycle sent %d bytes (%.2f of it), "
          "%d bytes on the wire: %s" % ("OpenZFS" if resumable else "zfs-fuse", full,
                                        row["bytes"], row["bytes"] / full, tx,
                                        p.stdout.strip()))
    if resumable:      # resumed from the token: only what had not arrived
        assert token not in ("", "-")
        assert "resumed the interrupted transfer of %s" % pending in p.stdout
        assert 0 < row["bytes"] < 0.8 * full and tx < 0.8 * full
        assert prop(b.dataset, "receive_resume_token") == "-"
    else:              # no token: the whole increment again
        assert "sent %s" % pending in p.stdout and row["base"] == first
        assert row["bytes"] == full and tx > full
    assert row["result"] == "ok" and row["snapshot"] == pending
    sa, sb = snaps(a.dataset), snaps(b.dataset)
    # same GUID, held on both (zfs-fuse leaks the hold of the killed zfs send)
    assert sa[pending][0] == sb[pending][0] and sa[pending][1] >= 1 and sb[pending][1] == 1
    assert slave_digest(bed) == master_digest(bed)


def _sshd_feeding(pid):
    """The sshd process whose connection feeds pid: pid's nearest ancestor
    that is an sshd (the session's, which moves the channel's bytes; not
    the listener, further up), found by the parent chain in /proc, not by
    process titles; None when there is none (any more)."""
    for _ in range(20):
        try:
            with open("/proc/%d/stat" % pid) as f:
                stat = f.read()
        except OSError:
            return None
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm in ("sshd", "sshd-session"):
            return pid
        pid = int(stat[stat.rindex(")") + 2:].split()[1])
        if pid <= 1:
            return None
    return None


def test_stalled_transfer_is_killed(bed):
    """The peer hangs mid-stream (the sshd session that feeds its zfs recv
    frozen): once the buffers between the hosts are full no byte moves, and
    the watchdog ends the transfer.  (Freezing zfs recv would not do:
    zfs-fuse's daemon does the reading.)  The session is found from zfs
    recv up its parents, not by sshd's process titles."""
    prepare(bed, cluster={"transfer_stall_timeout": "2"})
    write(bed, "base.bin", 50000)
    ok(sync(bed))
    before_a, before_b, digest_b = snaps(bed.a.dataset), snaps(bed.b.dataset), slave_digest(bed)
    write(bed, "big.bin", 40 * 1024 * 1024)   # more than pipes, ssh and TCP buffer
    proc = _sync_in_background(bed)
    frozen = []
    try:
        recv = _wait_for(lambda: pids_of(["zfs", "recv"], bed.b.dataset),
                         timeout=max(30, bedmod.scaled(5)), what=_waiting_for_recv(bed.b))
        session = _wait_for(lambda: _sshd_feeding(recv[0]),
                            what="the sshd session feeding zfs recv (pid %d)" % recv[0])
        frozen = [session]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=90)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert proc.returncode == ff.EXIT_REPLICATION, err
    assert "no data moved for 2 s" in err and "Nothing was changed" in err
    assert waited < 30
    _wait_for(lambda: _settled(bed), what="the peer's zfs recv to end")
    unchanged_since(bed, before_a, before_b, digest_b, new_pending_ok=True)
    ok(sync(bed))
    assert slave_digest(bed) == master_digest(bed)


def test_slave_replica_modified_is_reported_not_rolled_back(bed):
    prepare(bed)
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    b = bed.b
    bedmod.sh(["zfs", "set", "readonly=off", b.dataset])
    bedmod.sh(["zfs", "mount", b.dataset])
    with open(os.path.join(mnt(b), "local-change.txt"), "w") as f:
        f.write("written on the slave\n")
    bedmod.sh(["zfs", "unmount", b.dataset])
    before_a, before_b, digest_b = snaps(bed.a.dataset), snaps(b.dataset), slave_digest(bed)
    assert "local-change.txt" in digest_b
    write(bed, "y.bin", 10000)
    fails(sync(bed), ff.EXIT_REPLICATION, "was changed there", "not rolled back",
          "zfs rollback")
    unchanged_since(bed, before_a, before_b, digest_b, new_pending_ok=True)


def test_no_common_snapshot(bed):
    prepare(bed)
    b = bed.b
    bedmod.sh(["zfs", "create", b.dataset])
    fails(sync(bed), ff.EXIT_REPLICATION, "has no snapshot", "zfs rename")
    assert snaps(bed.a.dataset) == {}
    with open(os.path.join(mnt(b), "theirs.txt"), "w") as f:
        f.write("beta's own data\n")
    bedmod.sh(["zfs", "snapshot", b.dataset + "@own"])
    write(bed, "ours.bin", 10000)
    before_b, digest_b = snaps(b.dataset), slave_digest(bed)
    fails(sync(bed), ff.EXIT_REPLICATION, "shares no snapshot", "compared by GUID",
          "nothing was changed")
    assert snaps(bed.a.dataset) == {} and snaps(b.dataset) == before_b
    assert slave_digest(bed) == digest_b


def test_peer_claiming_master_gets_nothing(bed):
    prepare(bed)
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    bedmod.sh(["zfs", "set", "flocker:role=beta master 2", bed.b.dataset])
    write(bed, "y.bin", 10000)
    before_a, before_b = snaps(bed.a.dataset), snaps(bed.b.dataset)
    fails(sync(bed), ff.EXIT_REPLICATION, "beta says it is master", "split brain")
    unchanged_since(bed, before_a, before_b)
    # our own marker, copied to the replica (send -R copies properties),
    # names alpha and is no claim by beta
    bedmod.sh(["zfs", "set", "flocker:role=alpha master 1", bed.b.dataset])
    ok(sync(bed))


def test_retention_keeps_the_common_snapshot_while_the_peer_is_away(bed):
    prepare(bed, cluster={"snapshot_keep": "1"})
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    common = rows(bed)[-1]["snapshot"]
    prepare(bed, cluster={"snapshot_keep": "1"}, nodes={"beta": {"ssh_port": "2222"}},
          init=False)   # the peer's sshd is "down": connection refused
    for i in range(8):
        write(bed, "x%d.bin" % i, 5000)
        fails(sync(bed), ff.EXIT_SSH, "cannot reach node beta")
        sa = snaps(bed.a.dataset)
        assert common in sa and sa[common][1] == 1
        assert len(sa) <= 2, sa                   # capped: the common one + newest
    newest = sorted(sa)[-1]
    prepare(bed, cluster={"snapshot_keep": "1"}, init=False)
    ok(sync(bed))
    assert slave_digest(bed) == master_digest(bed)
    for i in range(3):
        write(bed, "y%d.bin" % i, 5000)
        ok(sync(bed))
        latest = rows(bed)[-1]["snapshot"]
        sa, sb = snaps(bed.a.dataset), snaps(bed.b.dataset)
        assert sa[latest] == sb[latest] and sa[latest][1] == 1
        assert len(sa) <= 2 and len(sb) <= 2, (sa, sb)
    assert newest not in sb


def test_recursive_children_replicate(bed):
    prepare(bed, cluster={"recursive": "yes"})
    kid = bed.a.dataset + "/kid"
    bedmod.sh(["zfs", "create", kid])
    with open(os.path.join(mnt(bed.a, kid), "k.bin"), "wb") as f:
        f.write(os.urandom(20000))
    write(bed, "top.bin", 20000)
    ok(sync(bed))
    with open(os.path.join(mnt(bed.a, kid), "k2.bin"), "wb") as f:
        f.write(os.urandom(20000))
    ok(sync(bed))
    assert snaps(bed.b.dataset + "/kid") == {
        n: (g, r) for n, (g, r) in snaps(kid).items()}
    assert slave_digest(bed, bed.b.dataset + "/kid") == bedmod.tree_digest(
        mnt(bed.a, kid))


def test_recursive_cycle_snapshots_only_when_the_tree_changed(pool):
    """With recursive = yes a cycle (and each look at a divergence that
    waits for the operator) takes its snapshot -r only when the dataset or
    a child changed: none piles up while nothing is written, and one made
    for nothing is destroyed again with -r (its stream from the previous
    one empty in every dataset of the tree)."""
    from conftest import dataset_context
    ds = pool.name + "/d"
    kid = ds + "/kid"
    bedmod.sh(["zfs", "create", ds])
    bedmod.sh(["zfs", "create", kid])
    z = ff.Zfs()
    cfg = dataset_context(ds, z, recursive=True).cfg
    now = [1e9]

    def clock():
        now[0] += 1
        return now[0]
    first = ff._snapshot_if_changed(cfg, z, z.listing(ds), 3, clock)
    assert len(first.snaps) == 1 and list(snaps(kid)) == [first.snaps[0].name]
    for _ in range(3):       # nothing written: no new snapshot anywhere
        assert ff._snapshot_if_changed(cfg, z, first, 3, clock).snaps == first.snaps
    assert list(snaps(ds)) == list(snaps(kid)) == [first.snaps[0].name]
    with open(os.path.join(mnt_of(kid), "k.bin"), "wb") as f:
        f.write(os.urandom(20000))
    after = ff._snapshot_if_changed(cfg, z, first, 3, clock)     # a child changed
    assert len(after.snaps) == 2 and list(snaps(kid)) == [s.name for s in after.snaps]


def mnt_of(ds):
    return prop(ds, "mountpoint")


def test_retention_spares_the_last_replicated_snapshot_even_unheld(bed):
    """Belt and braces: should the hold be gone (an operator released it),
    the snapshot last confirmed on the slave still survives the cap."""
    prepare(bed, cluster={"snapshot_keep": "1"})
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    common = rows(bed)[-1]["snapshot"]
    bedmod.sh(["zfs", "release", "flocker", "%s@%s" % (bed.a.dataset, common)])
    prepare(bed, cluster={"snapshot_keep": "1"}, nodes={"beta": {"ssh_port": "2222"}},
          init=False)
    for i in range(3):
        write(bed, "x%d.bin" % i, 5000)
        fails(sync(bed), ff.EXIT_SSH, "cannot reach node beta", "Connection refused")
    sa = snaps(bed.a.dataset)
    assert common in sa and len(sa) == 2, sa
    prepare(bed, cluster={"snapshot_keep": "1"}, init=False)
    ok(sync(bed))
    assert slave_digest(bed) == master_digest(bed)


def test_slave_with_its_own_newer_snapshot_is_refused_and_kept(bed):
    """History on the slave that the master lacks (a snapshot after the
    common one, even one named like ours) is divergence: refused, and
    retention never touches it."""
    prepare(bed, cluster={"snapshot_keep": "1"})
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    own = "flocker-9-20300101T000000.000Z"
    bedmod.sh(["zfs", "snapshot", "%s@%s" % (bed.b.dataset, own)])
    write(bed, "y.bin", 10000)
    before_a, before_b = snaps(bed.a.dataset), snaps(bed.b.dataset)
    fails(sync(bed), ff.EXIT_REPLICATION, "newer than the newest common snapshot", own,
          "divergence")
    unchanged_since(bed, before_a, before_b)
    assert own in snaps(bed.b.dataset)


def test_connection_is_reused_and_rebuilt_after_its_master_dies(bed):
    """Cycles share one ssh connection; when its master process dies hard,
    the next cycle still works and the one after reuses a new master."""
    prepare(bed)
    write(bed, "x.bin", 10000)
    ok(sync(bed))

    def opens():
        lines = bed.a.run(["cat", "/proc/net/snmp"]).stdout.splitlines()
        tcp = [ln.split() for ln in lines if ln.startswith("Tcp:")]
        return int(tcp[1][tcp[0].index("ActiveOpens")])

    def masters():
        return pids_of(["ssh"], "ControlMaster=yes")

    n = opens()
    for _ in range(3):
        ok(sync(bed))
    assert opens() == n                       # three cycles, no new connection
    mine = [p for p in masters() if p in bedmod._netns_pids(bed.a.ns)]
    assert len(mine) == 1
    os.kill(mine[0], signal.SIGKILL)          # leaves a stale control socket
    ok(sync(bed))
    ok(sync(bed))
    n = opens()
    ok(sync(bed))
    assert opens() == n


CYCLE_SIDES = r"""
import json, sys, threading, time
sys.path.insert(0, %(root)r)
import flocker_failover as ff
cfg = ff.load_config(%(config)r, "alpha")
ran = []                          # (side, zfs words, started, ended)
peer_hold_sent, release_sent = threading.Event(), threading.Event()
waited = {}


class Local(ff.Zfs):
    def run(self, args, check=True, retry_busy=False):
        t = time.monotonic()
        if args[:1] == ["hold"]:    # goes on only if the peer's hold starts meanwhile
            waited["hold"] = peer_hold_sent.wait(20)
        if args[:1] == ["release"]:
            release_sent.set()
        try:
            return super().run(args, check, retry_busy)
        finally:
            ran.append(("here", list(args), t, time.monotonic()))


peer, zfs = ff.peer_zfs(cfg), Local()
real = peer.run


def peer_run(args, check=True):
    t = time.monotonic()
    if args[:1] == ["hold"]:
        peer_hold_sent.set()
    if args[:1] == ["release"]:     # goes on only if this side's release started
        waited["release"] = release_sent.wait(20)
    try:
        return real(args, check)
    finally:
        ran.append(("there", list(args), t, time.monotonic()))


peer.run = peer_run
zfs.features(), peer.features()     # known, as in a daemon's later cycles
del ran[:]
with ff.StateStore.open(cfg.local.state_db, lock_for="test") as store:
    r = ff.replicate_once(cfg, store, zfs, peer)
print(json.dumps({"ran": ran, "waited": waited, "snapshot": r.snapshot,
                  "written": zfs.features().written}))
"""


def test_cycle_holds_on_both_sides_at_once_then_releases(bed):
    """After the transfer, the new common snapshot is held here and on the
    slave at the same time, and only once both holds are in place are the
    old holds released, again both at once; the zfs commands of a cycle
    that sends are these and no more (no second listing for retention when
    it could destroy nothing)."""
    prepare(bed)
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    old = [n for n, (_, refs) in snaps(bed.a.dataset).items() if refs]
    write(bed, "y.bin", 10000)
    code = CYCLE_SIDES % {"root": bedmod.ROOT, "config": bed.config_path}
    out = json.loads(bed.a.run([sys.executable, "-c", code], timeout=120).stdout)
    assert out["waited"] == {"hold": True, "release": True}
    ran = out["ran"]
    holds = [r for r in ran if r[1][0] == "hold"]
    releases = [r for r in ran if r[1][0] == "release"]
    assert len(holds) == 2 and len(releases) == 2
    assert max(r[3] for r in holds) <= min(r[2] for r in releases)
    here = [r[1][0] for r in ran if r[0] == "here"]
    there = [r[1][0] for r in ran if r[0] == "there"]
    assert here == (["get"] if out["written"] else []) + [
        "get", "snapshot", "get", "hold", "release"]
    assert there == ["get", "get", "hold", "release"]
    new = out["snapshot"]
    for ds in (bed.a.dataset, bed.b.dataset):
        refs = {n: r for n, (_, r) in snaps(ds).items()}
        assert refs[new] == 1 and all(refs[n] == 0 for n in old), (ds, refs)


def test_retention_skips_snapshots_pinned_by_clones_silently(bed):
    """A preserved dataset (a clone) pins the snapshot it was cloned from,
    on either node: retention keeps that snapshot and says nothing about
    it, cycle after cycle, and prunes the others as usual."""
    prepare(bed, cluster={"snapshot_keep": "1"})
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    pinned = rows(bed)[-1]["snapshot"]
    # what preservation leaves: the dataset's snapshot with a clone of it
    # (here on both nodes: the master was a loser once, so was the slave)
    for h in bed.hosts:
        bedmod.sh(["zfs", "clone", "%s@%s" % (h.dataset, pinned),
                   h.dataset + "-diverged-2-20260101T000000Z"])
    # alpha recorded its clone as a preserved dataset, as preservation does
    with ff.StateStore.open(bed.a.state_db, lock_for="test") as st:
        st.add_preserved(bed.a.dataset + "-diverged-2-20260101T000000Z", 2,
                         "%s@%s" % (bed.a.dataset, pinned), "test")
    out = []
    for i in range(4):
        write(bed, "y%d.bin" % i, 5000)
        out.append(ok(bed.a.flocker("-vv", "sync", timeout=120)).stderr)
    text = "\n".join(out)
    said = [x for x in text.splitlines() if "WARNING" in x]
    assert said == [], text
    # alpha knows its preserved dataset's origin: it never tries to destroy
    # it; beta's is learnt from the destroy (zfs-fuse has no 'clones') or
    # read from the listing (OpenZFS), and never said above debug
    tried = [x for x in text.splitlines() if "pinned by a clone" in x]
    assert not [x for x in tried if "on this host" in x], tried
    sa, sb = snaps(bed.a.dataset), snaps(bed.b.dataset)
    assert pinned in sa and pinned in sb
    # the pinned one and the newest (the slave also the one released in
    # this cycle, which the next cycle prunes)
    assert len(sa) == 2 and len(sb) <= 3, (sa, sb)
    assert slave_digest(bed) == master_digest(bed)


def test_sent_but_unconfirmed_snapshot_is_kept_until_the_slave_is_seen(bed):
    """The transfer of T' completes, then the cycle ends before it confirms
    and holds T' (here: killed; the same as ssh breaking at that moment).
    While ssh stays down the master keeps snapshotting and pruning, but
    never T': the slave may hold it (it does), and without it on the master
    the slave's T' would look like history the master lacks, a divergence
    that could even win.  Once ssh is back, replication goes on from T'."""
    prepare(bed, cluster={"snapshot_keep": "1"})
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    write(bed, "y.bin", 10000)
    argv = [sys.executable, bedmod.PROGRAM, "--config", bed.config_path, "--node",
            bed.a.name, "sync"]
    p = bed.a.run(argv, check=False, timeout=120,
                  env=dict(os.environ, FLOCKER_FAILPOINT="replicate:sent"))
    assert p.returncode == -9, p.stderr
    sent = rows(bed)[-1]["snapshot"]
    assert sent in snaps(bed.b.dataset) and snaps(bed.b.dataset)[sent][1] == 0   # unheld
    prepare(bed, cluster={"snapshot_keep": "1"}, nodes={"beta": {"ssh_port": "2222"}},
            init=False)   # ssh is down; (the daemon's heartbeats would still flow)
    for i in range(4):
        write(bed, "z%d.bin" % i, 5000)
        fails(sync(bed), ff.EXIT_SSH, "cannot reach node beta")
        assert sent in snaps(bed.a.dataset), i
    prepare(bed, cluster={"snapshot_keep": "1"}, init=False)
    out = ok(sync(bed)).stdout
    assert "from %s" % sent in out or sent in json.dumps(rows(bed)[-1]), out
    assert slave_digest(bed) == master_digest(bed)


def test_slave_holding_a_snapshot_the_master_made_and_lost_is_no_divergence(bed):
    """Should the master have pruned a snapshot it sent without knowing
    (its state file lost the attempt), the slave's copy carries this
    master's own epoch: its own older history, not a divergent side.  The
    cycle refuses, says so and what to do, and starts no resolution (exit
    code of a replication error, not of a divergence); nothing is changed."""
    prepare(bed, cluster={"snapshot_keep": "1"})
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    write(bed, "y.bin", 10000)
    argv = [sys.executable, bedmod.PROGRAM, "--config", bed.config_path, "--node",
            bed.a.name, "sync"]
    p = bed.a.run(argv, check=False, timeout=120,
                  env=dict(os.environ, FLOCKER_FAILPOINT="replicate:sent"))
    assert p.returncode == -9, p.stderr
    sent = rows(bed)[-1]["snapshot"]
    conn = sqlite3.connect(bed.a.state_db)
    with conn:
        conn.execute("DELETE FROM replications WHERE result != 'ok'")   # the attempt lost
    conn.close()
    prepare(bed, cluster={"snapshot_keep": "1"}, nodes={"beta": {"ssh_port": "2222"}},
            init=False)
    write(bed, "z.bin", 5000)
    fails(sync(bed), ff.EXIT_SSH, "cannot reach node beta")
    assert sent not in snaps(bed.a.dataset)          # pruned here, as feared
    prepare(bed, cluster={"snapshot_keep": "1"}, init=False)
    before_b = snaps(bed.b.dataset)
    err = fails(sync(bed), ff.EXIT_REPLICATION, sent, "made by this master", "zfs destroy")
    assert "not a divergence" in err and "(divergence)" not in err, err
    assert snaps(bed.b.dataset) == before_b


def test_recursive_transfer_cut_inside_a_child_continues(bed):
    """Issue 13, item 4: a package (-R) stream cut while the child's part
    was on its way: the replica's top dataset got the new snapshot, its
    child did not (OpenZFS, recv -s: the child keeps a partial receive,
    named by a receive_resume_token on the child).  The next cycle discards
    the child's partial state (zfs recv -A of that child, through the gate,
    only with recursive = yes) and sends from the newest snapshot that the
    dataset and every child of the replica hold, so replication goes on:
    the same files on both sides, every complete snapshot kept."""
    prepare(bed, cluster={"recursive": "yes"})
    a, b = bed.a, bed.b
    kid, bkid = a.dataset + "/kid", b.dataset + "/kid"
    bedmod.sh(["zfs", "create", kid])
    write(bed, "top.bin", 20000)
    ok(sync(bed))
    first = rows(bed)[-1]["snapshot"]
    assert first in snaps(bkid)
    with open(os.path.join(mnt(a, kid), "big.bin"), "wb") as f:
        f.write(os.urandom(4 << 20))
    write(bed, "top2.bin", 20000)
    # the cycle that was cut: its snapshot, and half of its stream received
    new = ff.snapshot_name(ff.snapshot_epoch(first), time.time())
    bedmod.sh(["zfs", "snapshot", "-r", "%s@%s" % (a.dataset, new)])
    stream = subprocess.run(["zfs", "send", "-R", "-I", "@" + first,
                             "%s@%s" % (a.dataset, new)], check=True,
                            stdout=subprocess.PIPE).stdout
    resumable = ff.Zfs().features().resumable
    half = subprocess.run(["zfs", "recv", "-u"] + (["-s"] if resumable else []) + [b.dataset],
                          input=stream[:len(stream) // 2], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    assert half.returncode != 0
    assert new in snaps(b.dataset) and new not in snaps(bkid), (snaps(b.dataset), snaps(bkid))
    if resumable:
        assert prop(bkid, "receive_resume_token") not in ("", "-")
    kept = {ds: snaps(ds) for ds in (b.dataset, bkid)}

    p = sync(bed)
    print(p.stdout, p.stderr)
    for ds, before in kept.items():      # every complete snapshot is still there
        after = snaps(ds)
        assert all(after.get(n, (None,))[0] == g for n, (g, _) in before.items()), (ds, after)
    if resumable:       # OpenZFS: the snapshots the replica has are skipped
        ok(p)
        assert "dropped the partial receive of %s" % bkid in p.stdout
        assert prop(bkid, "receive_resume_token") == "-"
        row = rows(bed)[-1]
        assert row["result"] == "ok" and row["base"] == first, row
    else:               # zfs-fuse's recv cannot skip them: what to do, said
        fails(p, ff.EXIT_REPLICATION, "left a child of %s on beta without %s" % (b.dataset, new),
              "sent from %s" % first, "'zfs rename %s %s-old'" % (b.dataset, b.dataset))
        bedmod.sh(["zfs", "rename", b.dataset, b.dataset + "-old"])
        ok(sync(bed))
        assert rows(bed)[-1]["base"] is None          # a full copy
    # (the top first: mounting the child alone would leave its directory in
    # the top's unmounted mountpoint)
    assert slave_digest(bed) == {k: v for k, v in master_digest(bed).items()
                                 if not k.startswith("kid/")}
    assert slave_digest(bed, bkid) == bedmod.tree_digest(mnt(a, kid))
    newest = rows(bed)[-1]["snapshot"]
    assert snaps(bkid)[newest][0] == snaps(kid)[newest][0]
    ok(sync(bed))                        # and the cycle after it, as usual
