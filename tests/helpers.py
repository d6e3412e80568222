"""Helpers shared by the test modules: daemons on the bed and their
timings, the user system the failover tests run, replication by hand, split
brains.  Test modules import from here (and from conftest, bed), never from
one another; fixtures live in conftest.py."""

import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import bed as bedmod
from conftest import ff


# ---------------------------------------------------------------------------
# daemons on the bed
# ---------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
WRAPPER = os.path.join(HERE, "daemon_wrapper.py")
# The bed's heartbeat_interval and dead_time.  Under FLOCKER_TEST_SLOW=N
# (software emulation, see bed.py) they, and every margin and wait of the
# tests, are N times longer, and the flood's rate is FLOCKER_TEST_SLOW_PACKETS
# times lower: the same tests in proportion.
INTERVAL = bedmod.scaled(0.2)
DEAD = bedmod.scaled(1.0)
S = bedmod.scaled


class Running:
    """One daemon process on a test host, its log in the bed's work dir:
    flocker_failover.py imported (bed.program()), or with wrapper=True
    through daemon_wrapper.py, or with script=True run as the script, as
    a user runs it (it then execs itself as a module: exec_daemon_as_module)."""

    def __init__(self, host, *extra, env=None, wrapper=False, script=False, tag="",
                 config=None, state_db=None):
        self.host = host
        self.state_db = state_db or host.state_db    # where its control socket is
        self.log = os.path.join(host.bed.workdir, "daemon-%s%s.log" % (host.name, tag))
        args = ["--config", config or host.bed.config_path, "--node", host.name,
                "daemon"] + list(extra)
        if script:
            argv = [sys.executable, bedmod.PROGRAM] + args
        elif wrapper:
            argv = [sys.executable, WRAPPER, bedmod.PYCACHE] + args
        else:
            argv = bedmod.program(*args)
        # FFT_PYTHON runs the daemons under another interpreter (e.g. 3.8)
        argv[0] = os.environ.get("FFT_PYTHON", argv[0])
        full_env = dict(os.environ, **(env or {}))
        with open(self.log, "ab") as f:
            self.proc = host.popen(argv, stdout=f, stderr=f, stdin=subprocess.DEVNULL,
                                   env=full_env)

    def status(self):
        answer = ff.query_daemon(self.state_db, {"cmd": "status"}, timeout=S(5))
        assert answer is not None and answer["ok"], answer
        return answer["status"]

    def request(self, cmd):
        return ff.query_daemon(self.state_db, {"cmd": cmd}, timeout=S(5))

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + S(timeout)
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_text()
            try:
                if self.request("ping"):
                    return self
            except ff.FlockerError:
                pass
            time.sleep(0.02)
        raise AssertionError("daemon did not come up:\n" + self.log_text())

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def log_lines(self):
        return len(self.log_text().splitlines())

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)   # nsenter passes it on by exec
        return self.proc.wait(timeout=S(timeout))


def wait_for(predicate, timeout, step=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("%s not met within %g s" % (what, timeout))


def init(bed):
    assert bed.a.flocker("init", "--role", "master").returncode == 0
    assert bed.b.flocker("init", "--role", "slave").returncode == 0


def start_pair(bed, **kw):
    a = Running(bed.a, **kw)
    b = Running(bed.b, **kw)
    return a.wait_ready(), b.wait_ready()


# ---------------------------------------------------------------------------
# the user system and automatic failover
# ---------------------------------------------------------------------------

# The user system: a sleeping process whose pid is kept in the work dir.
# start is idempotent (a running one is kept), refuses to run unless the
# dataset is mounted (it writes nothing there: no divergence), and
# appends "start EPOCH TIME" to its node's log; stop appends "stop ...".
START = ("sh -c 'mp=$(zfs get -H -o value mountpoint $FLOCKER_DATASET) && "
         "[ \"$(zfs get -H -o value mounted $FLOCKER_DATASET)\" = yes ] && "
         "[ -w \"$mp\" ] && "
         "echo start $FLOCKER_EPOCH $(date +%s.%N) >> {w}/svc-$FLOCKER_NODE.log && "
         "{{ [ -f {w}/svc-$FLOCKER_NODE.pid ] && kill -0 $(cat {w}/svc-$FLOCKER_NODE.pid) "
         "2>/dev/null || {{ setsid sleep 100000 </dev/null >/dev/null 2>&1 & "
         "echo $! > {w}/svc-$FLOCKER_NODE.pid; }}; }}'")
STOP = ("sh -c 'echo stop $FLOCKER_EPOCH $(date +%s.%N) >> {w}/svc-$FLOCKER_NODE.log; "
        "[ -f {w}/svc-$FLOCKER_NODE.pid ] && kill $(cat {w}/svc-$FLOCKER_NODE.pid) "
        "2>/dev/null; rm -f {w}/svc-$FLOCKER_NODE.pid; true'")


# the options service_config wrote last (a test writes the same to another file)
last_service_config = {}


def service_config(bed, **extra):
    w = bed.workdir
    service = {"start_command": START.format(w=w), "stop_command": STOP.format(w=w),
               "service_address": "%s/28 dev lan0" % bed.SERVICE_ADDRESS}
    service.update(extra.pop("service", {}))
    cluster = {"replication_interval": "0.5"}
    cluster.update(extra.pop("cluster", {}))
    last_service_config.clear()
    last_service_config.update(cluster=cluster, service=service, **extra)
    return bed.write_config(cluster=cluster, service=service, **extra)


def svc_log(host):
    path = os.path.join(host.bed.workdir, "svc-%s.log" % host.name)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(w[0], int(w[1]), float(w[2])) for w in (line.split() for line in f) if w]


def svc_running(host):
    """The user system's process runs on host (pid file and process)."""
    path = os.path.join(host.bed.workdir, "svc-%s.pid" % host.name)
    try:
        with open(path) as f:
            return bedmod._pid_alive(int(f.read()))
    except (OSError, ValueError):
        return False


def zget(ds, prop):
    return bedmod.sh(["zfs", "get", "-H", "-o", "value", prop, ds]).stdout.strip()


def serving(d):
    s = d.status()
    return s["role"] == "master" and s["serving"]


def replicated(master, since=0.0):
    """Without `since`: the master's daemon confirmed that the slave holds
    its newest snapshot.  With `since` (wall clock): a cycle that started
    after it ended well, so its snapshot (everything written before
    `since`) is on the slave: zfs recv took it.  (A cycle that carried data
    starts again at once, so under a steady writer the master's newest
    snapshot is often the next cycle's, which the slave does not hold yet:
    the state file's replication history says what the slave received.)"""
    if since:
        with ff.StateStore.open(master.host.state_db) as store:
            row = store.conn.execute(
                "SELECT 1 FROM replications WHERE result = 'ok' AND started > ? LIMIT 1",
                (since,)).fetchone()
        return row is not None
    s = master.status()
    return bool(s["snapshot"] and s["peer"].get("snapshot") == s["snapshot"])


def killed(d, timeout=30):
    """The daemon d, started with a FLOCKER_FAILPOINT, died at it: its
    exit status; fails with the end of its log when it is still running."""
    try:
        return d.proc.wait(timeout=S(timeout))
    except subprocess.TimeoutExpired:
        raise AssertionError("%s still runs %d s later; its log ends:\n%s" % (
            os.path.basename(d.log), S(timeout), "".join(d.log_text().splitlines(True)[-30:])))


def start(bed, **kw):
    init(bed)
    # reading files must not change the old master's dataset after its last
    # snapshot (atime), or its return is a divergence (test_divergence.py)
    for h in bed.hosts:
        bedmod.sh(["zfs", "set", "atime=off", h.pool.name])
    da, db = Running(bed.a, **kw).wait_ready(), Running(bed.b, **kw).wait_ready()
    wait_for(lambda: serving(da), S(15), step=0.05)
    wait_for(lambda: replicated(da), S(30), step=0.05)   # the slave holds a replica
    return da, db


def write_files(host, n=5, size=100000):
    """Write n files on host's mounted dataset; returns the mountpoint.
    (The caller waits for replicated(..., since=<time before this call>).)"""
    mnt = zget(host.dataset, "mountpoint")
    for i in range(n):
        with open(os.path.join(mnt, "f%d-%d.bin" % (i, time.time_ns())), "wb") as f:
            f.write(os.urandom(size))
    return mnt


# ---------------------------------------------------------------------------
# replication by hand: flocker sync
# ---------------------------------------------------------------------------

FAST = {"ssh_alive_interval": "1", "ssh_connect_timeout": "2",
        "transfer_stall_timeout": "10"}


def prepare(bed, cluster=None, nodes=None, init=True):
    opts = dict(FAST)
    opts.update(cluster or {})
    bed.write_config(cluster=opts, nodes=nodes)
    if init:
        for h, role in ((bed.a, "master"), (bed.b, "slave")):
            p = h.flocker("init", "--role", role)
            assert p.returncode == 0, p.stderr
        # the tests read the master's files to checksum them: with atime on,
        # that reading is a change the next cycle would (rightly) replicate
        bedmod.sh(["zfs", "set", "atime=off", bed.a.dataset])


def mnt(h, ds=None):
    ds = ds or h.dataset
    return os.path.join(h.pool.mountpoint, ds.split("/", 1)[1])


def write(bed, name, size, seed=None):
    with open(os.path.join(mnt(bed.a), name), "wb") as f:
        f.write(os.urandom(size))


def sync(bed, *args, timeout=120):
    return bed.a.flocker("sync", *args, timeout=timeout)


def snaps(ds):
    """{snapshot: (guid, userrefs)} of ds, or None when ds does not exist."""
    p = bedmod.sh(["zfs", "get", "-H", "-p", "-o", "name,property,value",
                   "guid,userrefs", "-d", "1", ds], check=False)
    if p.returncode != 0:
        assert "does not exist" in p.stderr, p.stderr
        return None
    return {s.name: (s.guid, s.userrefs) for s in ff.parse_listing(p.stdout, ds).snaps}


def prop(ds, name):
    return bedmod.sh(["zfs", "get", "-H", "-p", "-o", "value", name, ds]).stdout.strip()


def slave_digest(bed, ds=None):
    ds = ds or bed.b.dataset
    mounted = prop(ds, "mounted") == "yes"
    if not mounted:
        bedmod.sh(["zfs", "mount", ds])
    try:
        return bedmod.tree_digest(os.path.join(bed.b.pool.mountpoint, ds.split("/", 1)[1]))
    finally:
        if not mounted:
            bedmod.sh(["zfs", "unmount", ds])


def master_digest(bed):
    return bedmod.tree_digest(mnt(bed.a))


def ok(p):
    assert p.returncode == 0, "exit %d: %s %s" % (p.returncode, p.stdout, p.stderr)
    return p


def fails(p, code, *needles):
    assert p.returncode == code, "exit %d: %s %s" % (p.returncode, p.stdout, p.stderr)
    for n in needles:
        assert n in p.stderr, p.stderr
    return p.stderr


# ---------------------------------------------------------------------------
# split brains
# ---------------------------------------------------------------------------

def configure(bed, policy, policy_b=None, cluster=None, service=None):
    """One configuration per host (alike unless policy_b differs):
    alpha reads the bed's, beta its own copy; service: more [service]
    options (key_command)."""
    w = bed.workdir
    paths = []
    for pol, path in ((policy, bed.config_path),
                      (policy_b or policy, os.path.join(w, "beta.conf"))):
        paths.append(bed.write_config(
            cluster=dict({"replication_interval": "0.5", "divergence_policy": pol},
                         **(cluster or {})),
            service=dict({"start_command": START.format(w=w), "stop_command": STOP.format(w=w)},
                         **(service or {})),
            path=path))
    return paths


class Pair:
    """Two running daemons; alpha starts as master."""

    def __init__(self, bed, policy, cluster=None, service=None):
        self.bed = bed
        self.cluster = cluster
        self.service = service
        self.paths = configure(bed, policy, cluster=cluster, service=service)
        init(bed)
        for h in bed.hosts:
            bedmod.sh(["zfs", "set", "atime=off", h.pool.name])
        self.config = {bed.a: self.paths[0], bed.b: self.paths[1]}
        self.d = {}
        for h in bed.hosts:
            self.start(h)
        wait_for(lambda: serving(self.d[bed.a]) and replicated(self.d[bed.a]), S(30), step=0.05)

    def start(self, host, **kw):
        self.d[host] = Running(host, tag="-%d" % time.monotonic_ns(),
                               config=self.config[host], **kw).wait_ready()

    def reconfigure(self, policy, policy_b=None):
        """New policies, taken by the running daemons on SIGHUP."""
        configure(self.bed, policy, policy_b, cluster=self.cluster, service=self.service)
        before = {h: d.log_text().count("configuration reloaded") for h, d in self.d.items()}
        for d in self.d.values():
            d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(d.log_text().count("configuration reloaded") > before[h]
                             for h, d in self.d.items()), S(10))

    def roles(self):
        m = [h for h, d in self.d.items() if d.status()["role"] == "master"][0]
        return m, [h for h in self.d if h is not m][0]

    def stop(self):
        for d in self.d.values():
            d.stop()

    def split(self, writes):
        """Cut the link until both serve, write {host: bytes} on each, and
        return {host: {file: sha256}} of what each wrote."""
        bed = self.bed
        bed.cut_link()
        wait_for(lambda: all(serving(d) for d in self.d.values()), S(15), step=0.05)
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
        no resolution under way: returns the master."""
        st = {h: d.status() for h, d in self.d.items()}
        masters = [h for h in st if st[h]["role"] == "master" and st[h]["serving"]]
        slaves = [h for h in st if st[h]["role"] == "slave"]
        if len(masters) != 1 or len(slaves) != 1:
            return None
        if any(s["divergence"]["resolving"] or s["divergence"]["unresolved"] or s["outdated"]
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


def check_nothing_lost(winner, loser, written, kept_before=()):
    """The winner serves its version (and its own writes); the loser's
    writes are in the dataset it preserved now (none when it wrote nothing);
    the loser's replica becomes the winner's version."""
    have = files_in(winner.dataset)
    for name, digest in written[winner].items():
        assert have.get(name) == digest, (winner, name)
    kept = [k for k in preserved(loser) if k not in kept_before]
    if written[loser]:
        assert len(kept) == 1, kept
        old = files_in(kept[0])
        for name, digest in written[loser].items():
            assert old.get(name) == digest, (loser, name)
            assert name not in have
    else:
        assert kept == []
    wait_for(lambda: files_in(loser.dataset) == files_in(winner.dataset), S(30), step=0.2)


# ---------------------------------------------------------------------------
# processes and links of the bed's hosts
# ---------------------------------------------------------------------------

def pids_of(argv_prefix, must_contain):
    """Processes whose command line starts with argv_prefix and mentions
    must_contain (a bed's unique dataset name): never anybody else's."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        words = [w.decode("utf-8", "replace") for w in argv if w]
        if words[:len(argv_prefix)] == argv_prefix and any(must_contain in w for w in words):
            found.append(int(pid))
    return found


def link_bytes(host, column):
    """Bytes host received (column 0) or sent (column 8) on its first link,
    from its namespace's interface counters: what crossed the wire."""
    for line in host.run(["cat", "/proc/net/dev"]).stdout.splitlines():
        name, _, data = line.partition(":")
        if name.strip() == "eth0":
            return int(data.split()[column])
    raise AssertionError("no eth0 in namespace %s" % host.ns)


def action_timeline(host, kind):
    """(the origin as Unix time, [(ms after it, mark)]) of host's newest
    role action of kind ("promote" or "demote") that kept a timeline, from
    its event log (ff.Timeline)."""
    with ff.StateStore.open(host.state_db, readonly=True) as store:
        line = [e["message"] for e in store.events(200) if e["kind"] == kind
                and e["message"].startswith("timeline, ")][-1]
    origin = float(re.search(r"\(Unix time ([0-9.]+)\)", line).group(1))
    marks = []
    for part in line.split("): ", 1)[1].split("; "):
        ms, label = part.split(" ", 1)
        marks.append((float(ms), label))
    return origin, marks
