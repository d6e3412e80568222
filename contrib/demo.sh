#!/bin/bash
# The main job, demonstrated on one machine: a real two-host failover.
#
# Two hosts (network namespaces alpha and beta, each with its own address,
# sshd, ZFS pool and flocker-failover daemon) joined by a heartbeat link,
# and a LAN (a third namespace) where a client reaches the user system at
# the service address 192.0.2.150. The user system is a small web server
# serving the replicated dataset. The demo writes data on the master,
# kills the master host outright (kill -9 of every process on it), shows
# the slave taking over with the data, the web server and the address,
# brings the old master back as slave with replication flowing the other
# way, prints a timeline and removes everything it made.
#
# On a fresh Debian machine, as root:   bash contrib/demo.sh
# Everything it creates is removed at the end, also when it fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/setup-debian.sh"
flocker_setup_debian
exec /usr/bin/python3 - "$here/../tests" <<'PY'
import hashlib, json, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import bed as bedmod

t0 = time.monotonic()
timeline = []


def say(msg, mark=False):
    line = "[%s +%6.2f s] %s" % (time.strftime("%H:%M:%S"), time.monotonic() - t0, msg)
    print(line, flush=True)
    if mark:
        timeline.append(line)


def wait(what, predicate, timeout=60, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise SystemExit("demo failed: %s did not happen within %d s" % (what, timeout))


def short(tree):
    """One fingerprint for a {file: sha256} tree digest."""
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def status(host):
    out = host.flocker("status", "--json").stdout
    return json.loads(out) if out.strip() else {}


def live(host):
    d = status(host).get("daemon") or {}
    return d


def fetch(bed, path):
    """The client on the LAN asks the service address for a file."""
    code = ("import sys,urllib.request\n"
            "print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())")
    r = bed.lan_run([sys.executable, "-c", code,
                     "http://%s:8080/%s" % (bed.SERVICE_ADDRESS, path)], check=False)
    return r.stdout.strip() if r.returncode == 0 else None


bedmod.ensure_zfs()
bedmod.cleanup_stale()
say("ZFS answers (%s)" % bedmod.zfs_kind())
bed = bedmod.Bed(lan=True)
daemons = []
try:
    a, b = bed.a, bed.b
    w = bed.workdir
    # the user system: a web server over the dataset, started and stopped
    # by flocker-failover (start is idempotent, as a service manager's is)
    start = ("sh -c 'mp=$(zfs get -H -o value mountpoint $FLOCKER_DATASET) && "
             "{ [ -f %(w)s/web-$FLOCKER_NODE.pid ] && kill -0 $(cat %(w)s/web-$FLOCKER_NODE.pid) "
             "2>/dev/null || { setsid %(py)s -m http.server 8080 --directory \"$mp\" "
             "</dev/null >/dev/null 2>&1 & echo $! > %(w)s/web-$FLOCKER_NODE.pid; }; }'"
             % {"w": w, "py": sys.executable})
    stop = ("sh -c '[ -f %(w)s/web-$FLOCKER_NODE.pid ] && kill $(cat %(w)s/web-$FLOCKER_NODE.pid) "
            "2>/dev/null; rm -f %(w)s/web-$FLOCKER_NODE.pid; true'" % {"w": w})
    bed.write_config(cluster={"replication_interval": "1", "heartbeat_interval": "0.2",
                              "dead_time": "1.0", "startup_wait": "1.0"},
                     service={"start_command": start, "stop_command": stop,
                              "service_address": "%s/28 dev lan0" % bed.SERVICE_ADDRESS})
    say("host alpha: namespace %s, heartbeat address %s, pool %s" % (a.ns, a.address, a.pool.name))
    say("host beta:  namespace %s, heartbeat address %s, pool %s" % (b.ns, b.address, b.pool.name))
    say("LAN: namespace %s; the client reaches the service at %s" % (bed.lan_ns, bed.SERVICE_ADDRESS))
    say("shared configuration %s:" % bed.config_path)
    print(open(bed.config_path).read())
    for host, role in ((a, "master"), (b, "slave")):
        host.flocker("init", "--role", role, check=True)
        say("on %s: flocker_failover.py init --role %s" % (host.name, role), mark=True)
    for h in bed.hosts:
        bedmod.sh(["zfs", "set", "atime=off", h.pool.name])

    def start_daemon(host, tag=""):
        log = open(os.path.join(w, "daemon-%s%s.log" % (host.name, tag)), "ab")
        p = host.popen([sys.executable, bedmod.PROGRAM, "--config", bed.config_path,
                        "--node", host.name, "daemon"], stdout=log, stderr=log,
                       stdin=subprocess.DEVNULL)
        daemons.append(p)
        return p

    start_daemon(a)
    start_daemon(b)
    say("daemons started on alpha and beta", mark=True)
    wait("alpha serving", lambda: live(a).get("serving"))
    say("alpha is master and serving (epoch %d)" % live(a)["epoch"], mark=True)

    mnt = bedmod.sh(["zfs", "get", "-H", "-o", "value", "mountpoint", a.dataset]).stdout.strip()
    with open(os.path.join(mnt, "orders.txt"), "w") as f:
        f.write("order 1: 3 apples\norder 2: 1 pear\n")
    with open(os.path.join(mnt, "photo.bin"), "wb") as f:
        f.write(os.urandom(2 << 20))
    want = bedmod.tree_digest(mnt)
    say("wrote orders.txt and photo.bin (2 MiB) on alpha; tree digest %s (%d files)" % (short(want), len(want)),
        mark=True)
    wait("a replication cycle after the writes", lambda: (lambda r: r and r["result"] == "ok"
         and r["started"] > os.stat(os.path.join(mnt, "photo.bin")).st_mtime)(
             status(a)["last_replication"]), 60)
    wait("beta holding alpha's newest snapshot",
         lambda: live(a).get("snapshot") == live(a)["peer"].get("snapshot"), 60)
    say("beta holds alpha's newest snapshot %s" % live(a)["snapshot"], mark=True)
    wait("the web server", lambda: fetch(bed, "orders.txt") is not None, 20)
    say("client -> http://%s:8080/orders.txt (served by alpha, MAC %s): %r"
        % (bed.SERVICE_ADDRESS, bed.neighbour(bed.SERVICE_ADDRESS),
           fetch(bed, "orders.txt")), mark=True)

    killed = time.monotonic()
    pids = a.kill_all()
    say("KILLED host alpha: kill -9 of its %d processes (daemon, web server, sshd)"
        % len(pids), mark=True)
    wait("beta serving", lambda: live(b).get("serving"), 30, step=0.02)
    say("beta is master and serving (epoch %d), %.2f s after the kill"
        % (live(b)["epoch"], time.monotonic() - killed), mark=True)
    mntb = bedmod.sh(["zfs", "get", "-H", "-o", "value", "mountpoint", b.dataset]).stdout.strip()
    got = bedmod.tree_digest(mntb)
    say("beta's dataset tree digest %s: %s" % (short(got), "IDENTICAL, nothing lost"
                                               if got == want else "DIFFERENT"), mark=True)
    wait("the web server on beta", lambda: fetch(bed, "orders.txt") is not None, 20)
    say("client -> http://%s:8080/orders.txt (now served by beta, MAC %s, beta's lan0 is %s): %r"
        % (bed.SERVICE_ADDRESS, bed.neighbour(bed.SERVICE_ADDRESS), bed.lan_mac(b),
           fetch(bed, "orders.txt")), mark=True)

    a.start_sshd()
    bed._wait_for_sshd()
    start_daemon(a, "-2")
    say("alpha is back (sshd and daemon restarted)", mark=True)
    wait("alpha slave", lambda: live(a).get("role") == "slave", 30)
    say("alpha yielded to beta's newer epoch: it is slave, its web server is not running",
        mark=True)
    with open(os.path.join(mntb, "orders.txt"), "a") as f:
        f.write("order 3: 12 plums (taken on beta)\n")
    say("client added order 3 on beta", mark=True)
    wait("replication beta -> alpha", lambda: (lambda r: r and r["result"] == "ok" and
         r["started"] > os.stat(os.path.join(mntb, "orders.txt")).st_mtime)(
             status(b)["last_replication"]) and
         live(b).get("snapshot") == live(b)["peer"].get("snapshot"), 60)
    say("alpha now holds beta's newest snapshot %s: replication flows beta -> alpha"
        % live(b)["snapshot"], mark=True)
    for host in (a, b):
        say("on %s: flocker_failover.py status" % host.name)
        print(host.flocker("status").stdout)
    say("on beta: flocker_failover.py history")
    print(b.flocker("history").stdout)
    print("\nTIMELINE")
    for line in timeline:
        print("  " + line)
    print("\nfailover: %s -> beta serving in the timeline above; data identical: %s"
          % ("alpha killed", "yes" if got == want else "NO"))
    p = bedmod.sh(a.ssh_argv(b, ["zfs list -H -o name " + b.pool.name], gated=True))
    say("flocker's own key reaches beta's ssh gate: 'zfs list -H -o name %s' -> %s"
        % (b.pool.name, p.stdout.strip()))
    p = bedmod.sh(a.ssh_argv(b, ["hostname"], gated=True), check=False)
    say("and nothing else: 'hostname' -> exit %d: %s" % (p.returncode, p.stderr.strip()))
    if got != want:
        raise SystemExit(1)
finally:
    for p in daemons:
        if p.poll() is None:
            p.terminate()
    for p in daemons:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    bed.close()
    say("cleaned up: daemons stopped; namespaces, pools, sshd and files removed")
PY
