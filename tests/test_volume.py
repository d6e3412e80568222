"""A volume (a zvol: a virtual machine's disk, an iSCSI target) as the
replicated dataset (issue 17, item 6): replication through the ssh gate,
demotion (read-only, nothing to unmount), promotion (writable, no mount,
the device ready before start_command, which gets it as FLOCKER_DEVICE),
and a loser's divergent data kept as a clone of the volume, with no
device of its own.

zfs-fuse makes no volumes ('zfs create -V': "internal error: Function
not implemented"), so there is no device path to find there: the tests on
volumes skip with "not on this ZFS:" and run in the OpenZFS guest
(contrib/test-openzfs.sh tests/test_volume.py)."""

import hashlib
import json
import os
import time

import pytest

from conftest import ff
import bed as bedmod

COMMON = "flocker-2-20260101T000000Z"
MIB = 1 << 20


# -- the stream the gate receives (pure) ---------------------------------------

def record(first):
    """A whole BEGIN record (312 bytes) starting with first."""
    return first + bytes(312 - len(first))


# The first 24 bytes of streams OpenZFS 2.3.2 sent (x86, little-endian), read
# with od in the guest: a volume's full stream (plain), a raw ('send -w')
# full stream of an encrypted file system (plain, with a 0x404-byte payload:
# its key parameters, no property), 'send -I' (compound, no payload), and a
# package ('send -R', '-p': compound, its payload the datasets' properties).
VOLUME_FULL = bytes.fromhex("0000000000000000accbbaf5020000000100000000000000")
RAW_FULL = bytes.fromhex("0000000004040000accbbaf5020000001100080500000000")
SNAPSHOTS = bytes.fromhex("0000000000000000accbbaf5020000000200000000000000")
PACKAGE = bytes.fromhex("00000000c0010000accbbaf5020000000200000000000000")
PACKAGE_BE = bytes.fromhex("00000000000001c000000002f5bacbac0000000000000002")
USAGE = os.path.join(os.path.dirname(__file__), "data", "openzfs-2.3.2-usage.txt")


def test_the_gate_excludes_properties_only_from_a_stream_that_carries_them():
    """Into a volume, 'zfs recv -x mountpoint' (and every -x of a property a
    volume does not have) gets "property 'mountpoint' does not apply to
    datasets of this type": a warning from OpenZFS 2.3.2 (measured in the
    guest), a refused receive from OpenZFS 0.7 and 0.8 (openzfs/zfs#6371,
    #11416).  Only a
    package stream carries properties, so only it gets -x (or, on
    zfs-fuse, the watcher); a plain stream, a volume's among them, gets
    neither and is received as it is (pure)."""
    with open(USAGE) as f:
        usage = f.read()
    ds = "tank/vm"
    for first in (VOLUME_FULL, RAW_FULL, SNAPSHOTS):
        assert not ff.stream_is_package(record(first))
        assert ff.stream_refusal(record(first), recursive=False) == ""
        assert ff.gate_recv_args(("recv", "-u", "-s", ds), usage,
                                 ff.stream_is_package(record(first))) == (
            ["recv", "-u", "-s", ds], [])
    for first in (PACKAGE, PACKAGE_BE):
        assert ff.stream_is_package(record(first))
        args, guarded = ff.gate_recv_args(("recv", "-u", "-s", ds), usage, True)
        assert guarded == list(ff.RECV_GUARDED)
        assert args[:3] == ["recv", "-x", "mountpoint"] and args[-3:] == ["-u", "-s", ds]
    for not_a_stream in (b"", record(b"\x01" + VOLUME_FULL[1:]), b"#!/bin/sh\n" * 40):
        assert not ff.stream_is_package(not_a_stream)


def test_a_file_system_has_no_device(pool):
    """FLOCKER_DEVICE is a volume's only: a file system, and a dataset that
    does not exist (a slave before its first replication), have none."""
    z = ff.Zfs()
    ds = pool.name + "/fs"
    assert z.device_env(ds) == {}
    bedmod.sh(["zfs", "create", ds])
    assert z.device_env(ds) == {} and not z.is_volume(ds)
    assert ff.volume_device("tank/vm/disk0") == "/dev/zvol/tank/vm/disk0"
    assert ff.device_state(os.path.join(pool.mountpoint, "fs")) == "missing"   # a directory
    assert ff.device_state("/dev/zvol/%s/nothing" % pool.name) == "missing"


# -- volumes for real (OpenZFS) ---------------------------------------------------

@pytest.fixture
def volumes(pool):
    """Skips (before a bed is built) where this ZFS makes no volumes."""
    probe = pool.name + "/probe"
    proc = bedmod.sh(["zfs", "create", "-V", "4M", probe], check=False)
    if proc.returncode != 0:
        if bedmod.zfs_kind() == "zfs-fuse":
            pytest.skip("not on this ZFS: zfs-fuse makes no volumes ('zfs create -V': %s); "
                        "run in the OpenZFS guest (contrib/test-openzfs.sh "
                        "tests/test_volume.py)" % proc.stderr.strip().splitlines()[-1])
        raise AssertionError("zfs create -V failed: %s" % proc.stderr)
    # (left for the pool's end: udev's probe of a new device holds it a
    # moment, and zfs destroy says "dataset is busy" meanwhile)


def make_volume(ds, size="16M"):
    bedmod.sh(["zfs", "create", "-V", size, ds])
    return ff.Zfs().wait_for_device(ds, writable=True)


def zget(name, prop):
    return bedmod.sh(["zfs", "get", "-H", "-p", "-o", "value", prop, name]).stdout.strip()


def device(ds):
    return ff.volume_device(ds)


def write_at(ds, offset, data):
    fd = os.open(device(ds), os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(ds, offset, n):
    fd = os.open(device(ds), os.O_RDONLY)
    try:   # not what the page cache kept from before a receive
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def digest(ds):
    return hashlib.sha256(read_at(ds, 0, 16 * MIB)).hexdigest()


def wait_state(ds, want, timeout=30):
    """The device's state ('rw', 'ro', 'missing') once it is want (the
    kernel learns readonly and volmode a moment after zfs set)."""
    deadline = time.monotonic() + timeout
    while ff.device_state(device(ds)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return ff.device_state(device(ds))


def local_props(name):
    out = bedmod.sh(["zfs", "get", "-H", "-p", "-o", "property,value", "-s", "local",
                     "all", name]).stdout
    return dict(line.split("\t", 1) for line in out.splitlines())


def test_a_volume_replicates_switches_over_and_back(volumes, bed):
    """The master's volume reaches the slave through the ssh gate (full,
    then incremental), as a read-only volume with a read-only device; a
    switchover demotes the master (read-only, its stop_command given the
    device) and promotes the slave (writable, its start_command given the
    device, which it can write at once); replication then runs the other
    way, and both devices hold the same bytes."""
    a, b = bed.a, bed.b
    marks = os.path.join(bed.workdir, "marks")
    os.makedirs(marks)
    start = ("sh -c 'echo \"$FLOCKER_DEVICE\" > %s/device-$FLOCKER_NODE && echo \"$FLOCKER_NODE\" "
             "| dd of=\"$FLOCKER_DEVICE\" bs=512 seek=2048 conv=notrunc,fsync status=none'"
             % marks)
    stop = "sh -c 'echo \"$FLOCKER_DEVICE\" >> %s/stopped-$FLOCKER_NODE'" % marks
    bed.write_config(service={"start_command": start, "stop_command": stop})
    make_volume(a.dataset)
    assert a.flocker("init", "--role", "master").returncode == 0
    assert b.flocker("init", "--role", "slave").returncode == 0
    write_at(a.dataset, 0, os.urandom(512 * 1024))

    r = a.flocker("sync", timeout=bedmod.scaled(120))
    assert r.returncode == 0, r.stdout + r.stderr
    assert zget(b.dataset, "type") == "volume" and zget(b.dataset, "readonly") == "on"
    assert wait_state(b.dataset, "ro") == "ro"
    assert digest(b.dataset) == digest(a.dataset)
    write_at(a.dataset, 4 * MIB, os.urandom(256 * 1024))
    r = a.flocker("sync", timeout=bedmod.scaled(120))
    assert r.returncode == 0, r.stdout + r.stderr
    assert digest(b.dataset) == digest(a.dataset)

    r = a.flocker("demote", timeout=bedmod.scaled(120))
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(marks, "stopped-alpha")) as f:
        assert f.read().split() == [device(a.dataset)]
    assert zget(a.dataset, "readonly") == "on" and wait_state(a.dataset, "ro") == "ro"
    r = b.flocker("promote", "--force", timeout=bedmod.scaled(120))
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(marks, "device-beta")) as f:
        assert f.read().split() == [device(b.dataset)]
    assert zget(b.dataset, "readonly") == "off" and ff.device_state(device(b.dataset)) == "rw"
    assert read_at(b.dataset, MIB, 5) == b"beta\n"       # start_command wrote it
    assert digest(a.dataset) != digest(b.dataset)

    r = b.flocker("sync", timeout=bedmod.scaled(120))
    assert r.returncode == 0, r.stdout + r.stderr
    assert digest(a.dataset) == digest(b.dataset)
    assert zget(a.dataset, "type") == "volume" and zget(a.dataset, "readonly") == "on"


def test_a_diverged_volume_is_kept_as_a_clone_without_a_device(volumes, bed):
    """The loser's volume: renamed aside with everything written after the
    common snapshot (the unsnapshotted writes too), the common snapshot
    cloned back under its name with its own properties (volsize,
    refreservation), read-only.  The kept copy has no device (volmode=none:
    a second disk with the live one's file system and LVM identities would
    let the host take it for the live one); copy-preserved gives a writable
    copy's device, and discard-preserved destroys only the kept clone."""
    a = bed.a
    make_volume(a.dataset)
    assert a.flocker("init", "--role", "master").returncode == 0
    write_at(a.dataset, 0, os.urandom(300 * 1024))
    bedmod.sh(["zfs", "snapshot", "%s@%s" % (a.dataset, COMMON)])
    common_guid = zget("%s@%s" % (a.dataset, COMMON), "guid")
    common_digest = digest(a.dataset)
    write_at(a.dataset, 2 * MIB, os.urandom(200 * 1024))
    bedmod.sh(["zfs", "snapshot", "%s@flocker-2-20260101T010000Z" % a.dataset])
    write_at(a.dataset, 3 * MIB, b"written after the last snapshot\n")
    everything = digest(a.dataset)
    own = local_props(a.dataset)
    assert "volsize" in own and "refreservation" in own, own

    proc = bed.drive(a, "preserve", COMMON, 2)
    assert proc.returncode == 0, proc.stderr
    kept = proc.stdout.strip()
    assert kept.startswith(a.dataset + "-diverged-2-")
    assert zget(kept, "type") == "volume"
    assert zget(kept, "origin") == "%s@%s" % (a.dataset, COMMON)
    assert (zget(kept, "volmode"), zget(kept, "readonly")) == ("none", "on")
    assert wait_state(kept, "missing") == "missing"
    # the live name: the common snapshot (same GUID), its own properties, read-only
    assert zget("%s@%s" % (a.dataset, COMMON), "guid") == common_guid
    assert zget(a.dataset, "readonly") == "on"
    now = local_props(a.dataset)
    assert {p: now.get(p) for p in ("volsize", "refreservation")} == \
        {p: own[p] for p in ("volsize", "refreservation")}, now
    assert wait_state(a.dataset, "ro") == "ro"
    assert digest(a.dataset) == common_digest
    report = json.loads(a.flocker("status", "--json", check=True).stdout)
    assert [p["dataset"] for p in report["preserved"]] == [kept]

    proc = a.flocker("copy-preserved", kept, "--mountpoint", "/mnt/x")
    assert proc.returncode == 1 and "is a volume" in proc.stderr, proc.stderr
    proc = a.flocker("copy-preserved", kept)
    assert proc.returncode == 0, proc.stderr
    copy = kept + "-copy"
    assert device(copy) in proc.stdout, proc.stdout
    assert ff.device_state(device(copy)) == "rw"
    assert digest(copy) == everything                    # every byte written after the split
    proc = a.flocker("discard-preserved", kept, "--yes")
    assert proc.returncode == 1 and copy in proc.stderr, proc.stderr
    bedmod.sh(["zfs", "destroy", copy])
    proc = a.flocker("discard-preserved", kept, "--yes")
    assert proc.returncode == 0, proc.stderr
    assert zget(a.dataset, "type") == "volume" and digest(a.dataset) == common_digest
