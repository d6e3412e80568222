"""The test bed proves itself: real ZFS, two namespaces, real ssh."""

import contextlib
import os
import signal
import time

import pytest

import bed as bedmod


def test_send_over_ssh_between_namespaces(bed):
    a, b = bed.a, bed.b
    # alpha and beta really are apart: each owns only its own address
    assert a.run(["ip", "-o", "-4", "addr", "show", "eth0"]).stdout.split()[3] == "192.0.2.1/28"
    assert b.run(["ip", "-o", "-4", "addr", "show", "eth0"]).stdout.split()[3] == "192.0.2.2/28"
    bedmod.sh(["zfs", "create", a.dataset])
    mnt = os.path.join(a.pool.mountpoint, "shop")
    payload = os.urandom(300000)
    with open(os.path.join(mnt, "data.bin"), "wb") as f:
        f.write(payload)
    os.makedirs(os.path.join(mnt, "sub"))
    with open(os.path.join(mnt, "sub", "note.txt"), "w") as f:
        f.write("written on alpha\n")
    a.run(["zfs", "snapshot", a.dataset + "@bed1"])
    want = bedmod.tree_digest(mnt)

    # the pipe runs inside namespace A; zfs recv runs on B through B's sshd
    ssh = a.ssh_command(b, ["zfs", "recv", "-u", b.dataset])
    send = "zfs send %s@bed1 | %s" % (a.dataset, " ".join(ssh))
    a.run(["sh", "-c", send], timeout=120)

    guid = lambda ds: bedmod.sh(["zfs", "get", "-H", "-p", "-o", "value", "guid", ds]).stdout.strip()
    assert guid(a.dataset + "@bed1") == guid(b.dataset + "@bed1")
    bedmod.sh(["zfs", "mount", b.dataset])
    got = bedmod.tree_digest(os.path.join(b.pool.mountpoint, "shop"))
    assert got == want and len(got) == 2


def test_cut_and_restore_link(bed):
    # each sshd serves the other host from the start (the bed waited only
    # for them to listen)
    assert bedmod.sh(bed.b.ssh_argv(bed.a, ["true"]), check=False).returncode == 0
    ping = bed.a.ssh_argv(bed.b, ["true"])
    assert bedmod.sh(ping, check=False).returncode == 0
    bed.cut_link()
    assert bedmod.sh(ping, check=False).returncode == 255
    bed.restore_link()
    assert bedmod.sh(ping, check=False).returncode == 0


def test_kill_host_processes(bed):
    p = bed.a.popen(["sleep", "300"])
    killed = bed.a.kill_all(keep_sshd=True)
    assert p.wait(timeout=5) == -9
    assert bed.a.sshd.pid not in killed and bed.a.sshd.poll() is None


def test_a_process_started_on_a_host_is_on_it_when_popen_returns(bed):
    """nsenter enters the namespace a moment after it starts: Host.popen
    waits for that, so a kill_all (the host's process list) right after it
    finds the process (before, under a parallel run's load, a kill_all
    missed about 1 in 10)."""
    ns = os.stat("/run/netns/" + bed.a.ns)
    procs = []
    try:
        for _ in range(20):
            procs.append(bed.a.popen(["sleep", "300"]))
            net = os.stat("/proc/%d/ns/net" % procs[-1].pid)
            assert (net.st_dev, net.st_ino) == (ns.st_dev, ns.st_ino)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_stale_leftovers_of_a_dead_run_are_removed(zfs_ready, tmp_path):
    """A run that died leaves a pool, a namespace and a work dir named after
    its pid; the next run removes them, and leaves live runs' alone."""
    import subprocess, sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = "%s%dx1" % (bedmod.PREFIX, dead.pid)
    workdir = os.path.join(bedmod.WORK_BASE, stale + "bed")
    os.makedirs(workdir)
    vdev = os.path.join(workdir, "v.img")
    with open(vdev, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    bedmod.sh(["zpool", "create", "-f", "-m", os.path.join(workdir, "m"), stale + "p", vdev])
    bedmod.sh(["ip", "netns", "add", stale + "n"])
    live = bedmod.unique("live")
    bedmod.sh(["ip", "netns", "add", live])
    try:
        bedmod.cleanup_stale()
        pools = bedmod.sh(["zpool", "list", "-H", "-o", "name"]).stdout.split()
        spaces = bedmod.sh(["ip", "netns", "list"]).stdout
        assert stale + "p" not in pools
        assert stale + "n" not in spaces
        assert not os.path.exists(workdir)
        assert live in spaces
    finally:
        bedmod.sh(["ip", "netns", "del", live], check=False)
        bedmod.sh(["zpool", "destroy", "-f", stale + "p"], check=False)
        bedmod.sh(["ip", "netns", "del", stale + "n"], check=False)


def test_a_stale_pool_busy_for_a_moment_is_removed_all_the_same(zfs_ready):
    """zfs-fuse calls a pool busy for a moment (under load right after it
    was made, or while a process still sits in it): removing a dead run's
    pool tries again, as Pool.destroy does (in a parallel run the test
    above once found the pool it had just made still there)."""
    import shutil, subprocess, sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = "%s%dx1" % (bedmod.PREFIX, dead.pid)
    workdir = os.path.join(bedmod.WORK_BASE, stale + "bed")
    os.makedirs(workdir)
    vdev = os.path.join(workdir, "v.img")
    with open(vdev, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    mnt = os.path.join(workdir, "m")
    bedmod.sh(["zpool", "create", "-f", "-m", mnt, stale + "p", vdev])
    busy = subprocess.Popen(["sleep", "1"], cwd=mnt)     # "pool is busy" for 1 s
    try:
        bedmod.cleanup_stale()
        assert stale + "p" not in bedmod.sh(["zpool", "list", "-H", "-o", "name"]).stdout.split()
        assert not os.path.exists(workdir)
    finally:
        busy.kill()
        busy.wait()
        bedmod.sh(["zpool", "destroy", "-f", stale + "p"], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


def test_slow_factors_scale_timings_and_reject_nonsense():
    """FLOCKER_TEST_SLOW and FLOCKER_TEST_SLOW_PACKETS (measured and set by
    contrib/test-openzfs.sh under emulation) scale the bed's timings and
    packet rates; a value that is not a factor >= 1 stops the run with a
    message saying what to set."""
    import subprocess, sys
    code = "import bed; print(bed.SLOW, bed.SLOW_PACKETS, bed.scaled(0.2))"

    def run(**env_vars):
        env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
        for k in ("FLOCKER_TEST_SLOW", "FLOCKER_TEST_SLOW_PACKETS"):
            env.pop(k, None)
        env.update(env_vars)
        return subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)

    assert run().stdout.split() == ["1.0", "1.0", "0.2"]
    assert run(FLOCKER_TEST_SLOW="").stdout.split() == ["1.0", "1.0", "0.2"]
    assert run(FLOCKER_TEST_SLOW="6").stdout.split() == ["6.0", "6.0", "%s" % (0.2 * 6)]
    assert run(FLOCKER_TEST_SLOW="6", FLOCKER_TEST_SLOW_PACKETS="40").stdout.split() == [
        "6.0", "40.0", "%s" % (0.2 * 6)]
    for name in ("FLOCKER_TEST_SLOW", "FLOCKER_TEST_SLOW_PACKETS"):
        for bad in ("x", "0.5", "nan", "1e9", "-3"):
            p = run(**{name: bad})
            assert p.returncode != 0 and "%s=%r: expected a number from 1 to 1000" % (
                name, bad) in p.stderr and "unset it on ordinary hardware" in p.stderr, bad


def test_calibration_measures_this_machine():
    import subprocess, sys
    p = subprocess.run([sys.executable, bedmod.__file__, "calibrate"],
                       stdout=subprocess.PIPE, universal_newlines=True, check=True)
    cpu, packets = (float(x) for x in p.stdout.split())
    assert 0 < cpu < 60 and 0 < packets < 60


def test_each_test_has_a_zfs_fuse_of_its_own_and_one_that_hangs_is_replaced(zfs_ready):
    """On zfs-fuse each test gets a new daemon of its own (a child of the
    test process, in the test process's own mount namespace): the machine
    sees none of its pools or mounts.  One daemon for the machine wore out
    and hung mid-run, failing every test after it (CI of b414b90).  A
    daemon that stops answering (SIGSTOP here) is replaced by the next
    ensure_zfs: killed, its dead mounts gone, a new one answering."""
    if zfs_ready != "zfs-fuse":
        pytest.skip("not on this ZFS: kernel ZFS is the machine's own, not the test's")
    daemon = bedmod._zfs_fuse["proc"]
    assert daemon is not None and daemon.poll() is None
    with open("/proc/%d/stat" % daemon.pid) as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()   # its parent
    mine = os.stat("/proc/self/ns/mnt").st_ino
    assert os.stat("/proc/%d/ns/mnt" % daemon.pid).st_ino == mine
    machine = "/proc/%d/fd/%d" % (os.getpid(), bedmod._zfs_fuse["machine"])
    assert os.stat(machine).st_ino != mine

    workdir = os.path.join(bedmod.WORK_BASE, bedmod.unique("own"))
    os.makedirs(workdir)
    pool = bedmod.Pool(workdir, "own", size_mb=64)
    try:
        bedmod.sh(["zfs", "create", pool.name + "/ds"])
        seen = bedmod.sh(["nsenter", "--mount=" + machine, "sh", "-c",
                          "zpool list -H -o name 2>&1; cat /proc/self/mounts"],
                         check=False).stdout
        assert pool.name not in seen
        assert pool.name + "/ds" in open("/proc/self/mounts").read()

        daemon.send_signal(signal.SIGSTOP)          # it hangs
        started = time.monotonic()
        bedmod.ensure_zfs()
        assert time.monotonic() - started < 40
        assert daemon.poll() == -signal.SIGKILL
        new = bedmod._zfs_fuse["proc"]
        assert new.pid != daemon.pid and new.poll() is None
        assert "fuse.zfs" not in open("/proc/self/mounts").read()
        assert bedmod.sh(["zpool", "list", "-H", "-o", "name"]).stdout.split() == []
        again = bedmod.Pool(workdir, "again", size_mb=64)
        again.destroy()
    finally:
        with contextlib.suppress(ProcessLookupError):
            daemon.send_signal(signal.SIGCONT)
        bedmod.sh(["zpool", "destroy", "-f", pool.name], check=False)
        bedmod._remove_workdir(workdir)
