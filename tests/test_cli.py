"""The command line, run as a process on the bed's hosts (real ZFS)."""

import json
import os
import time
import re
import sqlite3
import stat
import subprocess
import sys

from conftest import ff
import bed as bedmod


def run(*args, **kw):
    return subprocess.run([sys.executable, bedmod.PROGRAM] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, **kw)


def exists(ds):
    return bedmod.sh(["zfs", "list", "-H", "-o", "name", ds], check=False).returncode == 0


def test_version_and_help():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == "flocker-failover %s" % ff.VERSION
    for name, *_ in ff.COMMANDS:
        proc = run(name, "--help")
        assert proc.returncode == 0 and "usage: flocker_failover.py %s" % name in proc.stdout
    proc = run("no-such-command")
    assert proc.returncode == 2 and "invalid choice: 'no-such-command'" in proc.stderr


def test_status_says_starting_while_a_promotion_runs_and_serving_only_after_it():
    # the role is recorded (and the start command may have run) before a
    # promotion's last steps: until the job has ended it is STARTING, not
    # "not running here" beside "role master"
    def service(serving, kind, jobs):
        return ff._status_service({"serving": serving, "jobs": jobs, "decision": {
            "kind": kind, "reason": "why"} if kind else None})[0]
    assert service(False, "promote", {"role": 0.71, "replicate": 2.0}) == \
        "service     STARTING here (promote running for 0.7 s)"
    assert service(False, "resume", {"role": 1.26}) == \
        "service     STARTING here (resume running for 1.3 s)"
    assert service(True, "promote", {}) == \
        "service     RUNNING here (this node is the serving master)"
    for kind, jobs in (("promote", {}), ("promote", {"replicate": 1.0}),
                       ("step-down", {"role": 0.5}), ("handover", {"role": 0.5}),
                       ("wait", {"role": 0.5}), (None, {"role": 0.5}), ("promote", None)):
        assert service(False, kind, jobs) == "service     not running here", (kind, jobs)


def test_a_daemon_that_closes_or_does_not_answer_is_told_apart(tmp_path):
    """A daemon that closes the control connection without an answer (it
    is stopping: the campaign's restart during a switchover) is not called
    hung; one that keeps it open without answering is."""
    import socket
    import threading
    db = str(tmp_path / "state.db")
    path = ff.control_socket_path(db)
    os.makedirs(os.path.dirname(path))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    held = []

    def serve(close):
        conn, _ = srv.accept()
        conn.recv(100)
        if close:
            conn.close()
        else:
            held.append(conn)
    for close, said in ((True, "closed the connection without an answer"),
                        (False, "did not answer within 0.5 s; it may be hung")):
        t = threading.Thread(target=serve, args=(close,))
        t.start()
        try:
            ff.query_daemon(db, {"cmd": "ping"}, timeout=0.5)
            raise AssertionError("no error")
        except ff.FlockerError as e:
            assert said in e.message, e.message
        t.join()
    for c in held + [srv]:
        c.close()


def test_genkey(tmp_path):
    proc = run("genkey")
    assert proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}\n", proc.stdout)
    assert run("genkey").stdout != proc.stdout
    out = tmp_path / "secret"
    proc = run("genkey", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(os.stat(str(out)).st_mode) == 0o600
    key = out.read_text()
    assert "key id %s" % ff.key_id(key.strip().encode()) in proc.stdout
    assert ff.read_secret(str(out), "cluster", "secret_file", "x") == key.strip().encode()
    proc = run("genkey", "--output", str(out))
    assert proc.returncode == 1 and out.read_text() == key
    assert proc.stderr == ("flocker-failover: error: cannot create %s: File exists; it already "
                           "exists, and a key is never overwritten: move it away first\n" % out)


def test_init_and_status_on_both_hosts(bed):
    a, b = bed.a, bed.b
    proc = b.flocker("status")
    assert proc.returncode == ff.EXIT_STATE and "this node was not initialised" in proc.stderr

    proc = a.flocker("init", "--role", "master")
    assert proc.returncode == 0, proc.stderr
    assert "created dataset %s" % a.dataset in proc.stdout
    assert exists(a.dataset)
    proc = b.flocker("init", "--role", "slave")
    assert proc.returncode == 0, proc.stderr
    assert "will be created by the first replication" in proc.stdout
    assert not exists(b.dataset)     # a full receive creates it

    # a refused re-init changes nothing, not even in ZFS
    proc = b.flocker("init", "--role", "master")
    assert proc.returncode == ff.EXIT_STATE and "refusing to reinitialise" in proc.stderr
    assert not exists(b.dataset)

    # idempotent
    proc = a.flocker("init", "--role", "master")
    assert proc.returncode == 0
    assert proc.stdout.strip().endswith(
        "node alpha is already initialised as master (epoch 2); nothing to do")

    text = a.flocker("status", check=True).stdout
    assert "node        alpha (this host), dataset %s" % a.dataset in text
    assert "role        master, epoch 2" in text
    assert "peer        beta: never seen" in text
    assert "replicated  never" in text

    report = json.loads(b.flocker("status", "--json", check=True).stdout)
    assert report["node"] == "beta" and report["role"] == "slave" and report["epoch"] == 0
    assert abs(report["generation"] - time.time()) < 60   # starts at the Unix time of init
    assert report["peer"] == {"node": "alpha", "last_seen": None, "age_seconds": None,
                              "role": None, "epoch": None, "snapshot": None, "state": None}
    assert set(report) == {"schema", "version", "cluster", "node", "role", "epoch", "generation",
                           "outdated", "dataset", "state_db", "daemon", "peer",
                           "last_replication", "replication", "preserved", "events",
                           "encryption"}
    assert report["encryption"] is None          # (not encrypted)
    assert report["events"][0]["kind"] == "init"


def test_reinit_refused_then_forced_with_backup(bed):
    a = bed.a
    assert a.flocker("init", "--role", "master").returncode == 0
    proc = a.flocker("init", "--role", "slave")
    assert proc.returncode == ff.EXIT_STATE
    assert proc.stderr == (
        "flocker-failover: error: node alpha is already initialised as master, epoch 2, in %s; "
        "refusing to reinitialise it. Use --force to start over (the old state file is kept as "
        "a backup)\n" % a.state_db)

    # history makes even the same role refuse
    with ff.StateStore.open(a.state_db, lock_for="test") as s:
        s.set_role("master", 5, "a promotion happened")
    proc = a.flocker("init", "--role", "master")
    assert proc.returncode == ff.EXIT_STATE and "epoch 5 and has history" in proc.stderr

    with ff.StateStore.open(a.state_db, lock_for="test") as s:
        for _ in range(3):
            s.next_generation()
        old_generation = s.node_state().generation
    proc = a.flocker("init", "--role", "slave", "--force")
    assert proc.returncode == 0, proc.stderr
    backups = [f for f in os.listdir(os.path.dirname(a.state_db)) if ".bak-" in f]
    assert len(backups) == 1 and "kept the old state file as" in proc.stdout
    old = sqlite3.connect(os.path.join(os.path.dirname(a.state_db), backups[0]))
    assert old.execute("SELECT role, epoch FROM node_state").fetchone() == ("master", 5)
    old.close()
    with ff.StateStore.open(a.state_db) as s:
        assert (s.node_state().role, s.node_state().epoch) == ("slave", 0)
        # the peer, which stored the old generation, still accepts this node
        assert s.node_state().generation > old_generation


def test_init_with_corrupt_state_needs_force_and_keeps_it(bed):
    a = bed.a
    with open(a.state_db, "wb") as f:
        f.write(b"garbage" * 1000)
    proc = a.flocker("init", "--role", "master")
    assert proc.returncode == ff.EXIT_STATE and "cannot use" not in proc.stderr
    assert "It was left untouched" in proc.stderr
    proc = a.flocker("init", "--role", "master", "--force")
    assert proc.returncode == 0, proc.stderr
    bad = [f for f in os.listdir(os.path.dirname(a.state_db)) if ".bad-" in f]
    assert len(bad) == 1
    with open(os.path.join(os.path.dirname(a.state_db), bad[0]), "rb") as f:
        assert f.read() == b"garbage" * 1000


def test_init_refuses_missing_pool_before_touching_anything(bed):
    a = bed.a
    bed.write_config(nodes={"alpha": {"dataset": "nosuchpool%d/shop" % os.getpid()}})
    proc = a.flocker("init", "--role", "master")
    assert proc.returncode == ff.EXIT_ZFS
    assert proc.stderr == (
        "flocker-failover: error: the pool nosuchpool%d of dataset nosuchpool%d/shop does not "
        "exist on this host ('zpool list' shows the pools there are)\n" % (os.getpid(), os.getpid()))
    assert not os.path.exists(a.state_db)


def test_init_slave_needs_the_parent(bed):
    b = bed.b
    bed.write_config(nodes={"beta": {"dataset": b.pool.name + "/missing/shop"}})
    proc = b.flocker("init", "--role", "slave")
    assert proc.returncode == ff.EXIT_ZFS
    assert proc.stderr == (
        "flocker-failover: error: the parent %s/missing of the replica %s/missing/shop does not "
        "exist; create it with 'zfs create -p %s/missing'\n" % ((b.pool.name,) * 3))
    assert not os.path.exists(b.state_db)


def test_history(bed):
    a = bed.a
    assert a.flocker("init", "--role", "master").returncode == 0
    with ff.StateStore.open(a.state_db, lock_for="test") as s:
        s.conn.execute("INSERT INTO events (ts, level, kind, message) VALUES "
                       "(1000000000, 'warning', 'old', 'long ago')")
        s.record_event("test", "just now")
    out = a.flocker("history", check=True).stdout.splitlines()
    assert len(out) == 3
    assert out[0].endswith("info    init       initialised node alpha as master, epoch 2")
    assert out[1] == "2001-09-09 01:46:40 UTC  warning old        long ago"   # by id: newest last
    assert out[2].endswith("info    test       just now")
    recent = a.flocker("history", "--since", "1h", check=True).stdout
    assert "long ago" not in recent and "just now" in recent
    assert "long ago" in a.flocker("history", "--since", "2001-09-09", check=True).stdout
    assert "long ago" not in a.flocker("history", "--since", "2001-09-09T01:47",
                                       check=True).stdout
    events = json.loads(a.flocker("history", "--json", "--limit", "2", check=True).stdout)
    assert [e["message"] for e in events] == ["long ago", "just now"]
    assert set(events[0]) == {"id", "ts", "level", "kind", "message"}
    proc = a.flocker("history", "--since", "yesterday")
    assert proc.returncode == 2 and ("argument --since: expected an age such as 30m, 2h or 7d, "
                                     "or a UTC time such as 2026-11-24T17:30, found 'yesterday'"
                                     ) in proc.stderr
