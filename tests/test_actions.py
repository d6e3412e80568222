"""Promotion and demotion for real: ZFS, service commands, the service
address with gratuitous ARP seen by the other host, the notify hook, and a
kill -9 at every step followed by recovery."""

import os
import subprocess
import time
import types

import pytest

from conftest import dataset_context, ff
import bed as bedmod

SERVICE_ADDR = "192.0.2.14"     # inside link 0's 192.0.2.0/28

@pytest.fixture
def pair(bed, tmp_path):
    """alpha master with data; beta slave holding a read-only replica."""
    a, b = bed.a, bed.b
    marks = os.path.join(bed.workdir, "marks")
    os.makedirs(marks)
    svc = ("sh -c 'touch %s/running-$FLOCKER_NODE; echo start $FLOCKER_EPOCH $FLOCKER_DATASET "
           ">> %s/log-$FLOCKER_NODE'" % (marks, marks))
    stop = ("sh -c 'rm -f %s/running-$FLOCKER_NODE; echo stop $FLOCKER_EPOCH "
            ">> %s/log-$FLOCKER_NODE'" % (marks, marks))
    notify = ("sh -c 'echo \"$FLOCKER_OLD_ROLE $FLOCKER_NEW_ROLE $FLOCKER_EPOCH $FLOCKER_REASON\" "
              ">> %s/notify-$FLOCKER_NODE'" % marks)
    bed.write_config(service={"start_command": svc, "stop_command": stop,
                              "notify_command": notify,
                              "service_address": SERVICE_ADDR + "/28 dev eth0"})
    assert a.flocker("init", "--role", "master").returncode == 0
    mnt = os.path.join(a.pool.mountpoint, "shop")
    for i in range(5):
        with open(os.path.join(mnt, "file%d" % i), "wb") as f:
            f.write(os.urandom(50000))
    bedmod.sh(["zfs", "snapshot", a.dataset + "@flocker-2-20260101T000000Z"])
    want = bedmod.tree_digest(mnt)
    bedmod.zfs_pipe([a.dataset + "@flocker-2-20260101T000000Z"], ["-u", b.dataset])
    bedmod.sh(["zfs", "set", "readonly=on", b.dataset])
    assert b.flocker("init", "--role", "slave").returncode == 0
    # alpha learns new neighbours from gratuitous ARP (a switch or router would)
    a.run(["sysctl", "-q", "-w", "net.ipv4.conf.eth0.arp_accept=1"])

    class Pair:
        pass
    p = Pair()
    p.bed, p.a, p.b, p.marks, p.want = bed, a, b, marks, want

    p.drive = bed.drive
    return p


def props(ds):
    out = bedmod.sh(["zfs", "get", "-H", "-p", "-o", "property,value", "mounted,readonly",
                     ds]).stdout
    return dict(line.split("\t") for line in out.splitlines())


def has_address(host):
    return (SERVICE_ADDR + "/28") in host.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout


def role_of(host):
    with ff.StateStore.open(host.state_db) as s:
        st = s.node_state()
        return st.role, st.epoch, s.unfinished_intent()


def assert_consistent(p, host, role):
    r, epoch, intent = role_of(host)
    running = os.path.exists(os.path.join(p.marks, "running-" + host.name))
    pr = props(host.dataset)
    assert intent is None
    assert r == role
    if role == "master":
        assert running and has_address(host)
        assert pr == {"mounted": "yes", "readonly": "off"}
    else:
        assert not running and not has_address(host)
        assert pr["mounted"] == "no"
        bedmod.sh(["zfs", "get", "-H", "readonly", host.dataset])
    return epoch


def test_promote_then_demote(pair):
    p, b = pair, pair.b
    proc = p.drive(b, "promote", 3)
    assert proc.returncode == 0, proc.stderr
    assert assert_consistent(p, b, "master") == 3
    # the replica became the live dataset with every file of the snapshot
    assert bedmod.tree_digest(os.path.join(b.pool.mountpoint, "shop")) == p.want
    # start_command saw its environment; the notify hook ran with the roles
    assert open(os.path.join(p.marks, "log-beta")).read() == "start 3 %s\n" % b.dataset
    assert open(os.path.join(p.marks, "notify-beta")).read() == "slave master 3 test promotion\n"
    # alpha's ARP table learned beta's MAC for the service address
    mac = b.run(["ip", "-o", "link", "show", "eth0"]).stdout.split("link/ether ")[1].split()[0]
    neigh = p.a.run(["ip", "neigh", "show", SERVICE_ADDR, "dev", "eth0"]).stdout
    assert "lladdr %s" % mac in neigh, neigh

    proc = p.drive(b, "demote", 3)
    assert proc.returncode == 0, proc.stderr
    assert_consistent(p, b, "slave")
    assert props(b.dataset)["readonly"] == "on"
    assert open(os.path.join(p.marks, "log-beta")).read().splitlines()[-1] == "stop 3"
    assert open(os.path.join(p.marks, "notify-beta")).read().splitlines()[-1] == \
        "master slave 3 test demotion"
    with ff.StateStore.open(b.state_db) as s:
        kinds = [e["kind"] for e in s.events(50)]
    assert kinds.count("promote") == 2 and kinds.count("demote") == 2 and "role" in kinds


def test_kill_9_at_every_step_then_recover(pair):
    """Killed at any step, the next start finishes the action: the service
    runs exactly when the role is master, and no data is lost."""
    p, b = pair, pair.b
    epoch = 0
    for i in range(max(len(ff.PROMOTE_STEPS), len(ff.DEMOTE_STEPS))):
        if i < len(ff.PROMOTE_STEPS):
            epoch = ff.next_epoch(epoch, 1)
            step = ff.PROMOTE_STEPS[i]
            proc = p.drive(b, "promote", epoch, failpoint="promote:" + step)
            assert proc.returncode == -9, (step, proc.stderr)
            assert role_of(b)[2]["step"] == step
            proc = p.drive(b, "recover")
            assert proc.returncode == 0 and proc.stdout.strip() == "promote", proc.stderr
            assert assert_consistent(p, b, "master") == epoch
            assert bedmod.tree_digest(os.path.join(b.pool.mountpoint, "shop")) == p.want
        else:
            epoch = ff.next_epoch(epoch, 1)
            assert p.drive(b, "promote", epoch).returncode == 0
        step = ff.DEMOTE_STEPS[i % len(ff.DEMOTE_STEPS)]
        proc = p.drive(b, "demote", epoch, failpoint="demote:" + step)
        assert proc.returncode == -9, (step, proc.stderr)
        proc = p.drive(b, "recover")
        assert proc.returncode == 0 and proc.stdout.strip() == "demote", proc.stderr
        assert_consistent(p, b, "slave")
    # nothing left to recover
    assert p.drive(b, "recover").stdout.strip() == "None"


def test_failing_start_command_is_retried_and_reported(pair):
    p, b = pair, pair.b
    p.bed.write_config(service={"start_command": "false", "stop_command": "true",
                                "command_timeout": "5"})
    proc = p.drive(b, "promote", 3)
    assert proc.returncode == 1
    assert "start_command failed 3 times, last: 'false' exited 1" in proc.stderr
    r, epoch, intent = role_of(b)
    assert (r, epoch, intent["step"]) == ("master", 3, "start")   # left open to be finished


def test_the_service_address_is_up_before_the_start_and_down_after_the_stop(pair):
    """A user system that binds the service address (PostgreSQL's usual HA
    setting, listen_addresses = '<service address>') starts: the address
    comes up before start_command and goes only after stop_command, as
    keepalived and Pacemaker order them.  A failed start gives the address
    back, so a node whose user system is not running never answers on it."""
    p, b = pair, pair.b
    script = os.path.join(p.marks, "svc.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\n"
                "if [ \"$1\" = start ]; then\n"
                "  python3 -c 'import socket; socket.socket().bind((\"%s\", 0))' || exit 1\n"
                "fi\n"
                "if ip -o addr show dev eth0 | grep -q ' %s/'; then\n"
                "  echo \"$1 had the address\" >> %s/order\n"
                "else\n"
                "  echo \"$1 without the address\" >> %s/order\n"
                "fi\n" % (SERVICE_ADDR, SERVICE_ADDR, p.marks, p.marks))
    os.chmod(script, 0o755)
    p.bed.write_config(service={"start_command": script + " start",
                                "stop_command": script + " stop",
                                "service_address": SERVICE_ADDR + "/28 dev eth0",
                                "command_timeout": "5"})
    proc = p.drive(b, "promote", 3)
    assert proc.returncode == 0, proc.stderr
    assert has_address(b)
    proc = p.drive(b, "demote", 3)
    assert proc.returncode == 0, proc.stderr
    assert not has_address(b)
    with open(os.path.join(p.marks, "order")) as f:
        assert f.read().splitlines() == ["start had the address", "stop had the address"]

    p.bed.write_config(service={"start_command": "false", "stop_command": "true",
                                "service_address": SERVICE_ADDR + "/28 dev eth0",
                                "command_timeout": "5"})
    proc = p.drive(b, "promote", 5)
    assert proc.returncode == 1 and "start_command failed" in proc.stderr
    assert not has_address(b)


def test_status_on_a_slave_shows_the_replica_it_holds(pair):
    """A slave holding a current copy is not 'replicated never': status
    names the newest snapshot its replica holds and its age."""
    p, b = pair, pair.b
    text = b.flocker("status", check=True).stdout
    assert "replicated  never" not in text, text
    line = [ln for ln in text.splitlines() if ln.startswith("replica ")]
    assert line and "holds flocker-2-20260101T000000Z, made 2026-01-01 00:00:00 UTC" in line[0], text
    # the master, which has not replicated yet, still says so
    text = p.a.flocker("status", check=True).stdout
    assert "replicated  never" in text and "\nreplica " not in text


def test_start_command_writes_to_its_file_system_before_readonly_off_is_waited_for(pair):
    """The promotion runs start_command once the dataset is mounted read
    and write (zfs mount -o rw), not once readonly=off has ended too (it
    ends while start_command runs): the user system can write at once, and
    the finished promotion leaves the property off."""
    p, b = pair, pair.b
    p.bed.write_config(service={"start_command": "sh -c 'echo $FLOCKER_EPOCH > \"$(zfs get -H "
                                                 "-o value mountpoint $FLOCKER_DATASET)/started\"'",
                                "stop_command": "true", "command_timeout": "10"})
    proc = p.drive(b, "promote", 3)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(b.pool.mountpoint, "shop", "started")) as f:
        assert f.read() == "3\n"
    assert props(b.dataset) == {"mounted": "yes", "readonly": "off"}
    assert role_of(b) == ("master", 3, None)


def test_readonly_off_failing_after_start_command_fails_the_promotion(tmp_path):
    """_start_and_mark waits for readonly=off after start_command: when it
    failed, the step raises (the promotion fails at its step "start", which
    runs again when it is finished off), the role marker's set begun
    meanwhile is waited for, and so is readonly=off when start_command
    itself keeps failing: no zfs command is left running."""
    class Running:
        def __init__(self, fails):
            self.fails, self.waited = fails, 0

        def wait(self, check=True):
            self.waited += 1
            if self.fails and check:
                raise ff.ZfsError("'zfs set readonly=off p/shop' failed: pool I/O is "
                                  "currently suspended")
            return subprocess.CompletedProcess([], 1 if self.fails else 0, b"", b"")

    marker, writable, started = Running(False), Running(True), []

    class Z:
        def start(self, argv):
            started.append(argv)
            return marker
    ran = tmp_path / "started"
    ctx = dataset_context("p/shop", Z())
    ctx.cfg.service = types.SimpleNamespace(start_command=("sh", "-c", "echo > %s" % ran),
                                            command_timeout=10, service_address=None)
    with pytest.raises(ff.ZfsError, match="readonly=off"):
        ff._start_and_mark(ctx, {}, "beta master 3", writable)
    assert ran.exists()         # start_command had run
    assert started == [["set", "flocker:role=beta master 3", "p/shop"]] and marker.waited
    assert writable.waited

    # a start_command that keeps failing: readonly=off is waited for too
    writable = Running(False)
    ctx.cfg.service.start_command = ("false",)
    with pytest.raises(ff.ActionError, match="start_command failed 3 times"):
        ff._start_and_mark(ctx, {}, "beta master 3", writable)
    assert writable.waited


def test_a_timeline_says_where_the_time_went():
    """A promotion's timeline (its event-log line): each mark in ms after
    the origin, a command with its own length, the origin as Unix time."""
    tl = ff.Timeline(100.0, "the peer's silence passed dead_time")
    tl.mark("decided", 100.0012)
    tl.marks.append((100.0105, "zfs set readonly=off (9.3 ms)"))
    text = tl.text()
    assert text.startswith("ms after the peer's silence passed dead_time (Unix time ")
    assert text.endswith("): +1.2 decided; +10.5 zfs set readonly=off (9.3 ms)")
    assert ff._command_label(["zfs", "set", "readonly=off", "p/ds"]) == "zfs set readonly=off"
    assert ff._command_label(["zfs", "mount", "p/ds"]) == "zfs mount p/ds"


def test_one_listing_answers_what_a_promotion_asks():
    """MountView: the dataset and what is below it, from one `zfs list -r`:
    volume or not, mounted, the resume token (OpenZFS), and the file
    systems to mount below it, parents first."""
    plain, openzfs = ff.ZfsFeatures(), ff.ZfsFeatures(resumable=True)
    assert ff.MountView.args("p/shop", plain) == [
        "list", "-H", "-o", "name,type,mounted,canmount,mountpoint", "-r", "-t",
        "filesystem,volume", "p/shop"]
    assert ff.MountView.args("p/shop", openzfs)[3].endswith(",receive_resume_token")
    text = ("p/shop\tfilesystem\tno\ton\t/m/shop\t1-abc\n"
            "p/shop/b\tfilesystem\tno\ton\t/m/shop/b\t-\n"
            "p/shop/a/x\tfilesystem\tno\ton\t/m/shop/a/x\t-\n"
            "p/shop/a\tfilesystem\tyes\ton\t/m/shop/a\t-\n"
            "p/shop/n\tfilesystem\tno\tnoauto\t/m/shop/n\t-\n"
            "p/shop/l\tfilesystem\tno\ton\tlegacy\t-\n"
            "p/shop/v\tvolume\t-\t-\t-\t-\n"
            "p/shop2\tfilesystem\tno\ton\t/m/shop2\t-\n")
    v = ff.MountView.parse(text, "p/shop", resumable=True)
    assert v.exists() and not v.is_volume() and not v.mounted("p/shop")
    assert v.mounted("p/shop/a") and v.resume_token() == "1-abc"
    assert v.to_mount_below() == ["p/shop/a", "p/shop/a/x", "p/shop/b"]
    vol = ff.MountView.parse("p/vol\tvolume\t-\t-\t-\n", "p/vol", resumable=False)
    assert vol.is_volume() and vol.resume_token() == "" and vol.to_mount_below() == []
    assert not ff.MountView.parse("", "p/gone", resumable=False).exists()


def test_a_read_only_zfs_mount_is_seen_in_mountinfo():
    """After readonly=off and the mount ran side by side, a mount the kernel
    holds read-only (OpenZFS: the mount read readonly=on first) is found
    by its per-mount options and mounted again; zfs-fuse's FUSE mounts
    follow the property inside zfs-fuse and never count."""
    text = ("36 35 98:0 / /mnt/shop ro,noatime shared:1 - zfs tank/shop rw,xattr\n"
            "37 35 98:0 / /mnt/my\\040shop rw shared:2 - zfs tank/my\\040shop ro\n"
            "38 35 0:50 / /var/tmp/x/shop ro,nosuid - fuse tank/fuse rw,user_id=0\n")
    assert ff.read_only_in_mountinfo(text, "tank/shop")
    assert not ff.read_only_in_mountinfo(text, "tank/my shop")   # the super options differ
    assert not ff.read_only_in_mountinfo(text, "tank/fuse")
    assert not ff.read_only_in_mountinfo(text, "tank/other")


def test_kill_receives_stops_only_receives_into_the_dataset(pool):
    """A promotion stops a zfs recv still running into its dataset (or one
    below it), found by the program's name (comm) and then its command
    line; a receive into another dataset, and other processes, stay."""
    p = pool.name
    procs = {}
    for name in ("shop", "shop/child", "shopping"):
        procs[name] = subprocess.Popen(["zfs", "recv", "-u", "%s/%s" % (p, name)],
                                       stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
    other = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.5)     # (each waits for its stream)
        killed = ff.kill_receives(p + "/shop", grace=5.0)
        assert sorted(killed) == sorted([procs["shop"].pid, procs["shop/child"].pid])
        assert procs["shop"].wait(5) is not None and procs["shop/child"].wait(5) is not None
        assert procs["shopping"].poll() is None and other.poll() is None
    finally:
        for proc in list(procs.values()) + [other]:
            proc.kill()
            proc.wait()
