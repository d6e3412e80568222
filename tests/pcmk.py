"""A real Pacemaker + Corosync cluster on the test bed (bed.py), for the
OCF resource agent contrib/ocf/flocker.

Each node of the bed (alpha, beta: a network namespace with its own sshd
and pool) runs a cluster stack in namespaces of its own besides the
network: mount, UTS, IPC and PID, started as

    nsenter --net=NS unshare --mount --propagation slave --uts --ipc --pid --fork INIT

INIT (pid 1 of the node, the Python program below) sets the host name,
mounts a private /proc, /run and /dev/shm (libqb names its shared memory by
pid, corosync's pid file is in /run), bind-mounts per-node directories over
/etc/corosync, /var/lib/corosync, /var/lib/pacemaker and /var/log, starts
`corosync -f`, then `pacemakerd`, reaps orphans, and stops both on SIGTERM.
libqb's sockets are abstract and so per network namespace.

ZFS: the test's zfs-fuse mounts and unmounts in the test process's mount
namespace (bed.py), and an unmount made in another one only hides the mount
there.  So inside a node
`zfs` and `zpool` are small wrappers that run the real ones in the mount
namespace of the test's own process (found through the machine's /proc,
bound at INIT's start before the node's own /proc hides it; the machine's
pid 1 may be out of reach, as in a sandbox).  A real host has one
mount namespace and needs none of this.

Everything lives in the bed's work directory and dies with the bed: a
node's processes are all in its network namespace, which Bed.close() kills.
"""

import os
import subprocess
import sys
import time

import bed as bedmod

AGENT = os.path.join(bedmod.ROOT, "contrib", "ocf", "flocker")

NODE_INIT = r'''
import os, signal, socket, subprocess, sys, time
d, name, agent = sys.argv[1], sys.argv[2], sys.argv[3]
def sh(*argv):
    subprocess.run(argv, check=True)
socket.sethostname(name)
sh("mount", "--bind", "/proc", d + "/hostproc")
sh("mount", "-t", "proc", "proc", "/proc")
sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run")
sh("mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/dev/shm")
for src, dst in (("etc-corosync", "/etc/corosync"), ("var-lib-corosync", "/var/lib/corosync"),
                 ("var-lib-pacemaker", "/var/lib/pacemaker"), ("var-log", "/var/log"),
                 ("bin/zfs", "/usr/sbin/zfs"), ("bin/zpool", "/usr/sbin/zpool")):
    sh("mount", "--bind", os.path.join(d, src), dst)
# the agent under test as ocf:flocker:flocker, beside the installed providers
orig, ra = os.path.join(d, "ocf-orig"), "/usr/lib/ocf/resource.d"
sh("mount", "--bind", ra, orig)
sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", ra)
for sub in os.listdir(orig):
    os.symlink(os.path.join(orig, sub), os.path.join(ra, sub))
os.mkdir(os.path.join(ra, "flocker"))
os.symlink(agent, os.path.join(ra, "flocker", "flocker"))
stopping = []
signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
log = open(os.path.join(d, "var-log", "stack.log"), "ab")
env = dict(os.environ, PCMK_logfacility="none", PCMK_logfile="/var/log/pacemaker/pacemaker.log",
           PCMK_debug="no")
coro = subprocess.Popen(["corosync", "-f"], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
deadline = time.monotonic() + 20
while time.monotonic() < deadline and coro.poll() is None:
    if subprocess.run(["corosync-cmapctl", "totem.cluster_name"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode == 0:
        break
    time.sleep(0.1)
pcmk = subprocess.Popen(["pacemakerd"], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                        env=env)
open(os.path.join(d, "ready"), "w").close()
def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
while not stopping:
    reap()
    time.sleep(0.1)
for proc, grace in ((pcmk, 60), (coro, 15)):
    if proc.poll() is None:
        proc.terminate()
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        reap()
        time.sleep(0.1)
'''

ZFS_WRAPPER = """#!/bin/sh
# the real %(prog)s, in the mount namespace of the machine (see tests/pcmk.py)
exec nsenter --mount=%(hostproc)s/%(pid)d/ns/mnt -- /usr/sbin/%(prog)s "$@"
"""

COROSYNC_CONF = """totem {
    version: 2
    cluster_name: %(name)s
    transport: knet
    token: %(token)d
    crypto_cipher: none
    crypto_hash: none
}
system {
    sched_rr: no
    move_to_root_cgroup: no
}
logging {
    to_stderr: yes
    to_logfile: no
    to_syslog: no
    timestamp: on
}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
nodelist {
%(nodes)s}
"""

CIB = """<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0"
     admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="opt-dc-deadtime" name="dc-deadtime" value="2s"/>
        <nvpair id="opt-stonith" name="stonith-enabled" value="false"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>
"""


def available():
    """'' when Pacemaker and Corosync are installed, else what is missing."""
    missing = [p for p in ("/usr/sbin/corosync", "/usr/sbin/pacemakerd", "/usr/sbin/crm_mon",
                           "/usr/sbin/cibadmin", "/usr/sbin/crm_resource",
                           "/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs")
               if not os.path.exists(p)]
    return ", ".join(missing)


class Node:
    def __init__(self, cluster, host):
        self.cluster = cluster
        self.host = host
        self.name = host.name
        self.dir = os.path.join(cluster.dir, host.name)
        self.unshare = None     # the unshare process (parent of INIT)
        self.init_pid = None    # INIT, pid 1 of the node, by the machine's numbering

    def argv(self, argv):
        """argv run inside this node (every namespace of its INIT)."""
        return ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p", "--"] + \
            list(argv)

    def run(self, argv, check=True, timeout=60, env=None):
        e = dict(os.environ)
        e.update(env or {})
        return bedmod.sh(self.argv(argv), check=check, timeout=timeout, env=e)

    def log(self, name="pacemaker/pacemaker.log"):
        try:
            with open(os.path.join(self.dir, "var-log", name), errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class Cluster:
    """A cluster of the bed's two hosts; start() runs the stacks."""

    def __init__(self, bed, token=1000):
        self.bed = bed
        self.token = token
        self.dir = os.path.join(bed.workdir, "pcmk")
        self.nodes = [Node(self, h) for h in bed.hosts]
        entries = "".join(
            "    node {\n        name: %s\n        nodeid: %d\n        ring0_addr: %s\n    }\n"
            % (n.name, i + 1, n.host.address) for i, n in enumerate(self.nodes))
        import pwd
        import grp
        uid, gid = pwd.getpwnam("hacluster").pw_uid, grp.getgrnam("haclient").gr_gid
        for n in self.nodes:
            for sub in ("etc-corosync", "var-lib-corosync", "var-log/pacemaker",
                        "var-log/corosync", "var-lib-pacemaker/cib",
                        "var-lib-pacemaker/pengine", "var-lib-pacemaker/blackbox",
                        "var-lib-pacemaker/cores", "bin", "hostproc", "ocf-orig"):
                os.makedirs(os.path.join(n.dir, sub), exist_ok=True)
            for sub in ("var-lib-pacemaker", "var-lib-pacemaker/cib",
                        "var-lib-pacemaker/pengine", "var-lib-pacemaker/blackbox",
                        "var-lib-pacemaker/cores", "var-log/pacemaker"):
                p = os.path.join(n.dir, sub)
                os.chown(p, uid, gid)
                os.chmod(p, 0o770 if sub.startswith("var-log") else 0o750)
            with open(os.path.join(n.dir, "etc-corosync", "corosync.conf"), "w") as f:
                f.write(COROSYNC_CONF % {"name": "ffcl", "token": token, "nodes": entries})
            cib = os.path.join(n.dir, "var-lib-pacemaker", "cib", "cib.xml")
            with open(cib, "w") as f:
                f.write(CIB)
            os.chown(cib, uid, gid)
            os.chmod(cib, 0o600)
            for prog in ("zfs", "zpool"):
                p = os.path.join(n.dir, "bin", prog)
                with open(p, "w") as f:
                    f.write(ZFS_WRAPPER % {"prog": prog,
                                           "hostproc": os.path.join(n.dir, "hostproc"),
                                           "pid": os.getpid()})
                os.chmod(p, 0o755)

    def node(self, name):
        return next(n for n in self.nodes if n.name == name)

    def start(self, nodes=None, timeout=30):
        for n in nodes or self.nodes:
            self.start_node(n)
        self.wait_online([n.name for n in (nodes or self.nodes)], timeout=timeout)

    def start_node(self, n):
        ready = os.path.join(n.dir, "ready")
        if os.path.exists(ready):
            os.unlink(ready)
        n.unshare = n.host.popen(
            ["unshare", "--mount", "--propagation", "slave", "--uts", "--ipc", "--pid",
             "--fork", sys.executable, "-c", NODE_INIT, n.dir, n.name, AGENT],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with open("/proc/%d/task/%d/children" % (n.unshare.pid, n.unshare.pid)) as f:
                    kids = f.read().split()
            except OSError:
                kids = []
            if kids and os.path.exists(ready):
                n.init_pid = int(kids[0])
                return
            if n.unshare.poll() is not None:
                raise RuntimeError("the node %s's stack exited at once: %s"
                                   % (n.name, n.log("stack.log")))
            time.sleep(0.05)
        raise RuntimeError("the node %s's stack did not start: %s" % (n.name, n.log("stack.log")))

    def crm_mon(self, via=None):
        """crm_mon's XML as text, run on `via` (default: the first running node)."""
        n = via or next(x for x in self.nodes if x.init_pid)
        return n.run(["crm_mon", "-1", "--output-as=xml"], check=False, timeout=20).stdout

    def wait_online(self, names, timeout=30):
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            out = self.crm_mon()
            if all('name="%s"' % nm in out and _node_online(out, nm) for nm in names) and \
                    '<current_dc present="true"' in out:
                return
            time.sleep(0.3)
        raise AssertionError("nodes %s not online within %g s:\n%s" % (names, timeout, out))

    def kill(self, n):
        """kill -9 of the node's whole stack and every process of its
        host (its sshd too): the host died."""
        n.host.kill_all()
        if n.unshare is not None:
            n.unshare.wait(timeout=10)
        n.init_pid = None

    def kill_all(self):
        """kill -9 of every node (the test's end: nothing graceful is needed)."""
        for n in self.nodes:
            if n.init_pid or n.unshare is not None:
                self.kill(n)

    def stop(self, timeout=60):
        for n in self.nodes:
            if n.init_pid:
                try:
                    os.kill(n.init_pid, 15)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            if n.unshare is None:
                continue
            try:
                n.unshare.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if n.init_pid:
                    try:
                        os.kill(n.init_pid, 9)
                    except ProcessLookupError:
                        pass
                n.unshare.wait(timeout=10)
            n.init_pid = None


    def cib_create(self, section, xml, via=None):
        n = via or next(x for x in self.nodes if x.init_pid)
        n.run(["cibadmin", "--create", "-o", section, "-X", xml])

    def roles(self, rsc="flocker", via=None):
        """{node: role} of the instances of primitive rsc, as crm_mon shows
        them (not the failed ones: a failed promote shows role Promoted)."""
        import xml.etree.ElementTree as ET
        out = self.crm_mon(via)
        try:
            root = ET.fromstring(out)
        except ET.ParseError:
            return {}
        roles = {}
        for r in root.iter("resource"):
            if r.get("id") == rsc and r.get("active") == "true" and r.get("failed") != "true":
                for n in r.findall("node"):
                    roles[n.get("name")] = r.get("role")
        return roles

    def wait_role(self, node, role, rsc="flocker", timeout=60, via=None):
        deadline = time.monotonic() + timeout
        roles = {}
        while time.monotonic() < deadline:
            roles = self.roles(rsc, via)
            if roles.get(node) == role:
                return roles
            time.sleep(0.1)
        raise AssertionError("%s is not %s within %g s: %s\n%s" % (
            node, role, timeout, roles, self.crm_mon(via)))


def _node_online(xml, name):
    import re
    m = re.search(r'<node name="%s"[^>]*>' % re.escape(name), xml)
    return bool(m) and 'online="true"' in m.group(0)


# ---------------------------------------------------------------------------
# Measuring: kill -9 of the promoted node to the other one promoted, under
# Pacemaker and under our daemon, on the same bed
#   python3 tests/pcmk.py measure N
# ---------------------------------------------------------------------------

def resources(config, program, shop_args, shop_extra="", test=False):
    """The CIB resources: the flocker promotable clone (the agent given
    config and program) and a user system "shop" (ocf:heartbeat:anything
    running shop_args[0] with the options shop_args[1]) colocated with the
    promoted instance.  test: as the tests run it, with notify and the
    timeouts of start, stop, promote and demote (the measurement runs the
    plain clone, as README's figures were taken)."""
    notify = ('\n      <nvpair id="fc-notify" name="notify" value="true"/>' if test else "")
    ops = "".join('\n        <op id="flocker-%s" name="%s" interval="0s" timeout="%ds"/>'
                  % (op, op, t) for op, t in (("start", 120), ("stop", 300),
                                              ("promote", 120), ("demote", 300))) \
        if test else ""
    return """<resources>
  <clone id="flocker-clone">
    <meta_attributes id="flocker-clone-meta">
      <nvpair id="fc-promotable" name="promotable" value="true"/>
      <nvpair id="fc-promoted-max" name="promoted-max" value="1"/>
      <nvpair id="fc-clone-max" name="clone-max" value="2"/>%s
    </meta_attributes>
    <primitive id="flocker" class="ocf" provider="flocker" type="flocker">
      <instance_attributes id="flocker-ia">
        <nvpair id="flocker-config" name="config" value="%s"/>
        <nvpair id="flocker-program" name="program" value="%s"/>
      </instance_attributes>
      <operations>
        <op id="flocker-mon-p" name="monitor" interval="2s" role="Promoted" timeout="60s"/>
        <op id="flocker-mon-u" name="monitor" interval="3s" role="Unpromoted" timeout="60s"/>%s
      </operations>
    </primitive>
  </clone>
  <primitive id="shop" class="ocf" provider="heartbeat" type="anything">
    <instance_attributes id="shop-ia">
      <nvpair id="shop-bin" name="binfile" value="%s"/>
      <nvpair id="shop-args" name="cmdline_options" value="%s"/>
      <nvpair id="shop-pid" name="pidfile" value="/run/shop.pid"/>%s
    </instance_attributes>%s
  </primitive>
</resources>""" % (notify, config, program, ops, shop_args[0], shop_args[1], shop_extra,
                   """
    <operations>
      <op id="shop-mon" name="monitor" interval="5s" timeout="20s"/>
      <op id="shop-stop" name="stop" interval="0s" timeout="30s"/>
    </operations>""" if test else "")


CONSTRAINTS = """<constraints>
  <rsc_colocation id="shop-with-promoted" rsc="shop" with-rsc="flocker-clone"
                  with-rsc-role="Promoted" score="INFINITY"/>
  <rsc_order id="promote-then-shop" first="flocker-clone" first-action="promote"
             then="shop" then-action="start"/>
</constraints>"""


def _poll(predicate, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(step)
    raise AssertionError("not within %g s" % timeout)


def measure_pacemaker():
    """(seconds to the flocker instance promoted, to the user system
    started) after kill -9 of the promoted host."""
    b = bedmod.Bed()
    try:
        assert b.a.flocker("init", "--role", "master").returncode == 0
        assert b.b.flocker("init", "--role", "slave").returncode == 0
        c = Cluster(b)
        c.start()
        a, beta = c.node("alpha"), c.node("beta")
        a.run(["cibadmin", "--replace", "-o", "resources", "-X", resources(
            b.config_path, bedmod.PROGRAM, ("/bin/sleep", "100000"))])
        a.run(["cibadmin", "--replace", "-o", "constraints", "-X", CONSTRAINTS])
        c.wait_role("alpha", "Promoted", timeout=90)
        c.wait_role("beta", "Unpromoted", timeout=60)
        _poll(lambda: "flocker-" in b.b.run(["zfs", "list", "-H", "-t", "snapshot", "-o",
                                             "name", "-d", "1", b.b.dataset],
                                            check=False).stdout, 60)
        time.sleep(4)      # a monitor or two of beta: its promotion score is set
        t0 = time.monotonic()
        c.kill(a)
        t1 = _poll(lambda: c.roles(via=beta).get("beta") == "Promoted", 60)
        t2 = _poll(lambda: c.roles("shop", via=beta).get("beta") == "Started", 60)
        c.kill_all()
        return t1 - t0, t2 - t0
    finally:
        b.close()


def measure_daemon(dead_time):
    """seconds from kill -9 of the serving master's host to the slave's
    daemon serving, heartbeat_interval dead_time / 5."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import ff
    b = bedmod.Bed()
    procs = []
    try:
        b.write_config(cluster={"dead_time": "%g" % dead_time,
                                "heartbeat_interval": "%g" % (dead_time / 5),
                                "replication_interval": "1"})
        assert b.a.flocker("init", "--role", "master").returncode == 0
        assert b.b.flocker("init", "--role", "slave").returncode == 0
        for h in b.hosts:
            log = open(os.path.join(b.workdir, "daemon-%s.log" % h.name), "ab")
            procs.append(h.popen([sys.executable, bedmod.PROGRAM, "--config", b.config_path,
                                  "--node", h.name, "daemon"], stdout=log, stderr=log,
                                 stdin=subprocess.DEVNULL))

        def serving(h):
            answer = ff.query_daemon(h.state_db, {"cmd": "status"}, timeout=2)
            return bool(answer and answer["status"]["serving"])

        def replicated():
            answer = ff.query_daemon(b.b.state_db, {"cmd": "status"}, timeout=2)
            return bool(answer and (answer["status"]["peer"] or {}).get("state") == "alive"
                        and "flocker-" in b.b.run(["zfs", "list", "-H", "-t", "snapshot",
                                                   "-o", "name", "-d", "1", b.b.dataset],
                                                  check=False).stdout)
        _poll(lambda: serving(b.a), 60)
        _poll(replicated, 60)
        time.sleep(2)
        t0 = time.monotonic()
        b.a.kill_all()
        t1 = _poll(lambda: serving(b.b), 60, step=0.02)
        return t1 - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        b.close()


def _summary(values):
    v = sorted(values)
    return "median %.2f s, min %.2f s, max %.2f s, N=%d" % (
        v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2,
        v[0], v[-1], len(v))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "measure":
        raise SystemExit("usage: python3 tests/pcmk.py measure N   (as root, on the bed)")
    runs = int(sys.argv[2])
    with bedmod.machine_lock():
        bedmod.ensure_zfs()
    pm, shop, daemon1, daemon22 = [], [], [], []
    for i in range(runs):
        p, s_ = measure_pacemaker()
        pm.append(p)
        shop.append(s_)
        daemon1.append(measure_daemon(1.0))
        daemon22.append(measure_daemon(2.2))
        print("run %d: pacemaker promoted %.2f s, user system started %.2f s; daemon "
              "dead_time 1 s: %.2f s, dead_time 2.2 s: %.2f s"
              % (i + 1, p, s_, daemon1[-1], daemon22[-1]), flush=True)
    print("Pacemaker (token 1000 ms, consensus 1200 ms), kill -9 to promoted: " + _summary(pm))
    print("Pacemaker, kill -9 to the colocated user system started: " + _summary(shop))
    print("daemon, dead_time 1 s (heartbeat 0.2 s), kill -9 to serving: " + _summary(daemon1))
    print("daemon, dead_time 2.2 s (heartbeat 0.44 s), kill -9 to serving: "
          + _summary(daemon22))
