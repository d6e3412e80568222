"""Keeping the loser's divergent data: cheap (no copy), complete (the
unsnapshotted writes too), crash-safe, and never destroyed by the tool
except by the operator's discard-preserved of a recorded dataset."""

import hashlib
import json
import os

import pytest

from conftest import ff
import bed as bedmod
from helpers import Running, S

COMMON = "flocker-2-20260101T000000Z"
# the live dataset's own settings, which preservation must leave on it
OWN = {"atime": "off", "compression": "on", "recordsize": "16384", "quota": "104857600",
       "flocker:note": "the operator's own user property"}


def guid(name):
    return bedmod.sh(["zfs", "get", "-H", "-p", "-o", "value", "guid", name]).stdout.strip()


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def zget(name, prop):
    return bedmod.sh(["zfs", "get", "-H", "-p", "-o", "value", prop, name]).stdout.strip()


def local_props(name):
    out = bedmod.sh(["zfs", "get", "-H", "-p", "-o", "property,value", "-s", "local",
                     "all", name]).stdout
    return dict(line.split("\t", 1) for line in out.splitlines())


@pytest.fixture
def diverged(bed):
    """alpha's dataset: a common snapshot, then a divergent snapshot and
    unsnapshotted writes (as a master cut off from its peer would have).
    The dataset has its own mountpoint and settings (OWN), and a child
    dataset of the user's (not replicated: recursive = no) with a file."""
    a = bed.a
    assert a.flocker("init", "--role", "master").returncode == 0
    mnt = os.path.join(a.pool.mountpoint, "custom", "shop")
    bedmod.sh(["zfs", "set", "mountpoint=" + mnt, a.dataset])
    for prop, value in OWN.items():
        bedmod.sh(["zfs", "set", "%s=%s" % (prop, value), a.dataset])
    bedmod.sh(["zfs", "create", a.dataset + "/kid"])
    write(os.path.join(mnt, "kid", "child.txt"), b"the user's own child dataset\n")
    write(os.path.join(mnt, "common.bin"), os.urandom(80000))
    bedmod.sh(["zfs", "snapshot", "%s@%s" % (a.dataset, COMMON)])
    common_digest = digest(mnt)
    common_guid = guid("%s@%s" % (a.dataset, COMMON))
    write(os.path.join(mnt, "divergent.bin"), os.urandom(60000))
    write(os.path.join(mnt, "common.bin"), os.urandom(1000))       # overwritten after the split
    bedmod.sh(["zfs", "snapshot", "%s@flocker-2-20260101T010000Z" % a.dataset])
    write(os.path.join(mnt, "unsnapshotted.txt"), b"written after the last snapshot\n")
    everything = digest(mnt)
    return bed, a, mnt, common_digest, common_guid, everything


def digest(mnt):
    """The dataset's own files (not its child's)."""
    return {k: v for k, v in bedmod.tree_digest(mnt).items() if not k.startswith("kid/")}


KID = {"child.txt": hashlib.sha256(b"the user's own child dataset\n").hexdigest()}


def check_settings(a, mnt, kept):
    """The live dataset keeps its own settings and its child; the preserved
    copy is kept out of the service's way."""
    own = local_props(a.dataset)
    assert own.get("mountpoint") == mnt, own
    for prop, value in OWN.items():
        assert own.get(prop) == value, (prop, own)
    assert zget(a.dataset + "/kid", "type") == "filesystem"
    assert zget(a.dataset + "/kid", "mountpoint") == mnt + "/kid"
    assert bedmod.sh(["zfs", "list", "-H", "-o", "name", "-r", kept]).stdout.split() == [kept]
    assert zget(kept, "canmount") == "noauto"
    assert not zget(kept, "mountpoint").startswith(mnt + "/") and zget(kept, "mountpoint") != mnt


def check_preserved(bed, a, mnt, common_digest, common_guid, everything, kept):
    assert kept.startswith(a.dataset + "-diverged-2-")
    check_settings(a, mnt, kept)
    # the dataset is back at the common snapshot, same GUID, read-only
    assert guid("%s@%s" % (a.dataset, COMMON)) == common_guid
    assert bedmod.sh(["zfs", "get", "-H", "-o", "value", "readonly,mounted",
                      a.dataset]).stdout.split() == ["on", "no"]
    bedmod.sh(["zfs", "mount", a.dataset])
    assert digest(mnt) == common_digest
    bedmod.sh(["zfs", "mount", a.dataset + "/kid"], check=False)
    assert bedmod.tree_digest(os.path.join(mnt, "kid")) == KID
    # every byte written after the split is in the preserved dataset
    bedmod.sh(["zfs", "mount", kept], check=False)
    kept_mnt = bedmod.sh(["zfs", "get", "-H", "-o", "value", "mountpoint", kept]).stdout.strip()
    assert digest(kept_mnt) == everything
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


def test_promoted_loser_serves_its_own_path_and_the_copy_stays_aside(diverged):
    """After a preservation, a promotion of that node finds the live data
    at the dataset's own mountpoint with its settings and its child; the
    preserved copy, mounted by hand, does not take that path; discarding
    it removes only what diverged."""
    bed, a, mnt, common_digest = diverged[:4]
    kept = bed.drive(a, "preserve", COMMON, 2).stdout.strip()
    proc = bed.drive(a, "promote", 4)
    assert proc.returncode == 0, proc.stderr
    assert zget(a.dataset, "mounted") == "yes" and zget(a.dataset, "readonly") == "off"
    assert zget(a.dataset + "/kid", "mounted") == "yes"
    assert digest(mnt) == common_digest
    assert bedmod.tree_digest(os.path.join(mnt, "kid")) == KID
    check_settings(a, mnt, kept)
    bedmod.sh(["zfs", "mount", kept])
    assert digest(mnt) == common_digest              # still the live data there
    assert zget(kept, "mountpoint") == mnt + kept[len(a.dataset):]
    bedmod.sh(["zfs", "unmount", kept])
    proc = a.flocker("discard-preserved", kept, "--yes")
    assert proc.returncode == 0, proc.stderr
    names = bedmod.sh(["zfs", "list", "-H", "-o", "name", "-r", a.pool.name]).stdout.split()
    assert a.dataset in names and a.dataset + "/kid" in names and kept not in names
    assert bedmod.tree_digest(os.path.join(mnt, "kid")) == KID


def test_discard_preserved_refuses_a_dataset_with_unrecorded_children(diverged):
    """A child below a preserved dataset (one an older version moved there,
    or the operator's) may hold the only copy of its data: refused, and
    nothing is destroyed."""
    bed, a = diverged[0], diverged[1]
    kept = bed.drive(a, "preserve", COMMON, 2).stdout.strip()
    bedmod.sh(["zfs", "create", "-o", "readonly=off", kept + "/old-kid"])
    before = bedmod.sh(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r",
                        a.pool.name]).stdout
    proc = a.flocker("discard-preserved", kept, "--yes")
    assert proc.returncode == 1, proc.stderr
    assert "did not preserve (%s/old-kid)" % kept in proc.stderr, proc.stderr
    assert "refusing to destroy anything" in proc.stderr
    assert bedmod.sh(["zfs", "list", "-H", "-t", "all", "-o", "name", "-r",
                      a.pool.name]).stdout == before
    assert [p["dataset"] for p in json.loads(
        a.flocker("status", "--json", check=True).stdout)["preserved"]] == [kept]


def test_discard_preserved_goes_through_a_running_daemon(diverged):
    """Issue 13, item 6: discard-preserved needs the state lock, which a
    running daemon holds; it hands the request to the daemon (control
    socket) instead of asking for the service to stop, with the same
    checks: a name it did not record is refused, the preserved one goes."""
    bed, a = diverged[0], diverged[1]
    kept = bed.drive(a, "preserve", COMMON, 2).stdout.strip()
    d = Running(a).wait_ready()
    try:
        proc = a.flocker("discard-preserved", a.dataset, "--yes")
        assert proc.returncode == 1 and "is not a preserved dataset of this node" in \
            proc.stderr, proc.stderr
        assert bedmod.sh(["zfs", "list", "-H", "-o", "name", a.dataset]).returncode == 0
        proc = a.flocker("discard-preserved", kept, "--yes", timeout=S(120))
        assert proc.returncode == 0, proc.stderr
        assert "by the running daemon" in proc.stdout
        assert bedmod.sh(["zfs", "list", "-H", "-o", "name", kept],
                         check=False).returncode != 0
        assert d.status()["discard"] == {"dataset": kept, "state": "done", "error": None}
        assert d.proc.poll() is None
    finally:
        d.stop()


def test_copy_preserved_gives_a_writable_copy_and_changes_nothing_kept(diverged):
    """The kept data of a database is a crash image on a read-only dataset:
    to look into it the operator needs a writable copy to run a second
    instance on.  copy-preserved clones the preserved dataset's newest
    snapshot (every byte written after the split) at a path of their
    choice; the preserved dataset stays as it was, and discard-preserved
    refuses while the copy depends on it."""
    bed, a, everything = diverged[0], diverged[1], diverged[5]
    kept = bed.drive(a, "preserve", COMMON, 2).stdout.strip()
    snaps_before = bedmod.sh(["zfs", "get", "-H", "-p", "-o", "name,value", "guid", "-r",
                              kept]).stdout
    target = os.path.join(bed.workdir, "inspect")
    for name in (a.dataset, kept + "x"):
        proc = a.flocker("copy-preserved", name, "--mountpoint", target)
        assert proc.returncode == 1 and "is not a preserved dataset of this node" in \
            proc.stderr, proc.stderr
    proc = a.flocker("copy-preserved", kept, "--mountpoint", "relative/path")
    assert proc.returncode == 1 and "an absolute path" in proc.stderr, proc.stderr
    proc = a.flocker("copy-preserved", kept)      # (only a volume's copy takes none)
    assert proc.returncode == 1 and "--mountpoint DIR" in proc.stderr, proc.stderr

    proc = a.flocker("copy-preserved", kept, "--mountpoint", target)
    assert proc.returncode == 0, proc.stderr
    copy = kept + "-copy"
    assert copy in proc.stdout and "zfs destroy %s" % copy in proc.stdout, proc.stdout
    assert digest(target) == everything
    write(os.path.join(target, "scratch"), b"a second instance writes here\n")
    assert zget(copy, "readonly") == "off"
    # the kept data did not change
    assert bedmod.sh(["zfs", "get", "-H", "-p", "-o", "name,value", "guid", "-r",
                      kept]).stdout == snaps_before
    assert zget(kept, "readonly") == "on"
    # a second copy of the same name is refused, nothing changed
    proc = a.flocker("copy-preserved", kept, "--mountpoint", target + "2")
    assert proc.returncode == 1 and "already exists" in proc.stderr, proc.stderr
    # the copy keeps the kept data from being discarded, and says so
    proc = a.flocker("discard-preserved", kept, "--yes")
    assert proc.returncode == 1 and copy in proc.stderr, proc.stderr
    assert zget(kept, "type") == "filesystem"
    ff.Zfs().run(["destroy", copy], retry_busy=True)   # zfs-fuse: busy for a moment
    proc = a.flocker("discard-preserved", kept, "--yes")
    assert proc.returncode == 0, proc.stderr


def test_preserved_names_are_those_made_for_this_dataset():
    ds = "tank/shop"
    names = ["tank", "tank/shop", "tank/shop-diverged-7-20260101T000000Z",
             "tank/shop-diverged-12-20261129T163555Z", "tank/shop-diverged-x-20260101T000000Z",
             "tank/shop-diverged-7-20260101T000000Z-mine", "tank/shopx-diverged-7-20260101T000000Z",
             "tank/shop/kid", "tank/shop-diverged-7-20260101T000000Z/kid", "other/shop-diverged-"
             "7-20260101T000000Z", "tankXshop-diverged-7-20260101T000000Z"]
    assert ff.preserved_names(ds, names) == [
        ("tank/shop-diverged-7-20260101T000000Z", 7),
        ("tank/shop-diverged-12-20261129T163555Z", 12)]
    assert ff.preserved_name(ds, 7, 0) == "tank/shop-diverged-7-19700101T000000Z"
    assert ff.preserved_names(ds, [ff.preserved_name(ds, 7, 0)]) == [
        (ff.preserved_name(ds, 7, 0), 7)]


def test_a_state_file_restored_from_before_the_split_lists_the_kept_data_again(diverged):
    """Campaign finding (old_state): a state file restored from a backup
    taken before the split no longer listed the divergent data the node
    kept, so 'status' and 'check' hid it from the operator (the writes
    were on the pool, in no listed dataset).  The daemon lists it again at
    start, with its origin, and changes nothing on it."""
    import shutil
    bed, a = diverged[0], diverged[1]
    backup = os.path.join(bed.workdir, "state-backup.db")
    shutil.copy(a.state_db, backup)            # nothing holds it open now
    kept = bed.drive(a, "preserve", COMMON, 2).stdout.strip()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(a.state_db + suffix):
            os.unlink(a.state_db + suffix)
    shutil.copy(backup, a.state_db)
    assert json.loads(a.flocker("status", "--json", check=True).stdout)["preserved"] == []
    before = guid(kept)
    d = Running(a).wait_ready()
    try:
        report = json.loads(a.flocker("status", "--json", check=True).stdout)
        assert [p["dataset"] for p in report["preserved"]] == [kept], report["preserved"]
        assert report["preserved"][0]["origin"] == "%s@%s" % (a.dataset, COMMON)
        assert report["preserved"][0]["epoch"] == 2
        assert guid(kept) == before and zget(kept, "readonly") == "on"
    finally:
        d.stop()
