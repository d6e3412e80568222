"""Keeping the loser's divergent data: cheap (no copy), complete (the
unsnapshotted writes too), crash-safe, and never destroyed by the tool
except by the operator's discard-preserved of a recorded dataset."""

import json
import os

import pytest

from conftest import ff
import bed as bedmod

COMMON = "flocker-2-20260101T000000Z"


def guid(name):
    return bedmod.sh(["zfs", "get", "-H", "-p", "-o", "value", "guid", name]).stdout.strip()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def diverged(bed):
    """alpha's dataset: a common snapshot, then a divergent snapshot and
    unsnapshotted writes (as a master cut off from its peer would have)."""
    a = bed.a
    assert a.flocker("init", "--role", "master").returncode == 0
    mnt = os.path.join(a.pool.mountpoint, "shop")
    write(os.path.join(mnt, "common.bin"), os.urandom(80000))
    bedmod.sh(["zfs", "snapshot", "%s@%s" % (a.dataset, COMMON)])
    common_digest = bedmod.tree_digest(mnt)
    common_guid = guid("%s@%s" % (a.dataset, COMMON))
    write(os.path.join(mnt, "divergent.bin"), os.urandom(60000))
    write(os.path.join(mnt, "common.bin"), os.urandom(1000))       # overwritten after the split
    bedmod.sh(["zfs", "snapshot", "%s@flocker-2-20260101T010000Z" % a.dataset])
    write(os.path.join(mnt, "unsnapshotted.txt"), b"written after the last snapshot\n")
    everything = bedmod.tree_digest(mnt)
    return bed, a, mnt, common_digest, common_guid, everything


def check_preserved(bed, a, mnt, common_digest, common_guid, everything, kept):
    assert kept.startswith(a.dataset + "-diverged-2-")
    # the dataset is back at the common snapshot, same GUID, read-only
    assert guid("%s@%s" % (a.dataset, COMMON)) == common_guid
    assert bedmod.sh(["zfs", "get", "-H", "-o", "value", "readonly,mounted",
                      a.dataset]).stdout.split() == ["on", "no"]
    bedmod.sh(["zfs", "mount", a.dataset])
    assert bedmod.tree_digest(mnt) == common_digest
    # every byte written after the split is in the preserved dataset
    bedmod.sh(["zfs", "mount", kept], check=False)
    kept_mnt = bedmod.sh(["zfs", "get", "-H", "-o", "value", "mountpoint", kept]).stdout.strip()
    assert bedmod.tree_digest(kept_mnt) == everything
    # it is a clone: no data was copied
    assert bedmod.sh(["zfs", "get", "-H", "-o", "value", "origin", kept]).stdout.strip() == \
        "%s@%s" % (a.dataset, COMMON)
    report = json.loads(a.flocker("status", "--json", check=True).stdout)
    assert [p["dataset"] for p in report["preserved"]] == [kept]
    assert report["preserved"][0]["origin"] == "%s@%s" % (a.dataset, COMMON)
    assert "preserved   %s (epoch 2" % kept in a.flocker("status", check=True).stdout


def test_preserve_keeps_everything_and_resets_to_the_common_snapshot(diverged):
    bed, a = diverged[0], diverged[1]
    proc = bed.drive(a, "preserve", COMMON, 2)
    assert proc.returncode == 0, proc.stderr
    check_preserved(*diverged, kept=proc.stdout.strip())

    # the dataset can now receive the winner's increment from the common
    # snapshot, without -F: here a winner made from the same common base
    winner = bed.b.pool.name + "/winner"
    bedmod.zfs_pipe(["%s@%s" % (a.dataset, COMMON)], ["-u", winner])
    bedmod.sh(["zfs", "snapshot", winner + "@flocker-3-20260101T020000Z"])
    bedmod.sh(["zfs", "unmount", a.dataset], check=False)
    bedmod.zfs_pipe(["-i", "@" + COMMON, winner + "@flocker-3-20260101T020000Z"],
                    ["-u", a.dataset])
    assert guid(a.dataset + "@flocker-3-20260101T020000Z") == guid(winner + "@flocker-3-20260101T020000Z")


@pytest.mark.parametrize("step", ff.PRESERVE_STEPS)
def test_kill_9_at_each_step_then_recover(diverged, step):
    bed, a = diverged[0], diverged[1]
    proc = bed.drive(a, "preserve", COMMON, 2, failpoint="preserve:" + step)
    assert proc.returncode == -9, proc.stderr
    with ff.StateStore.open(a.state_db) as s:
        intent = s.unfinished_intent()
    assert intent["action"] == "preserve" and intent["step"] == step
    proc = bed.drive(a, "recover")
    assert proc.returncode == 0 and proc.stdout.strip() == "preserve", proc.stderr
    check_preserved(*diverged, kept=intent["data"]["preserved"])


def test_missing_common_snapshot_changes_nothing(diverged):
    bed, a = diverged[0], diverged[1]
    before = bedmod.sh(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r", a.pool.name]).stdout
    proc = bed.drive(a, "preserve", "flocker-9-nosuch", 2)
    assert proc.returncode == 1
    assert ("the common snapshot %s@flocker-9-nosuch does not exist; nothing was changed"
            % a.dataset) in proc.stderr
    assert bedmod.sh(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r", a.pool.name]).stdout == before


def test_discard_preserved_destroys_only_what_was_recorded(diverged):
    bed, a = diverged[0], diverged[1]
    kept = bed.drive(a, "preserve", COMMON, 2).stdout.strip()
    everything_before = bedmod.sh(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r",
                                   a.pool.name]).stdout.split()

    # not recorded (the live dataset, the pool, a typo): refused, nothing destroyed
    for name in (a.dataset, a.pool.name, kept + "x"):
        proc = a.flocker("discard-preserved", name, "--yes")
        assert proc.returncode == 1
        assert "is not a preserved dataset of this node" in proc.stderr
    # without --yes and without a terminal: refused
    proc = a.flocker("discard-preserved", kept)
    assert proc.returncode == 1 and "confirm with --yes" in proc.stderr
    # promoted by someone since: it may hold the only copy of old snapshots
    bedmod.sh(["zfs", "promote", kept])
    proc = a.flocker("discard-preserved", kept, "--yes")
    assert proc.returncode == 1 and "is no longer a clone" in proc.stderr
    bedmod.sh(["zfs", "promote", a.dataset])
    assert bedmod.sh(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r",
                      a.pool.name]).stdout.split() == everything_before

    proc = a.flocker("discard-preserved", kept, "--yes")
    assert proc.returncode == 0, proc.stderr
    after = bedmod.sh(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r",
                       a.pool.name]).stdout.split()
    assert after == [n for n in everything_before if not n.startswith(kept)]
    assert "%s@%s" % (a.dataset, COMMON) in after
    assert json.loads(a.flocker("status", "--json", check=True).stdout)["preserved"] == []
    assert "the operator discarded the preserved dataset %s" % kept in \
        a.flocker("history", check=True).stdout
