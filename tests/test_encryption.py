"""An encrypted dataset (OpenZFS native encryption) replicated raw
(send_flags = -w; issue 17, item 3): the slave stores the ciphertext and
never needs the key to replicate; at a takeover it loads the key (from
key_command, or the dataset's keylocation) before anything changes, and a
slave that cannot load it does not take over, says why, and 'check' says
so beforehand where it can tell.

zfs-fuse has no native encryption: these skip there ("not on this ZFS:")
and run in the OpenZFS guest (contrib/test-openzfs.sh tests/test_encryption.py)."""

import json
import os

import pytest

from conftest import ff
import bed as bedmod

PASSPHRASE = "correct horse battery staple\n"


@pytest.fixture
def encryption(pool, tmp_path):
    """Skips (before a bed is built) where this ZFS has no encryption."""
    key = tmp_path / "probe.key"
    key.write_text(PASSPHRASE)
    proc = bedmod.sh(["zfs", "create", "-o", "encryption=on", "-o", "keyformat=passphrase",
                      "-o", "keylocation=file://%s" % key, pool.name + "/probe"], check=False)
    if proc.returncode != 0:
        if bedmod.zfs_kind() == "zfs-fuse":
            pytest.skip("not on this ZFS: zfs-fuse has no native encryption ('zfs create -o "
                        "encryption=on': %s); run in the OpenZFS guest "
                        "(contrib/test-openzfs.sh tests/test_encryption.py)"
                        % proc.stderr.strip().splitlines()[-1])
        raise AssertionError("zfs create -o encryption=on failed: %s" % proc.stderr)


def zget(name, prop):
    return bedmod.sh(["zfs", "get", "-H", "-p", "-o", "value", prop, name]).stdout.strip()


def role(host):
    with ff.StateStore.open(host.state_db) as s:
        return s.node_state().role, s.unfinished_intent()


def test_a_raw_replica_needs_no_key_and_a_takeover_loads_it(encryption, bed):
    a, b = bed.a, bed.b
    marks = os.path.join(bed.workdir, "marks")
    os.makedirs(marks)
    a_key = os.path.join(bed.workdir, "alpha.key")
    b_key = os.path.join(bed.workdir, "beta.key")       # not there at first
    with open(a_key, "w") as f:
        f.write(PASSPHRASE)
    service = {"start_command": "sh -c 'touch %s/running-$FLOCKER_NODE'" % marks,
               "stop_command": "sh -c 'rm -f %s/running-$FLOCKER_NODE'" % marks}
    bed.write_config(cluster={"send_flags": "-w"}, service=service)
    bedmod.sh(["zfs", "create", "-o", "encryption=on", "-o", "keyformat=passphrase",
               "-o", "keylocation=file://" + a_key, a.dataset])
    mnt_a = os.path.join(a.pool.mountpoint, "shop")
    for i in range(3):
        with open(os.path.join(mnt_a, "f%d" % i), "wb") as f:
            f.write(os.urandom(40000))
    assert a.flocker("init", "--role", "master").returncode == 0
    assert b.flocker("init", "--role", "slave").returncode == 0
    r = a.flocker("sync", timeout=bedmod.scaled(120))
    assert r.returncode == 0, r.stdout + r.stderr
    want = bedmod.tree_digest(mnt_a)
    # the slave holds the ciphertext: encrypted, no key, nothing mounted
    assert zget(b.dataset, "encryption") != "off"
    assert (zget(b.dataset, "keystatus"), zget(b.dataset, "keylocation")) == (
        "unavailable", "prompt")
    # check says beforehand that this slave could not take over
    r = b.flocker("check", "--no-daemon")
    assert r.returncode == 2 and "could not take over" in r.stdout \
        and "keylocation is prompt" in r.stdout, r.stdout
    report = json.loads(b.flocker("status", "--json", check=True).stdout)
    assert report["encryption"]["keystatus"] == "unavailable", report["encryption"]

    r = a.flocker("demote", timeout=bedmod.scaled(120))
    assert r.returncode == 0, r.stdout + r.stderr
    # no key: no takeover, nothing changed, and the reason
    r = b.flocker("promote", "--force", timeout=bedmod.scaled(120))
    assert r.returncode != 0 and "keylocation is prompt" in r.stderr, r.stderr
    assert role(b) == ("slave", None) and zget(b.dataset, "readonly") == "on"
    bed.write_config(cluster={"send_flags": "-w"},
                     service=dict(service, key_command="cat " + b_key))
    r = b.flocker("promote", "--force", timeout=bedmod.scaled(120))
    assert r.returncode != 0 and "key_command exited 1" in r.stderr, r.stderr
    assert role(b) == ("slave", None) and zget(b.dataset, "keystatus") == "unavailable"
    assert not os.path.exists(os.path.join(marks, "running-beta"))

    with open(b_key, "w") as f:
        f.write(PASSPHRASE)
    r = b.flocker("promote", "--force", timeout=bedmod.scaled(120))
    assert r.returncode == 0, r.stdout + r.stderr
    assert role(b) == ("master", None)
    assert (zget(b.dataset, "keystatus"), zget(b.dataset, "mounted")) == ("available", "yes")
    assert os.path.exists(os.path.join(marks, "running-beta"))
    mnt_b = os.path.join(b.pool.mountpoint, "shop")
    assert bedmod.tree_digest(mnt_b) == want
    # and back: raw increments into the old master, whose key is still loaded
    with open(os.path.join(mnt_b, "from-beta"), "wb") as f:
        f.write(os.urandom(30000))
    r = b.flocker("sync", timeout=bedmod.scaled(120))
    assert r.returncode == 0, r.stdout + r.stderr
    newest = bedmod.sh(["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-s",
                        "createtxg", "-r", b.dataset]).stdout.split()[-1].split("@")[1]
    assert zget("%s@%s" % (a.dataset, newest), "guid") == \
        zget("%s@%s" % (b.dataset, newest), "guid")



COMMON = "flocker-2-20260101T000000Z"


def test_a_diverged_encrypted_dataset_is_kept_and_the_live_one_keeps_its_key(encryption, bed):
    """The loser's encrypted dataset: kept as a clone with everything
    written after the common snapshot, the live name back at the common
    snapshot (same GUID), still encrypted, its key loaded, readable."""
    a = bed.a
    key = os.path.join(bed.workdir, "alpha.key")
    with open(key, "w") as f:
        f.write(PASSPHRASE)
    bedmod.sh(["zfs", "create", "-o", "encryption=on", "-o", "keyformat=passphrase",
               "-o", "keylocation=file://" + key, a.dataset])
    assert a.flocker("init", "--role", "master").returncode == 0
    mnt = os.path.join(a.pool.mountpoint, "shop")
    with open(os.path.join(mnt, "common"), "wb") as f:
        f.write(os.urandom(50000))
    bedmod.sh(["zfs", "snapshot", "%s@%s" % (a.dataset, COMMON)])
    common_guid = zget("%s@%s" % (a.dataset, COMMON), "guid")
    common = bedmod.tree_digest(mnt)
    # the winner: the common snapshot, raw, and a change of its own
    winner = bed.b.pool.name + "/winner"
    bedmod.zfs_pipe(["-w", "%s@%s" % (a.dataset, COMMON)], ["-u", winner])
    bedmod.sh(["zfs", "load-key", "-L", "file://" + key, winner])
    bedmod.sh(["zfs", "mount", winner])
    with open(os.path.join(zget(winner, "mountpoint"), "won"), "wb") as f:
        f.write(os.urandom(20000))
    bedmod.sh(["zfs", "snapshot", winner + "@flocker-3-20260101T020000Z"])
    with open(os.path.join(mnt, "divergent"), "wb") as f:
        f.write(os.urandom(40000))
    bedmod.sh(["zfs", "snapshot", "%s@flocker-2-20260101T010000Z" % a.dataset])
    with open(os.path.join(mnt, "unsnapshotted"), "wb") as f:
        f.write(b"written after the last snapshot\n")
    everything = bedmod.tree_digest(mnt)

    proc = bed.drive(a, "preserve", COMMON, 2)
    assert proc.returncode == 0, proc.stderr
    kept = proc.stdout.strip()
    assert zget("%s@%s" % (a.dataset, COMMON), "guid") == common_guid
    assert zget(a.dataset, "encryption") != "off" and zget(a.dataset, "keystatus") == "available"
    # unchanged since the common snapshot (never mounted writable), its own canmount back
    assert (zget(a.dataset, "written"), zget(a.dataset, "canmount")) == ("0", "on")
    assert zget(a.dataset, "keylocation") == "file://" + key
    # the resync: the winner's raw increment from the common snapshot, no -F
    bedmod.zfs_pipe(["-w", "-i", "@" + COMMON, winner + "@flocker-3-20260101T020000Z"],
                    ["-u", a.dataset])
    assert zget(a.dataset + "@flocker-3-20260101T020000Z", "guid") == \
        zget(winner + "@flocker-3-20260101T020000Z", "guid")
    bedmod.sh(["zfs", "mount", a.dataset])
    assert set(bedmod.tree_digest(mnt)) == set(common) | {"won"}
    bedmod.sh(["zfs", "mount", kept])
    assert bedmod.tree_digest(zget(kept, "mountpoint")) == everything
