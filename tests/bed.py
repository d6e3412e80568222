"""The test bed: real ZFS, two hosts in network namespaces, real sshd.

Everything this module creates carries the name prefix ``fft<pid>x``, where
<pid> is the pytest process that made it (in a parallel run, the xdist
worker: each has its own).  A later run removes what a dead run left behind
(its pid no longer exists), and never touches what a live run (another
worker, another checkout, a helper) is using.

Addresses: only 192.0.2.0/24 (TEST-NET-1), and only inside namespaces made
here.  Link i joins <host A> 192.0.2.(16*i+1)/28 and <host B>
192.0.2.(16*i+2)/28 over a veth pair that exists only between the two
namespaces, so no packet can leave them.  With ipv6=True the links carry
2001:db8:<i>::1/64 and 2001:db8:<i>::2/64 (the IPv6 documentation range)
instead.

With lan=True a third namespace, the LAN (a client and the arbitrator),
holds a bridge 192.0.2.158/28; each host joins it with its interface lan0
(alpha 192.0.2.145, beta 192.0.2.146).  The service address is
192.0.2.150/28 dev lan0; the arbitrator is 192.0.2.158 port 9 (nothing
listens: the LAN's kernel refuses the connection, which proves the path).
"""

import atexit
import contextlib
import fcntl
import ipaddress
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "flocker_failover.py")
PREFIX = "fft"
OWNER = os.getpid()
TAG = "%s%dx" % (PREFIX, OWNER)
_STALE_RE = re.compile(r"^%s(\d+)x" % PREFIX)
WORK_BASE = "/var/tmp"          # not /tmp: a RAM disk in the OpenZFS guest
ZFS_FUSE_PIDFILE = "/run/zfs-fuse.pid"
MACHINE_LOCK = "/run/flocker-test-bed.lock"
_counter = itertools.count(1)

# Running the program.  The bed starts flocker_failover.py some 1,700
# times in a run of the suite (the CLI, the actions driver, the ssh gate,
# the daemons).  Run as the script, CPython compiles all its lines every
# time (about 0.2 s of CPU on the 2-core test machine; the code of a script
# run as __main__ is never cached, nor anything else here under
# PYTHONDONTWRITEBYTECODE): most of what the suite's own processes compute.
# So the bed runs it through tests/run_program.py, which imports the module
# flocker_failover with its bytecode cached in PYCACHE (this process's own,
# removed with what it leaves: _stale) and calls the same main() with the
# same arguments.  The tests of the program as a user runs it (the quick
# start, the init script, the systemd unit, the CLI's own tests, the gate run
# by hand, exec_daemon_as_module) run PROGRAM itself, as do the program's
# own children (the gate runs PROGRAM for a peer's flocker request).
PYCACHE = os.path.join(WORK_BASE, TAG + "pycache")
atexit.register(shutil.rmtree, PYCACHE, True)
# The program run as a program (by its path) keeps its compiled code in
# FLOCKER_CODE_CACHE (flocker_failover.py's _cached_main): here, not in the
# machine's /var/cache, and removed with the rest.
os.environ.setdefault("FLOCKER_CODE_CACHE", os.path.join(PYCACHE, "code"))
RUN_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_program.py")


def program(*args):
    """The command line that runs flocker_failover.py ARGS, imported (above)."""
    return [sys.executable, RUN_PROGRAM, PYCACHE] + [str(a) for a in args]


def runs_program(words):
    """True when a process's command line (/proc/PID/cmdline split at NUL,
    as bytes) runs flocker_failover.py: as the script, or as program() does."""
    return PROGRAM.encode() in words or RUN_PROGRAM.encode() in words


def _factor(name, default):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 1.0 <= value <= 1000.0:
        raise SystemExit("%s=%r: expected a number from 1 to 1000 (how many times "
                         "slower than ordinary hardware this machine runs the tests; "
                         "contrib/test-openzfs.sh measures it for its qemu guest); "
                         "unset it on ordinary hardware" % (name, raw))
    return value


# How many times slower than ordinary hardware this machine runs the tests
# (default 1: as written).  contrib/test-openzfs.sh measures both for its
# qemu guest, which under software emulation (TCG) here is about 19 times
# slower at computing and 36 to 42 times slower at system calls:
#   FLOCKER_TEST_SLOW          the bed's heartbeat timings, and the timing
#                              margins and waits of the tests that measure
#                              them, are multiplied by it;
#   FLOCKER_TEST_SLOW_PACKETS  packet rates (the forged-packet flood) are
#                              divided by it (default: FLOCKER_TEST_SLOW).
SLOW = _factor("FLOCKER_TEST_SLOW", 1.0)
SLOW_PACKETS = _factor("FLOCKER_TEST_SLOW_PACKETS", SLOW)


def scaled(seconds):
    """A duration of the test bed (a heartbeat timing, a margin, a wait)
    on this machine: seconds * FLOCKER_TEST_SLOW."""
    return seconds * SLOW


def calibrate(rounds=5):
    """Seconds this machine takes for a fixed piece of computing and for a
    fixed number of UDP packets (sent, received, HMAC-checked over
    loopback), the best of `rounds`; comparing them between two machines
    gives FLOCKER_TEST_SLOW and FLOCKER_TEST_SLOW_PACKETS."""
    import hashlib
    import hmac
    import socket
    cpu = packets = float("inf")
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        b.settimeout(5)
        packet = b"x" * 200
        for _ in range(rounds):
            t = time.perf_counter()
            sum(i * i for i in range(1000000))
            cpu = min(cpu, time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(2000):
                a.sendto(packet, b.getsockname())
                hmac.new(b"k" * 32, b.recv(2048), hashlib.sha256).digest()
            packets = min(packets, time.perf_counter() - t)
    finally:
        a.close()
        b.close()
    return cpu, packets


class BedUnavailable(Exception):
    """The machine lacks something the bed needs (root, zfs, netns...)."""


def unique(tag=""):
    """A name no other run, and no earlier test of this run, uses."""
    return "%s%d%s" % (TAG, next(_counter), tag)


def sh(argv, check=True, timeout=60, **kw):
    """Run a command on the machine itself; raise with its output on failure."""
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError("%s exited %d\nstdout: %s\nstderr: %s"
                           % (argv, proc.returncode, proc.stdout, proc.stderr))
    return proc


def zfs_pipe(send_args, recv_args, timeout=60):
    """zfs send SEND_ARGS | zfs recv RECV_ARGS on the machine itself (a
    test's set-up, not the product's replication).  zfs-fuse's client talks
    to its daemon over a socket, and once in a few hundred runs under the
    suite's load a receive failed there with nothing received: died of
    SIGPIPE with nothing on stderr, or "I/O error" (neither reproduced in
    360 of the same receives run in a loop with both cores busy).  On zfs-fuse those two cases,
    and only when the target snapshot does not exist afterwards, are tried
    once more, said on stdout with the target's state.  The "I/O error"
    was also seen with the target snapshot there afterwards (test_preserve,
    4 times in a day under the suite's load): when its GUID is the sent
    snapshot's, everything was received and committed, and the error came
    after; said on stdout, and taken as received."""
    target = "%s@%s" % (recv_args[-1], send_args[-1].rpartition("@")[2])
    for attempt in (1, 2):
        send = subprocess.Popen(["zfs", "send"] + list(send_args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            recv = subprocess.run(["zfs", "recv"] + list(recv_args), stdin=send.stdout,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            send.kill()          # the receive hung: the sender goes too
            send.wait()
            raise
        finally:
            send.stdout.close()
        send_err = send.stderr.read().decode(errors="replace")
        send.stderr.close()
        send_rc = send.wait(timeout=timeout)
        if recv.returncode == 0 and send_rc == 0:
            return
        flake = ((recv.returncode == -signal.SIGPIPE and not recv.stderr.strip())
                 or recv.stderr.strip().endswith(": I/O error"))
        if flake and zfs_kind() == "zfs-fuse":
            got = [sh(["zfs", "get", "-H", "-o", "value", "guid", name], check=False)
                   for name in (target, send_args[-1])]
            if got[0].returncode == 0 and got[0].stdout.strip() == got[1].stdout.strip():
                print("zfs_pipe: zfs recv %s failed on zfs-fuse (exit %d, %r), but %s is "
                      "there with the GUID of %s (%s): received"
                      % (" ".join(recv_args), recv.returncode, recv.stderr.strip(), target,
                         send_args[-1], got[0].stdout.strip()))
                return
        if attempt == 1 and flake and zfs_kind() == "zfs-fuse" and sh(
                ["zfs", "list", "-H", "-t", "snapshot", "-o", "name", target],
                check=False).returncode != 0:
            state = sh(["zfs", "get", "-H", "-o", "property,value", "mounted,readonly,origin",
                        recv_args[-1]], check=False)
            print("zfs_pipe: zfs recv %s failed on zfs-fuse (exit %d, %r) with nothing "
                  "received; target: %s; trying once more"
                  % (" ".join(recv_args), recv.returncode, recv.stderr.strip(),
                     " ".join((state.stdout or state.stderr).split())))
            continue
        raise RuntimeError("zfs send %s | zfs recv %s: send exited %d (%s), recv exited %d "
                           "(%s)" % (" ".join(send_args), " ".join(recv_args), send_rc,
                                     send_err.strip(), recv.returncode, recv.stderr.strip()))


def _pid_alive(pid):
    """True while pid runs; a zombie has ended (its parent reaps it)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _stale(name):
    m = _STALE_RE.match(name)
    return bool(m) and int(m.group(1)) != OWNER and not _pid_alive(int(m.group(1)))


# ---------------------------------------------------------------------------
# ZFS
# ---------------------------------------------------------------------------

# zfs-fuse: every process that runs the bed (a pytest worker, the campaign,
# a bench, the demo) runs its own zfs-fuse daemon in a mount namespace of its
# own, and conftest gives every test a new daemon.  One daemon for the whole
# machine wore out (it keeps threads of pools long destroyed) and hung in
# the middle of runs (CI of b414b90: 26 tests after the hang failed; here
# two runs in three): one test's trouble took every test after it along.
# The zfs and zpool commands find their daemon through /run/zfs/zfs_socket
# and it keeps its pools in /var/lib/zfs/zpool.cache, its lock (one daemon
# to a lock) in /var/lock/zfs: the private namespace mounts empty
# directories of its own there.  Its mounts of / (and of the
# work directory, /run, /var/lib where they are mounts of their own) are
# slaves of the machine's, so nothing mounted here (the daemon's datasets,
# those directories) leaves it, and shared with the namespaces made from it
# (the hosts' sshd, Pacemaker's nodes), which see the datasets mounted.
# /run/netns stays in common with the machine: namespaces made here are
# seen and cleaned by other runs.  Kernel ZFS (OpenZFS) is used as it is.

# its socket; its zpool.cache; its lock (one daemon per lock)
ZFS_FUSE_DIRS = ("/run/zfs", "/var/lib/zfs", "/run/lock/zfs")
_zfs_fuse = {"namespace": False, "proc": None, "kind": None, "machine": None}


def zfs_kind():
    """'openzfs' or 'zfs-fuse' (what the test bed runs against)."""
    if _zfs_fuse["kind"] is None:
        proc = sh(["zfs", "version"], check=False)
        _zfs_fuse["kind"] = ("openzfs" if proc.returncode == 0 and "zfs-" in proc.stdout
                             else "zfs-fuse")
    return _zfs_fuse["kind"]


def _zpool_works(timeout=20):
    try:
        return sh(["zpool", "list", "-H"], check=False, timeout=timeout).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _private_zfs_fuse():
    """True when this process runs its own zfs-fuse (no kernel ZFS here)."""
    return not os.path.exists("/dev/zfs") and shutil.which("zfs-fuse") is not None


def ensure_zfs(fresh=False):
    """Make ZFS usable for this process.  Kernel ZFS is used as it is.
    Otherwise this process's own zfs-fuse: started on first use, in a mount
    namespace of its own; started again when it has died or does not answer
    within 10 s; and with fresh=True (conftest, at each test's start) a new
    one in any case, so that no test meets what an earlier one left."""
    if os.geteuid() != 0:
        raise BedUnavailable("needs root (ZFS pools, network namespaces, sshd)")
    if shutil.which("zfs") is None or shutil.which("zpool") is None:
        raise BedUnavailable("no zfs/zpool command (apt-get install zfs-fuse)")
    if not _private_zfs_fuse():
        if not _zpool_works():
            raise BedUnavailable("ZFS does not answer ('zpool list' fails); with kernel "
                                 "ZFS, is the module loaded ('modprobe zfs')?")
        _remove_stale_pools()
        return
    _enter_private_mount_namespace()
    proc = _zfs_fuse["proc"]
    if not fresh and proc is not None and proc.poll() is None and _zpool_works(timeout=10):
        return
    _stop_zfs_fuse()
    _start_zfs_fuse()


def _mounts():
    """(mount point, fs type) of this thread's mount namespace, in order."""
    out = []
    with open("/proc/thread-self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((point, fields[fields.index("-") + 1]))
    return out


def _mount_point(path):
    """The mount point path is on (the longest mount point above it)."""
    path = os.path.realpath(path)
    points = [p for p, _ in _mounts()
              if path == p or path.startswith(p.rstrip("/") + "/")]
    return max(points, key=len)


def _enter_private_mount_namespace():
    if _zfs_fuse["namespace"]:
        return
    if shutil.which("ip") and "/run/netns" not in {p for p, _ in _mounts()}:
        # 'ip netns add' makes /run/netns a mount of its own the first time:
        # made here, in the machine's namespace, so that it stays in common
        probe = unique("probe")
        sh(["ip", "netns", "add", probe], check=False)
        sh(["ip", "netns", "del", probe], check=False)
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    _zfs_fuse["machine"] = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY)  # (for tests)
    if libc.unshare(0x00020000) != 0:                    # CLONE_NEWNS
        raise BedUnavailable("unshare(CLONE_NEWNS) failed (%s): the test bed runs its "
                             "zfs-fuse in a mount namespace of its own"
                             % os.strerror(ctypes.get_errno()))
    _zfs_fuse["namespace"] = True
    for point in sorted({_mount_point(p) for p in ("/",) + ZFS_FUSE_DIRS + (WORK_BASE,)}):
        sh(["mount", "--make-slave", point])
        sh(["mount", "--make-shared", point])
    for path in ZFS_FUSE_DIRS:
        os.makedirs(path, exist_ok=True)
        sh(["mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", TAG + "zfs", path])


def _die_with_parent():
    # (in the child, before exec) killed when the test process ends, however
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)           # PR_SET_PDEATHSIG


def _start_zfs_fuse():
    d = os.path.join(WORK_BASE, TAG + "zfs-fuse")
    os.makedirs(d, exist_ok=True)
    logfile = os.path.join(d, "zfs-fuse.log")
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(
            ["zfs-fuse", "--no-daemon", "--no-kstat-mount", "-p",
             os.path.join(d, "zfs-fuse.pid")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_die_with_parent)
    _zfs_fuse["proc"] = proc
    deadline = time.monotonic() + 30
    while not _zpool_works(timeout=10):
        if proc.poll() is not None:
            raise BedUnavailable("zfs-fuse exited %d as it started; see %s"
                                 % (proc.returncode, logfile))
        if time.monotonic() > deadline:
            raise BedUnavailable("zfs-fuse does not answer 30 s after it started; "
                                 "see %s" % logfile)
        time.sleep(0.01)


def _stop_zfs_fuse():
    """kill -9 this process's zfs-fuse; unmount what it left mounted (dead
    FUSE mounts: "transport endpoint is not connected", and a new daemon
    would not mount over them); forget its pools and socket."""
    proc, _zfs_fuse["proc"] = _zfs_fuse["proc"], None
    if proc is not None:
        proc.kill()
        try:
            proc.wait(timeout=90)        # a wedged one takes a while to die
        except subprocess.TimeoutExpired:
            raise BedUnavailable("zfs-fuse (pid %d) did not end 90 s after kill -9"
                                 % proc.pid)
    for point, fstype in reversed(_mounts()):
        if fstype == "fuse.zfs":
            sh(["umount", "-l", point], check=False)
    for path in ZFS_FUSE_DIRS:
        for name in os.listdir(path):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))


def _destroy_pool(name):
    """zpool destroy -f, tried again for a few seconds: zfs-fuse calls a
    pool busy for a moment (under load, right after it was made, or while
    a process still sits in it).  True when it is gone."""
    for pause in (0.1, 0.3, 1.0, 2.0, None):
        if sh(["zpool", "destroy", "-f", name], check=False).returncode == 0:
            return True
        if pause:
            time.sleep(pause)
    return False


def _remove_stale_pools():
    proc = sh(["zpool", "list", "-H", "-o", "name"], check=False)
    for name in proc.stdout.split():
        if _stale(name):
            _destroy_pool(name)
    for entry in os.listdir(WORK_BASE):
        if _stale(entry):
            _remove_workdir(os.path.join(WORK_BASE, entry))


def _remove_workdir(path):
    # pools first: a vdev file of a live pool must not vanish under it
    shutil.rmtree(path, ignore_errors=True)


class Pool:
    """A pool on a sparse file, named uniquely, mounted under the work dir."""

    def __init__(self, workdir, tag, size_mb=256):
        self.name = unique(tag)
        self.vdev = os.path.join(workdir, self.name + ".img")
        self.mountpoint = os.path.join(workdir, "mnt", self.name)
        with open(self.vdev, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        os.makedirs(self.mountpoint, exist_ok=True)
        sh(["zpool", "create", "-f", "-m", self.mountpoint, self.name, self.vdev])

    def destroy(self):
        _destroy_pool(self.name)
        if os.path.exists(self.vdev):
            os.unlink(self.vdev)


# ---------------------------------------------------------------------------
# Hosts: network namespaces with their own sshd
# ---------------------------------------------------------------------------

def _remove_stale_namespaces():
    proc = sh(["ip", "netns", "list"], check=False)
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if _stale(name):
            _kill_namespace(name)
            sh(["ip", "netns", "del", name], check=False)


def _netns_pids(ns):
    proc = sh(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in proc.stdout.split()]


def _kill_namespace(ns, sig=signal.SIGKILL, keep=(), poll=0.05):
    """Kill every process in namespace ns but keep; returns once they died
    (looking every `poll` s: tearing down, a short poll; a test's kill_all
    keeps 0.05 s, on which test_example_postgresql's dead_at, taken when
    it returns, counts: the dead host's answers still on their way come in
    before it)."""
    pids = [p for p in _netns_pids(ns) if p not in keep]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(poll)
    return pids


def _listening(pid, port):
    """The addresses on which a TCP socket listens on port in the network
    namespace of process pid (its /proc/PID/net/tcp and tcp6)."""
    out = set()
    for table in ("tcp", "tcp6"):
        try:
            with open("/proc/%d/net/%s" % (pid, table)) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, _, hexport = local.partition(":")
            if state != "0A" or int(hexport, 16) != port:      # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)      # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out.add(str(ipaddress.ip_address(raw)))
    return out


class Host:
    """One host: a network namespace, its addresses, its sshd, its pool."""

    def __init__(self, bed, name, ns, addresses):
        self.bed = bed
        self.name = name            # node name in the config: alpha / beta
        self.ns = ns
        self.addresses = addresses  # one per link
        self.address = addresses[0]
        self.pool = None
        self.dataset = None
        self.sshd = None
        self.host_key = os.path.join(bed.workdir, "ssh", "host_%s" % name)
        self.state_db = os.path.join(bed.workdir, name, "state.db")

    # running things "on" this host
    def argv(self, argv):
        # Only the network namespace: the hosts share the test process's
        # mount namespace, as its zfs-fuse does (a private one, as 'ip netns
        # exec' makes, would keep a 'zfs unmount' from reaching the daemon).
        return ["nsenter", "--net=/run/netns/" + self.ns] + list(argv)

    def run(self, argv, check=True, timeout=60, **kw):
        return sh(self.argv(argv), check=check, timeout=timeout, **kw)

    def popen(self, argv, **kw):
        """Start argv on this host; returns once it runs in the host's
        namespace (nsenter enters it a moment after it starts), so the
        host's process list (kill_all) holds it from then on."""
        proc = subprocess.Popen(self.argv(argv), **kw)
        ns = os.stat("/run/netns/" + self.ns)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                net = os.stat("/proc/%d/ns/net" % proc.pid)
            except OSError:
                break
            if (net.st_dev, net.st_ino) == (ns.st_dev, ns.st_ino):
                break
            time.sleep(0.001)
        return proc

    def flocker(self, *args, check=False, timeout=60, config=None):
        """Run flocker_failover.py on this host against the bed's config."""
        argv = program("--config", config or self.bed.config_path, "--node", self.name,
                       *args)
        return self.run(argv, check=check, timeout=timeout)

    def ssh_command(self, target, remote_argv, gated=False):
        """The ssh command line (to run on this host) that reaches target:
        with the test's own unrestricted key, or (gated) with flocker's key,
        whose requests target's ssh gate serves."""
        b = self.bed
        return ["ssh", "-i", b.client_key if gated else b.admin_key, "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=" + b.known_hosts,
                "-o", "ConnectTimeout=5", "root@" + target.address, "--"] + list(remote_argv)

    def ssh_argv(self, target, remote_argv, gated=False):
        """ssh from this host to target host, ready to run from anywhere."""
        return self.argv(self.ssh_command(target, remote_argv, gated=gated))

    def kill_all(self, keep_sshd=False):
        """kill -9 every process running in this host's namespace."""
        keep = (self.sshd.pid,) if (keep_sshd and self.sshd) else ()
        return _kill_namespace(self.ns, keep=keep)

    def kill_sshd(self):
        """kill -9 this host's sshd and every session it serves (an ssh
        ControlMaster connection would outlive the listener alone)."""
        pids = []
        for pid in _netns_pids(self.ns):
            try:
                with open("/proc/%d/comm" % pid) as f:
                    if f.read().strip() == "sshd":
                        pids.append(pid)
            except OSError:
                pass
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.sshd is not None:
            self.sshd.wait(timeout=10)
        return pids

    def start_sshd(self):
        b = self.bed
        cfg = os.path.join(b.workdir, "ssh", "sshd_%s.conf" % self.name)
        with open(cfg, "w") as f:
            for addr in self.addresses:
                f.write("ListenAddress %s\n" % addr)
            f.write("Port 22\nHostKey %s\nAuthorizedKeysFile %s\nPidFile %s\n"
                    "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
                    "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                    "MaxStartups 100:30:200\nLogLevel ERROR\n"
                    % (self.host_key, b.authorized_keys,
                       os.path.join(b.workdir, "ssh", "sshd_%s.pid" % self.name)))
        os.makedirs("/run/sshd", exist_ok=True)
        # Root's ~/.bashrc may be slow (pyenv init adds ~0.1 s per remote
        # command): sshd runs in its own mount namespace with an empty one.
        bashrc = os.path.join(pwd.getpwuid(0).pw_dir, ".bashrc")
        neutral = os.path.join(b.workdir, "ssh", "bashrc")
        open(neutral, "w").close()
        script = "exec /usr/sbin/sshd -D -e -f \"$1\""
        if os.path.exists(bashrc):
            script = "mount --bind \"$2\" \"$3\" && " + script
        log = open(os.path.join(b.workdir, "ssh", "sshd_%s.log" % self.name), "ab")
        self.sshd = self.popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, "sh",
             cfg, neutral, bashrc], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    def __repr__(self):
        return "<Host %s ns=%s %s>" % (self.name, self.ns, ",".join(self.addresses))


class Bed:
    """Two hosts, alpha and beta, joined by `links` veth pairs, each with
    its own sshd and pool; a shared secret and a config file for both."""

    SERVICE_ADDRESS = "192.0.2.150"
    ARBITRATOR = "192.0.2.158:9"

    def __init__(self, links=1, pool_mb=256, lan=False, ipv6=False):
        self.ipv6 = ipv6      # the links (heartbeats, ssh) in 2001:db8::/32 instead
        self.workdir = os.path.join(WORK_BASE, unique("bed"))
        os.makedirs(os.path.join(self.workdir, "ssh"), mode=0o700)
        self.links = links
        self.pools = []
        self.hosts = []
        self.lan_ns = None
        self.config_path = os.path.join(self.workdir, "flocker.conf")
        self.gate_log = None
        try:
            self.gate_log = SyslogSink(os.path.join(self.workdir, "ssh", "syslog.sock"))
            self._make_hosts(links)
            if lan:
                self._make_lan()
            self._make_keys()
            for h in self.hosts:
                h.pool = Pool(self.workdir, h.name[0], size_mb=pool_mb)
                self.pools.append(h.pool)
                h.dataset = h.pool.name + "/shop"
                os.makedirs(os.path.dirname(h.state_db), exist_ok=True)
                h.start_sshd()
            self._wait_for_sshd()
            self.secret_file = os.path.join(self.workdir, "secret")
            with open(os.open(self.secret_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            self.write_config()
        except BaseException:
            self.close()
            raise

    @property
    def a(self):
        return self.hosts[0]

    @property
    def b(self):
        return self.hosts[1]

    def _make_hosts(self, links):
        if not all(shutil.which(c) for c in ("ip", "unshare", "nsenter")):
            raise BedUnavailable("needs iproute2 (ip netns) and util-linux (unshare, nsenter)")
        if shutil.which("sshd") is None and not os.path.exists("/usr/sbin/sshd"):
            raise BedUnavailable("needs openssh-server (sshd)")
        for name, last in (("alpha", 1), ("beta", 2)):
            ns = unique(name[0])
            sh(["ip", "netns", "add", ns])
            addrs = ([str(ipaddress.ip_address("2001:db8:%d::%d" % (i, last)))
                      for i in range(links)] if self.ipv6
                     else ["192.0.2.%d" % (16 * i + last) for i in range(links)])
            self.hosts.append(Host(self, name, ns, addrs))
        a, b = self.hosts
        for ns in (a.ns, b.ns):
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        for i in range(links):
            dev = "eth%d" % i
            sh(["ip", "link", "add", "name", dev, "netns", a.ns, "type", "veth",
                "peer", "name", dev, "netns", b.ns])
            for h in (a, b):
                if self.ipv6:      # (no duplicate address detection: usable at once)
                    sh(["ip", "-n", h.ns, "addr", "add", h.addresses[i] + "/64", "dev", dev,
                        "nodad"])
                else:
                    sh(["ip", "-n", h.ns, "addr", "add", h.addresses[i] + "/28", "dev", dev])
                sh(["ip", "-n", h.ns, "link", "set", dev, "up"])

    def _make_lan(self):
        self.lan_ns = unique("c")
        sh(["ip", "netns", "add", self.lan_ns])
        c = self.lan_ns
        sh(["ip", "-n", c, "link", "set", "lo", "up"])
        sh(["ip", "-n", c, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", c, "addr", "add", "192.0.2.158/28", "dev", "br0"])
        sh(["ip", "-n", c, "link", "set", "br0", "up"])
        for h, last in zip(self.hosts, (145, 146)):
            port = "lan" + h.name[0]
            sh(["ip", "link", "add", "name", "lan0", "netns", h.ns, "type", "veth",
                "peer", "name", port, "netns", c])
            sh(["ip", "-n", c, "link", "set", port, "master", "br0"])
            sh(["ip", "-n", c, "link", "set", port, "up"])
            sh(["ip", "-n", h.ns, "addr", "add", "192.0.2.%d/28" % last, "dev", "lan0"])
            sh(["ip", "-n", h.ns, "link", "set", "lan0", "up"])

    def lan_run(self, argv, check=True, timeout=60):
        """Run a command in the LAN namespace (the client's view)."""
        return sh(["nsenter", "--net=/run/netns/" + self.lan_ns] + list(argv),
                  check=check, timeout=timeout)

    def cut_lan(self, host):
        """host loses the LAN (and so the arbitrator and its clients)."""
        sh(["ip", "-n", host.ns, "link", "set", "lan0", "down"])

    def restore_lan(self, host):
        sh(["ip", "-n", host.ns, "link", "set", "lan0", "up"])

    def lan_mac(self, host):
        """The MAC address of host's lan0."""
        out = sh(["ip", "-n", host.ns, "-o", "link", "show", "lan0"]).stdout
        return out.split("link/ether ")[1].split()[0]

    def neighbour(self, address):
        """The MAC the LAN's ARP table holds for address ('' if none)."""
        out = self.lan_run(["ip", "neigh", "show", address, "dev", "br0"]).stdout
        return out.split("lladdr ")[1].split()[0] if "lladdr" in out else ""

    def _make_keys(self):
        """Two client keys, both accepted by both sshds: flocker's own
        (ssh_identity in the config), whose line forces the ssh gate as in
        contrib/ssh/authorized_keys.example, so every replication request
        goes through the gate; and an unrestricted one for the tests' own
        commands (ssh_command)."""
        d = os.path.join(self.workdir, "ssh")
        self.client_key = os.path.join(d, "client")
        self.admin_key = os.path.join(d, "admin")
        for key in (self.client_key, self.admin_key):
            sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "flocker-test",
                "-f", key])
        self.authorized_keys = os.path.join(d, "authorized_keys")
        # the options of the example line, with this checkout's program (run
        # as program() runs it) and the bed's config and syslog socket
        with open(os.path.join(ROOT, "contrib", "ssh", "authorized_keys.example")) as f:
            example = [ln for ln in f if ln.strip() and not ln.startswith("#")][0]
        options = example.split(" ssh-ed25519 ")[0]
        installed = "/usr/local/sbin/flocker_failover.py --config /etc/flocker/flocker.conf"
        assert installed in options, options
        self.gate_options = options.replace(installed, " ".join(program(
            "--config", self.config_path, "--syslog-socket", self.gate_log.path)))
        with open(self.client_key + ".pub") as f:
            gated = f.read().strip()
        with open(self.admin_key + ".pub") as f:
            admin = f.read().strip()
        with open(self.authorized_keys, "w") as f:
            f.write("%s %s\n%s\n" % (self.gate_options, gated, admin))
        self.known_hosts = os.path.join(d, "known_hosts")
        with open(self.known_hosts, "w") as kh:
            for h in self.hosts:
                sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", h.host_key])
                with open(h.host_key + ".pub") as f:
                    key = " ".join(f.read().split()[:2])
                kh.write("%s %s\n" % (",".join(h.addresses), key))

    def _wait_for_sshd(self, timeout=15):
        """Until both sshds listen on all their addresses (a connection
        made from then on is served: test_bed checks that both ways).
        Read from the hosts' own socket tables, not by connecting: an ssh
        handshake costs 0.25 s and 0.2 s of CPU here, two for every bed."""
        for h in self.hosts:
            deadline = time.monotonic() + timeout
            while True:
                if h.sshd.poll() is not None:
                    raise RuntimeError("sshd of %s exited %s" % (h, h.sshd.returncode))
                if set(h.addresses) <= _listening(h.sshd.pid, 22):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("sshd of %s did not listen within %ds" % (h, timeout))
                time.sleep(0.01)

    def write_config(self, cluster=None, service=None, nodes=None, path=None):
        """Write a config for both hosts; dicts override/add options
        (value None removes one).  Returns its path."""
        sections = {
            "cluster": {"name": "bed", "secret_file": self.secret_file,
                        "heartbeat_interval": "%g" % scaled(0.2),
                        "dead_time": "%g" % scaled(1.0),
                        "startup_wait": "%g" % scaled(1.0), "ssh_identity": self.client_key,
                        "ssh_known_hosts": self.known_hosts,
                        "ssh_connect_timeout": "5"},
            "service": {},
        }
        for h in self.hosts:
            sections["node %s" % h.name] = {
                "address": ", ".join(h.addresses), "dataset": h.dataset,
                "state_db": h.state_db}
        for key, extra in (("cluster", cluster), ("service", service)):
            sections[key].update(extra or {})
        for name, extra in (nodes or {}).items():
            sections["node %s" % name].update(extra)
        path = path or self.config_path
        with open(path, "w") as f:
            for section, opts in sections.items():
                f.write("[%s]\n" % section)
                for k, v in opts.items():
                    if v is not None:
                        f.write("%s = %s\n" % (k, v))
                f.write("\n")
        return path

    def drive(self, host, action, *args, failpoint=None):
        """Run one action of flocker_failover.py (promote, demote, preserve,
        recover) on host, in a process of its own, as the daemon would.
        failpoint: kill -9 that process at the named step."""
        env = dict(os.environ)
        if failpoint:
            env["FLOCKER_FAILPOINT"] = failpoint
        return sh(host.argv([sys.executable, "-c", _DRIVER, RUN_PROGRAM, PYCACHE,
                             self.config_path, host.name, action] + [str(a) for a in args]),
                  check=False, env=env, timeout=120)

    def cut_link(self, i=None):
        """Pull the cable: link i (default: all links) goes down on both ends."""
        for n in (range(self.links) if i is None else [i]):
            for h in self.hosts:
                sh(["ip", "-n", h.ns, "link", "set", "eth%d" % n, "down"])

    HEARTBEAT_TABLE = 117   # a routing table of the hosts' own, for drop_heartbeats

    def drop_heartbeats(self, host, port=7788):
        """One direction of the heartbeat link fails: every UDP packet to
        `port` that arrives at host on a link is dropped on arrival (policy
        routing into a blackhole, as a firewall rule would), while host's
        own packets, and ssh both ways, still flow.  (These machines have no
        netfilter: the local table moves behind a rule that sends heartbeats
        into a table holding only blackholes.)"""
        ns, t = host.ns, str(self.HEARTBEAT_TABLE)
        for addr in host.addresses:
            sh(["ip", "-n", ns, "route", "replace", "blackhole", addr, "table", t])
        for n in range(self.links):
            sh(["ip", "-n", ns, "rule", "add", "pref", "10", "iif", "eth%d" % n,
                "ipproto", "udp", "dport", str(port), "table", t])
        if "20:" not in sh(["ip", "-n", ns, "rule", "show"]).stdout:
            sh(["ip", "-n", ns, "rule", "add", "pref", "20", "table", "local"])
            sh(["ip", "-n", ns, "rule", "del", "pref", "0", "table", "local"])

    def allow_heartbeats(self, host, port=7788):
        for n in range(self.links):
            sh(["ip", "-n", host.ns, "rule", "del", "pref", "10", "iif", "eth%d" % n,
                "ipproto", "udp", "dport", str(port), "table", str(self.HEARTBEAT_TABLE)],
               check=False)

    def throttle(self, host, mbit):
        """Limit what host sends on every link to mbit Mbit/s (None: no limit),
        e.g. to keep a transfer on the wire long enough to interrupt it."""
        for n in range(self.links):
            if mbit is None:
                sh(["tc", "-n", host.ns, "qdisc", "del", "dev", "eth%d" % n, "root"],
                   check=False)
            else:
                sh(["tc", "-n", host.ns, "qdisc", "replace", "dev", "eth%d" % n, "root",
                    "tbf", "rate", "%gmbit" % mbit, "burst", "64kb", "latency", "2000ms"])

    def throttle_link(self, i, mbit):
        """Narrow link i to mbit Mbit/s each way (None: no limit): tc's
        token bucket on both ends; what exceeds the rate waits in its queue
        (up to 2 s), heartbeats included."""
        for h in self.hosts:
            if mbit is None:
                sh(["tc", "-n", h.ns, "qdisc", "del", "dev", "eth%d" % i, "root"], check=False)
            else:
                sh(["tc", "-n", h.ns, "qdisc", "replace", "dev", "eth%d" % i, "root", "tbf",
                    "rate", "%gmbit" % mbit, "burst", "32kb", "latency", "2000ms"])

    def restore_link(self, i=None):
        for n in (range(self.links) if i is None else [i]):
            for h in self.hosts:
                sh(["ip", "-n", h.ns, "link", "set", "eth%d" % n, "up"])

    def close(self):
        """Tear everything down; safe to call on a half-built bed."""
        for h in self.hosts:
            _kill_namespace(h.ns, poll=0.005)
            if h.sshd is not None:
                h.sshd.wait(timeout=10)
            sh(["ip", "netns", "del", h.ns], check=False)
        if self.lan_ns is not None:
            _kill_namespace(self.lan_ns, poll=0.005)
            sh(["ip", "netns", "del", self.lan_ns], check=False)
        for p in self.pools:
            p.destroy()
        if self.gate_log is not None:
            self.gate_log.close()
        _remove_workdir(self.workdir)


class SyslogSink:
    """A datagram socket standing in for /dev/log (the bed's gates log to
    it): every message sent to path is kept; records() splits off the
    <priority> prefix."""

    def __init__(self, path):
        import socket
        import threading
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except OSError:
                continue
            if self._stop:          # (close()'s wake-up)
                break
            self.messages.append(data.decode("utf-8", "replace").rstrip("\0\n"))

    def records(self):
        """(priority, text) of every message so far."""
        out = []
        for m in list(self.messages):
            match = re.match(r"^<(\d+)>(.*)$", m, re.S)
            out.append((int(match.group(1)), match.group(2)) if match else (None, m))
        return out

    def wait_for(self, *needles, timeout=10):
        """(priority, text) of the first message containing every needle;
        AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for prio, text in self.records():
                if all(n in text for n in needles):
                    return prio, text
            time.sleep(0.05)
        raise AssertionError("no syslog message with %r in %r" % (needles, self.messages))

    def close(self):
        import socket
        self._stop = True
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as wake:
            wake.setblocking(False)
            try:                # (not waiting out recv's timeout: 0.2 s a bed)
                wake.sendto(b"", self.path)
            except OSError:
                pass
        self._thread.join(timeout=2)
        self.sock.close()


_DRIVER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_program", sys.argv[1])
run_program = importlib.util.module_from_spec(spec); spec.loader.exec_module(run_program)
ff = run_program.load(sys.argv[2])      # (imported: see "Running the program")
cfg = ff.load_config(sys.argv[3], sys.argv[4])
store = ff.StateStore.open(cfg.local.state_db, lock_for="test driver")
ctx = ff.Context(cfg, store, ff.Zfs())
action, args = sys.argv[5], sys.argv[6:]
if action == "promote":
    ff.promote(ctx, int(args[0]), "test promotion")
elif action == "demote":
    ff.demote(ctx, int(args[0]), "test demotion")
elif action == "preserve":
    print(ff.preserve_divergence(ctx, args[0], int(args[1]), "test divergence"))
elif action == "recover":
    print(ff.recover_intent(ctx))
else:
    raise SystemExit("unknown action " + action)
"""


@contextlib.contextmanager
def machine_lock():
    """Held while a run removes what dead runs left (conftest's zfs_ready):
    the workers of a parallel run (pytest-xdist), and other runs on this
    machine, start their sessions at the same time."""
    with open(MACHINE_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cleanup_stale():
    """Remove what dead runs left: namespaces, pools, work directories."""
    _remove_stale_namespaces()
    _remove_stale_pools()


def tree_digest(path):
    """sha256 of every regular file below path, by relative name."""
    import hashlib
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


if __name__ == "__main__":
    # contrib/test-openzfs.sh: "python3 tests/bed.py calibrate"
    if sys.argv[1:] != ["calibrate"]:
        raise SystemExit("usage: python3 tests/bed.py calibrate")
    print("%.6f %.6f" % calibrate())
