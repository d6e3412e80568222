"""contrib/ocf/flocker, the OCF resource agent, under a real Pacemaker +
Corosync (tests/pcmk.py) on the test bed: promotion and replication, a
planned switchover by crm_resource --move, kill -9 of the promoted node, its
return as replica, an outdated replica never promoted; and ocf-tester.

Marked 'pacemaker': they take some 150 s (one at a time), so they run
apart from the suite, by 'bash contrib/ocf/test' (which .ci/run runs after
'bash contrib/test.sh'; contrib/test.sh leaves them out)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import bed as bedmod
import pcmk
from conftest import beds, ff, need
from helpers import wait_for as daemon_wait_for

AGENT = pcmk.AGENT

# The user system: writes numbered files into the live dataset, fsyncs
# each, and only then acknowledges it in a log outside the dataset; SIGTERM
# makes it finish the file it is on and exit.  It finds the mountpoint of
# its node's dataset by the host name (argv: ack log, then NODE=DATASET...).
WRITER = r'''
import hashlib, os, signal, socket, subprocess, sys, time
ack, datasets = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
ds = datasets[socket.gethostname()]
mp = subprocess.run(["zfs", "get", "-H", "-o", "value", "mountpoint", ds],
                    stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
i = 0
while not stop:
    i += 1
    name = "w-%s-%d-%06d.bin" % (socket.gethostname(), os.getpid(), i)
    data = os.urandom(4096)
    fd = os.open(os.path.join(mp, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    with open(ack, "a") as f:
        f.write("%s %s\n" % (name, hashlib.sha256(data).hexdigest()))
        f.flush()
        os.fsync(f.fileno())
    time.sleep(0.02)
'''

@pytest.fixture
def cluster(zfs_ready):
    need(not pcmk.available(), "Pacemaker/Corosync not installed (%s): "
         "bash contrib/ocf/test installs them" % pcmk.available())
    for b in beds():
        c = pcmk.Cluster(b)
        try:
            yield c
        finally:
            c.kill_all()


def newest(ds):
    out = bedmod.sh(["zfs", "list", "-H", "-t", "snapshot", "-o", "name,guid", "-s",
                     "creation", "-d", "1", ds], check=False).stdout
    rows = [line.split("\t") for line in out.splitlines() if "@" in line]
    return [(r[0].split("@")[1], r[1]) for r in rows]


def mountpoint(ds):
    return bedmod.sh(["zfs", "get", "-H", "-o", "value", "mountpoint", ds]).stdout.strip()


def acknowledged(w):
    try:
        with open(os.path.join(w, "ack.log")) as f:
            return [line.split() for line in f if line.strip()]
    except OSError:
        return []


def missing_writes(acks, ds):
    """The acknowledged writes that ds does not hold as written."""
    mp, lost = mountpoint(ds), []
    for name, digest in acks:
        try:
            with open(os.path.join(mp, name), "rb") as f:
                ok = hashlib.sha256(f.read()).hexdigest() == digest
        except OSError:
            ok = False
        if not ok:
            lost.append(name)
    return lost


def wait_for(predicate, timeout, what, step=0.1):
    """helpers.wait_for, with what is awaited said first (as this test reads)."""
    return daemon_wait_for(predicate, timeout, step=step, what=repr(what))


def start_cluster(c):
    b = c.bed
    w = b.workdir
    with open(os.path.join(w, "writer.py"), "w") as f:
        f.write(WRITER)
    assert b.a.flocker("init", "--role", "master").returncode == 0
    assert b.b.flocker("init", "--role", "slave").returncode == 0
    c.start()
    a = c.node("alpha")
    a.run(["crm_attribute", "--type", "rsc_defaults", "--name", "resource-stickiness",
           "--update", "1"])
    a.run(["cibadmin", "--replace", "-o", "resources", "-X", pcmk.resources(
        b.config_path, bedmod.PROGRAM, (sys.executable, "%s %s %s" % (
            os.path.join(w, "writer.py"), os.path.join(w, "ack.log"),
            " ".join("%s=%s" % (h.name, h.dataset) for h in b.hosts))),
        shop_extra='\n      <nvpair id="shop-log" name="logfile" value="%s/writer.log"/>' % w,
        test=True)])
    a.run(["cibadmin", "--replace", "-o", "constraints", "-X", pcmk.CONSTRAINTS])


def outdated(via, node):
    """node's outdated mark, as the cluster holds it ('' when none)."""
    p = via.run(["crm_attribute", "--node", node, "--name", "flocker-outdated-flocker",
                 "--lifetime", "forever", "--query", "--quiet"], check=False)
    return p.stdout.strip() if p.returncode == 0 else ""


def shop_on(c):
    for n in c.nodes:
        if n.init_pid and "running" in n.run(["crm_resource", "--locate", "-r", "shop"],
                                             check=False).stdout:
            out = n.run(["crm_resource", "--locate", "-r", "shop"], check=False).stdout
            return out.split("running on:")[-1].strip() if "running on:" in out else None
    return None


def diagnose(c):
    """What each node's agent and flocker-failover say (printed when a test fails)."""
    out = []
    for n in c.nodes:
        out.append("== %s" % n.name)
        out.append(n.host.flocker("status").stdout)
        out.append(n.host.flocker("history", "--limit", "15").stdout)
        if n.init_pid:
            out.append(n.run(["sh", "-c", "cat /run/resource-agents/*.json; echo"],
                             check=False).stdout)
        out.append("\n".join(line for line in n.log().splitlines()
                              if "flocker" in line and ("stderr" in line or "error" in line
                                                        or "exit-reason" in line))[-4000:])
    return "\n".join(out)


@pytest.mark.pacemaker
def test_pacemaker_promotes_replicates_switches_over_fails_over_and_never_promotes_outdated(
        cluster):
    c, b = cluster, cluster.bed
    try:
        _scenarios(c, b)
    except BaseException:
        print(diagnose(c))
        raise


def _scenarios(c, b):
    t_start = time.monotonic()

    def step(what):
        print("%6.1f s  %s" % (time.monotonic() - t_start, what), flush=True)
    start_cluster(c)
    step("cluster started")
    A, B = b.a, b.b
    # 1. alpha, master by its state, is promoted; the writer runs there and
    #    replication flows to beta
    c.wait_role("alpha", "Promoted", timeout=60)
    c.wait_role("beta", "Unpromoted", timeout=30)
    wait_for(lambda: shop_on(c) == "alpha", 30, "the writer runs on alpha")
    wait_for(lambda: len(acknowledged(b.workdir)) > 20, 30, "the writer writes")
    wait_for(lambda: newest(B.dataset) and newest(B.dataset)[-1][1] in
             [g for _, g in newest(A.dataset)] and len(newest(B.dataset)) >= 2, 40,
             "beta receives alpha's snapshots")
    step("promoted, replicating")
    # every epoch alpha's snapshots have before the switchover (read now: once
    # beta is promoted, alpha may hold beta's first snapshot within a second)
    epochs = [ff.snapshot_epoch(n) for n, _ in newest(A.dataset) if n.startswith("flocker-")]
    # 2. planned switchover: no acknowledged write lost
    a = c.node("alpha")
    a.run(["crm_resource", "--move", "-r", "flocker-clone", "--node", "beta", "--promoted"])
    c.wait_role("beta", "Promoted", timeout=90)
    c.wait_role("alpha", "Unpromoted", timeout=30)
    acks_before = len(acknowledged(b.workdir))
    wait_for(lambda: shop_on(c) == "beta", 30, "the writer runs on beta")
    switched = acknowledged(b.workdir)[:acks_before]
    assert missing_writes(switched, B.dataset) == []
    a.run(["crm_resource", "--clear", "-r", "flocker-clone"])
    wait_for(lambda: len(acknowledged(b.workdir)) > acks_before + 20, 30, "beta writes")
    step("switched over")
    # alpha, now the replica, receives beta's snapshots, of a newer epoch
    # (beta's: odd) than every one alpha had before the switchover
    wait_for(lambda: ff.snapshot_epoch(newest(A.dataset)[-1][0]) % 2 == 1, 40,
             "alpha receives beta's snapshots")
    assert ff.snapshot_epoch(newest(A.dataset)[-1][0]) > max(epochs)
    step("alpha receives beta's")
    # 3. kill -9 of the promoted node's whole host: alpha promotes with the newest replica
    t0 = time.monotonic()
    c.kill(c.node("beta"))
    c.wait_role("alpha", "Promoted", timeout=60, via=a)
    promoted_after = time.monotonic() - t0
    print("alpha promoted %.2f s after kill -9 of beta" % promoted_after)
    # the newest snapshot beta had confirmed on alpha (held) is alpha's
    held = [line.split("\t")[0] for line in bedmod.sh(
        ["zfs", "get", "-H", "-o", "name,value", "-d", "1", "userrefs", B.dataset]
    ).stdout.splitlines() if "@" in line and line.split("\t")[1] != "0"]
    guid = bedmod.sh(["zfs", "get", "-H", "-o", "value", "guid", held[-1]]).stdout.strip()
    assert guid in [g for _, g in newest(A.dataset)]
    wait_for(lambda: shop_on(c) == "alpha", 30, "the writer runs on alpha again")
    step("failed over")
    # 4. beta returns: it rejoins as the replica, its unsent tail kept aside
    B.start_sshd()
    c.start_node(c.node("beta"))
    c.wait_role("beta", "Unpromoted", timeout=60, via=a)
    assert c.roles(via=a).get("alpha") == "Promoted"
    wait_for(lambda: newest(B.dataset)[-1][1] == newest(A.dataset)[-1][1], 60,
             "beta receives alpha's snapshots again")
    # every acknowledged write is in alpha's live dataset or in the data
    # beta kept aside when it rejoined (what it wrote after its last cycle)
    lost = missing_writes(acknowledged(b.workdir), A.dataset)
    kept = [p["dataset"] for p in json.loads(B.flocker("status", "--json").stdout)["preserved"]]
    if lost:
        assert kept, lost
        bedmod.sh(["zfs", "mount", kept[-1]])
        try:
            assert missing_writes([x for x in acknowledged(b.workdir) if x[0] in lost],
                                  kept[-1]) == []
        finally:
            bedmod.sh(["zfs", "unmount", kept[-1]], check=False)
    print("beta kept %s; %d acknowledged writes only there" % (kept, len(lost)))
    step("beta rejoined")
    # 5. beta's replica becomes outdated (its sshd is gone: every cycle fails):
    #    when alpha dies, beta is never promoted
    wait_for(lambda: not outdated(a, "beta"), 30, "beta is not outdated once it caught up")
    B.kill_sshd()
    wait_for(lambda: outdated(a, "beta"), 60, "alpha marks beta outdated")
    step("beta outdated")
    c.kill(a)
    bn = c.node("beta")
    deadline = time.monotonic() + 10     # (beta promoted in 4-6 s when it could)
    while time.monotonic() < deadline:
        roles = c.roles(via=bn)
        assert roles.get("beta") != "Promoted", roles
        assert json.loads(B.flocker("status", "--json").stdout)["role"] == "slave"
        time.sleep(0.5)


@pytest.mark.pacemaker
def test_ocf_tester_passes(zfs_ready):
    need(not pcmk.available() and shutil.which("ocf-tester") and shutil.which("xmllint"),
         "ocf-tester (resource-agents) and xmllint (libxml2-utils) not installed: "
         "bash contrib/ocf/test installs them")
    for b in beds():
        assert b.a.flocker("init", "--role", "master").returncode == 0
        assert b.b.flocker("init", "--role", "slave").returncode == 0
        rsctmp = os.path.join(b.workdir, "rsctmp")
        os.makedirs(rsctmp)
        env = dict(os.environ, HA_RSCTMP=rsctmp)
        proc = subprocess.run(
            b.a.argv(["ocf-tester", "-n", "flocker%s" % bedmod.TAG,
                      "-o", "config=%s" % b.config_path, "-o", "program=%s" % bedmod.PROGRAM,
                      "-o", "node=alpha", AGENT]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
            env=env, timeout=300)
        print(proc.stdout)
        assert proc.returncode == 0, proc.stdout
        assert "passed all tests" in proc.stdout, proc.stdout
