"""An encrypted dataset (OpenZFS native encryption) replicated raw
(send_flags = -w; issue 17, item 3): the slave stores the ciphertext and
never needs the key to replicate; at a takeover it loads the key (from
key_command, or the dataset's keylocation) before anything changes, and a
slave that cannot load it does not take over, says why, and 'check' says
so beforehand where it can tell.  A raw transfer cut mid-stream resumes
from its token (raw again); a split brain resolves when a node's key is
not loaded (measured on the raw stream, kept without the key), and a
winner that cannot load its key serves once it can.

zfs-fuse has no native encryption: these skip there ("not on this ZFS:")
and run in the OpenZFS guest (contrib/test-openzfs.sh tests/test_encryption.py)."""

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import ff
import bed as bedmod
from helpers import (FAST, START, STOP, Pair, S, files_in, link_bytes, mnt, pids_of, prepare,
                     preserved, replicated, serving, wait_for, write, write_files)

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


# -- the divergence measure of a raw stream ------------------------------------

def test_an_empty_raw_increment_is_no_change():
    """The divergence measure of an encrypted dataset replicated raw is its
    raw stream (zfs send -w), which needs no key.  An increment with no
    change is then a BEGIN record with a payload (the key parameters) and
    an END record: 'no change', as the plain stream's two bare records.
    Recorded in the OpenZFS 2.3.2 guest: 'zfs send -w -i @A D@B' of two
    snapshots with nothing written between them."""
    path = os.path.join(os.path.dirname(__file__), "data",
                        "openzfs-2.3.2-raw-empty-incremental.bin")
    with open(path, "rb") as f:
        raw = f.read()
    assert len(raw) == 1652 and int.from_bytes(raw[4:8], "little") == 1028
    assert ff.stream_is_empty(raw)
    assert not ff.stream_is_empty(raw[:-1]) and not ff.stream_is_empty(raw + bytes(312))
    swapped = bytearray(raw)     # the same from a big-endian sender
    for off in (0, 4):
        swapped[off:off + 4] = raw[off:off + 4][::-1]
    end = 312 + 1028
    swapped[end:end + 4] = raw[end:end + 4][::-1]
    assert ff.stream_is_empty(bytes(swapped))
    more = bytearray(raw[:end]) + bytearray(312) + raw[end:]
    more[end:end + 4] = (3).to_bytes(4, "little")      # a WRITE record before the END
    assert not ff.stream_is_empty(bytes(more))


# -- a resumed raw transfer ---------------------------------------------------

def test_an_interrupted_raw_transfer_resumes_from_its_token(encryption, bed):
    """kill -9 of the raw (send_flags = -w) zfs send once half the stream
    reached the slave: OpenZFS (recv -s) keeps what arrived, its
    receive_resume_token says rawok, and the next cycle resumes it with
    'zfs send -t' (through the gate: a plain stream whose BEGIN record
    carries the resume point and the key parameters), sending only the
    rest.  The replica ends with the same snapshot (GUID), still without a
    key; after a takeover that loads it, its files are the master's."""
    a, b = bed.a, bed.b
    keys = _keys(bed)
    _encrypted(a, keys[a])
    prepare(bed, cluster={"send_flags": "-w"})
    bed.write_config(cluster=dict(FAST, send_flags="-w"),
                     service={"key_command": KEY_COMMAND.format(w=bed.workdir)})
    write(bed, "base.bin", 50000)
    first = _sync_ok(a)
    size = 16 << 20
    write(bed, "big.bin", size)
    bed.throttle(a, 8)                 # 1 MB/s: the stream is on the wire for ~16 s
    try:
        rx = link_bytes(b, 0)
        proc = a.popen(bedmod.program("--config", bed.config_path, "--node", a.name, "sync"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
        try:
            wait_for(lambda: pids_of(["zfs", "recv"], b.dataset), max(30, S(5)),
                     what="zfs recv on beta")
            send = wait_for(lambda: pids_of(["zfs", "send"], a.dataset), 30, what="zfs send")
            wait_for(lambda: link_bytes(b, 0) - rx > size // 2, 90,
                     what="half the stream to reach beta")
            os.kill(send[0], signal.SIGKILL)
            out, err = proc.communicate(timeout=S(30) + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        bed.throttle(a, None)
    assert proc.returncode == ff.EXIT_REPLICATION and "zfs send was killed by signal 9" in err, \
        out + err
    wait_for(lambda: not pids_of(["zfs", "recv"], b.dataset), 60, what="beta's zfs recv to end")
    with ff.StateStore.open(a.state_db) as s:
        pending = s.conn.execute("SELECT snapshot FROM replications ORDER BY id DESC "
                                 "LIMIT 1").fetchone()[0]
    assert not _exists("%s@%s" % (b.dataset, pending))
    token = zget(b.dataset, "receive_resume_token")
    assert token not in ("", "-")
    # the token carries the raw flag: 'zfs send -t' sends raw again
    told = bedmod.sh(["zfs", "send", "-nv", "-t", token])
    told = told.stdout + told.stderr
    assert "rawok = 1" in told, told
    full = _stream_bytes(["zfs", "send", "-w", "-I", "%s@%s" % (a.dataset, first),
                          "%s@%s" % (a.dataset, pending)])

    tx = link_bytes(a, 8)
    r = a.flocker("sync", timeout=S(120) + 60)
    tx = link_bytes(a, 8) - tx
    assert r.returncode == 0, r.stdout + r.stderr
    with ff.StateStore.open(a.state_db) as s:
        snapshot, sent, result = s.conn.execute(
            "SELECT snapshot, bytes, result FROM replications ORDER BY id DESC "
            "LIMIT 1").fetchone()
    print("raw stream %d bytes; the resuming cycle sent %d bytes, %d on the wire: %s"
          % (full, sent, tx, r.stdout.strip()))
    assert "resumed the interrupted transfer of %s" % pending in r.stdout, r.stdout
    assert (result, snapshot) == ("ok", pending)
    assert 0 < sent < 0.8 * full and tx < 0.8 * full
    assert zget(b.dataset, "receive_resume_token") == "-"
    assert _guid(a.dataset, pending) == _guid(b.dataset, pending)
    assert (zget(b.dataset, "keystatus"), zget(b.dataset, "readonly")) == ("unavailable", "on")
    want = bedmod.tree_digest(mnt(a))
    r = a.flocker("demote", timeout=S(120) + 60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = b.flocker("promote", "--force", timeout=S(120) + 60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert zget(b.dataset, "keystatus") == "available"
    assert bedmod.tree_digest(mnt(b)) == want


# -- split brains with a key that is not loaded ---------------------------------
#
# Both nodes' datasets encrypted, replicated raw.  Each node's key_command
# reads its key file (keys/NODE.key in the bed's work dir): moving that file
# away makes the key impossible to load on that node, as a removable key
# that is not at hand, or a passphrase nobody typed after a reboot.

KEY_COMMAND = "sh -c 'cat {w}/keys/$FLOCKER_NODE.key'"


def _keys(bed):
    """{host: path of its key file}, written."""
    d = os.path.join(bed.workdir, "keys")
    os.makedirs(d, exist_ok=True)
    paths = {}
    for h in bed.hosts:
        paths[h] = os.path.join(d, "%s.key" % h.name)
        with open(paths[h], "w") as f:
            f.write(PASSPHRASE)
    return paths


def _encrypted(host, keyfile):
    bedmod.sh(["zfs", "create", "-o", "encryption=on", "-o", "keyformat=passphrase",
               "-o", "keylocation=file://" + keyfile, host.dataset])


def _exists(name):
    return bedmod.sh(["zfs", "list", "-H", "-o", "name", "-t", "all", name],
                     check=False).returncode == 0


def _guid(ds, snap):
    return zget("%s@%s" % (ds, snap), "guid")


def _newest(ds):
    return bedmod.sh(["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-s", "createtxg",
                      "-d", "1", ds]).stdout.split()[-1].split("@")[1]


def _stream_bytes(argv):
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    total = 0
    for chunk in iter(lambda: proc.stdout.read(1 << 20), b""):
        total += len(chunk)
    assert proc.wait() == 0
    return total


def _sync_ok(host):
    r = host.flocker("sync", timeout=S(120) + 60)
    assert r.returncode == 0, r.stdout + r.stderr
    return _newest(host.dataset)


def _power_cut(p, h):
    """h goes down hard: its daemon and its user system are killed, its
    dataset is unmounted and its key unloaded, as after a reboot (the
    daemon is not started again here)."""
    d = p.d[h]
    d.proc.kill()
    d.proc.wait(timeout=S(30))
    pidfile = os.path.join(h.bed.workdir, "svc-%s.pid" % h.name)
    if os.path.exists(pidfile):
        with open(pidfile) as f:
            try:
                os.kill(int(f.read()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        os.remove(pidfile)
    if zget(h.dataset, "mounted") == "yes":
        bedmod.sh(["zfs", "unmount", h.dataset])
    bedmod.sh(["zfs", "unload-key", h.dataset])


def _read_with_key(ds):
    """{file: sha256} of ds (a kept dataset, a replica) whose key is not
    loaded: loaded for the look, from the passphrase, and unloaded again
    (with the key of its encryption root)."""
    root = zget(ds, "encryptionroot")
    loaded = zget(root, "keystatus") == "available"
    if not loaded:
        bedmod.sh(["zfs", "load-key", "-L", "prompt", root], input=PASSPHRASE)
    try:
        return files_in(ds)
    finally:
        if not loaded:
            bedmod.sh(["zfs", "unload-key", root], check=False)


def _settled_on(p, want, timeout):
    """p settles with `want` serving; the daemons' logs when it does not."""
    try:
        winner = wait_for(p.settled, timeout, step=0.2,
                          what="one master serving and its slave up to date")
    except AssertionError:
        for h, d in p.d.items():
            print("==== %s\n%s" % (d.log, "".join(d.log_text().splitlines(True)[-60:])))
        raise
    assert winner is want, (winner, want)


def test_an_old_master_rebooted_without_its_key_loses_keeps_its_data_and_takes_raw(
        encryption, lanbed):
    """alpha serves, beta is its raw replica (no key).  The link is cut:
    beta takes over (key_command loads its key), both write.  alpha goes
    down and comes back without its key (not loaded, and its key file is
    not at hand), and the link returns.  beta, which serves, wins; alpha
    measures and keeps its divergent data without the key (a raw measure,
    rename, clone, promote: none needs it), becomes beta's slave and takes
    beta's raw increment.  'check' on alpha says it could not take over and
    why; with the key back, the kept dataset holds everything alpha wrote."""
    bed = lanbed
    a, b = bed.a, bed.b
    keys = _keys(bed)
    _encrypted(a, keys[a])
    p = Pair(bed, "most-changes", cluster={"send_flags": "-w"},
             service={"key_command": KEY_COMMAND.format(w=bed.workdir)})
    kept_before = preserved(a)
    try:
        assert zget(b.dataset, "keystatus") == "unavailable"
        written = p.split({a: 200000, b: 100000})
        assert zget(b.dataset, "keystatus") == "available"
        _power_cut(p, a)
        os.rename(keys[a], keys[a] + ".away")
        # alpha comes back with no key_command: it reads its key from the
        # dataset's keylocation, a file that is not there
        bed.write_config(cluster={"replication_interval": "0.5", "send_flags": "-w",
                                  "divergence_policy": "most-changes"},
                         service={"start_command": START.format(w=bed.workdir),
                                  "stop_command": STOP.format(w=bed.workdir)},
                         path=p.config[a])
        p.heal()
        p.start(a)
        _settled_on(p, b, S(120))
        kept = [k for k in preserved(a) if k not in kept_before]
        assert len(kept) == 1, kept
        assert zget(a.dataset, "keystatus") == "unavailable"
        assert _guid(a.dataset, _newest(b.dataset)) == _guid(b.dataset, _newest(b.dataset))
        r = a.flocker("check", config=p.config[a])
        assert r.returncode == 2 and "could not take over" in r.stdout and \
            "does not exist on this node" in r.stdout, r.stdout
        # raw replication goes on into the keyless replica
        since = time.time()
        write_files(b, n=2, size=50000)
        wait_for(lambda: replicated(p.d[b], since), S(60), step=0.2)
    finally:
        p.stop()
    os.rename(keys[a] + ".away", keys[a])
    old = _read_with_key(kept[0])
    for name, digest in written[a].items():
        assert old.get(name) == digest, name
    have = files_in(b.dataset)
    for name, digest in written[b].items():
        assert have.get(name) == digest, name
    assert _read_with_key(a.dataset) == files_in(b.dataset)


def test_after_a_power_cut_of_both_the_verdict_and_the_loser_need_no_key(encryption, lanbed):
    """A split brain (both serve and write, alpha more), then both hosts
    lose power and come back with their keys unloaded, and neither key at
    hand.  Neither serves as the link returns, so most-changes decides:
    both measure their changes without a key (the raw stream's size, alike
    on both sides), and alpha wins.  beta keeps its divergent data without
    its key and becomes alpha's slave; alpha cannot load its key, so it
    does not serve, and says why, until its key is back: then it loads it,
    serves, and beta takes its raw increment.  Nothing is lost."""
    bed = lanbed
    a, b = bed.a, bed.b
    keys = _keys(bed)
    _encrypted(a, keys[a])
    p = Pair(bed, "most-changes", cluster={"send_flags": "-w"},
             service={"key_command": KEY_COMMAND.format(w=bed.workdir)})
    kept_before = preserved(b)
    try:
        written = p.split({a: 300000, b: 100000})
        for h in (a, b):
            _power_cut(p, h)
            os.rename(keys[h], keys[h] + ".away")
        p.heal()
        p.start(a)
        p.start(b)
        # the verdict, and the loser's part, need no key
        wait_for(lambda: p.d[b].status()["role"] == "slave" and
                 len(preserved(b)) > len(kept_before), S(120), step=0.2,
                 what="beta, the loser, to keep its data and become slave")
        for h in (a, b):
            assert "alpha wins: it changed more" in h.flocker("history",
                                                               config=p.config[h]).stdout
        # the winner cannot load its key: it does not serve, and says why
        wait_for(lambda: "keys/alpha.key: No such file or directory; this node does not "
                 "take over until it can" in p.d[a].log_text(), S(60), step=0.2)
        assert not any(serving(d) for d in p.d.values())
        assert zget(a.dataset, "keystatus") == "unavailable"
        os.rename(keys[a] + ".away", keys[a])
        _settled_on(p, a, S(120))
        assert zget(a.dataset, "keystatus") == "available"
        assert zget(b.dataset, "keystatus") == "unavailable"
        kept = [k for k in preserved(b) if k not in kept_before]
        assert len(kept) == 1, kept
        since = time.time()
        write_files(a, n=2, size=50000)
        wait_for(lambda: replicated(p.d[a], since), S(60), step=0.2)
    finally:
        p.stop()
    os.rename(keys[b] + ".away", keys[b])
    old = _read_with_key(kept[0])
    for name, digest in written[b].items():
        assert old.get(name) == digest, name
    have = files_in(a.dataset)
    for name, digest in written[a].items():
        assert have.get(name) == digest, name
    assert _read_with_key(b.dataset) == have
