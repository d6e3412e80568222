"""check: the monitoring verdict, unit-tested and created for real."""

import os
import re
import time

import pytest

import bed as bedmod
from conftest import ff
from helpers import FAST, Running, S, fails, init, ok, prepare, snaps, sync, wait_for, write


def report(role="master", state="alive", peer_role="slave", daemon=True, preserved=()):
    return {"node": "alpha", "role": role, "epoch": 2,
            "peer": {"node": "beta", "state": state if daemon else None, "role": peer_role,
                     "age_seconds": 0.1},
            "daemon": {"rejected": {"bad_mac": 3, "replay": 1}} if daemon else None,
            "preserved": [{"dataset": d} for d in preserved]}


@pytest.mark.parametrize("kw,code,text", [
    ({}, 0, "alpha master epoch 2, peer beta alive"),
    (dict(role="slave", peer_role="master"), 0, "alpha slave epoch 2, peer beta alive"),
    (dict(state="dead"), 1, "peer beta dead: running on one host"),
    (dict(preserved=["t/s-diverged-3-x"]), 1,
     "1 preserved divergent dataset(s) waiting for the operator: t/s-diverged-3-x"),
    (dict(daemon=False), 2, "daemon not running"),
    (dict(peer_role="master"), 2, "split brain: beta is master too"),
    (dict(role="slave"), 2, "no master: this node is slave and beta is slave"),
    (dict(role="slave", peer_role="master", state="dead"), 2,
     "no master: this node is slave and beta is master but not heard"),
])
def test_verdicts(kw, code, text):
    c, t, perf = ff.check_verdict(report(**kw))
    assert c == code and t.startswith(text)
    assert perf.startswith("epoch=2 peer_alive=")
    if kw.get("daemon", True):
        assert "rejected=4c" in perf


def test_worst_problem_first():
    c, t, _ = ff.check_verdict(report(state="dead", preserved=["x"], peer_role="master"))
    assert c == 1 and t.startswith("peer beta dead")
    c, t, _ = ff.check_verdict(report(daemon=False, preserved=["x"]))
    assert c == 2 and t.startswith("daemon not running; 1 preserved")


def test_each_exit_code_for_real(bed):
    init(bed)
    a = bed.a

    def check(*args):
        proc = a.flocker("check", *args)
        return proc.returncode, proc.stdout

    # 2: no daemon where one is expected
    code, out = check()
    assert code == 2 and out.startswith("FLOCKER CRITICAL - daemon not running (alpha master")
    # 1: the daemon runs, but the peer is not there: running on one host
    d = Running(a).wait_ready()
    try:
        code, out = check()
        assert code == 1 and out.startswith("FLOCKER WARNING - peer beta unknown: running on one host")
        # 0: both daemons, peer alive
        e = Running(bed.b).wait_ready()
        try:
            wait_for(lambda: check()[0] == 0, bedmod.scaled(10))
            code, out = check()
            assert out.startswith("FLOCKER OK - alpha master epoch 2, peer beta alive | epoch=2 peer_alive=1")
            assert check("--quiet") == (0, "")
            assert bed.b.flocker("check").returncode == 0
        finally:
            e.stop()
    finally:
        d.stop()
    # 3: something is wrong before any verdict (here: a broken configuration)
    bed.write_config(cluster={"dead_time": "0.1"})
    code, out = check("--quiet")
    assert code == 3 and out.startswith("FLOCKER UNKNOWN - %s: [cluster] dead_time:" % bed.config_path)


# ---------------------------------------------------------------------------
# replication lag: --warn / --crit
# ---------------------------------------------------------------------------

NOW = 1767225600.0                  # 2026-01-01T00:00:00Z
OLD = "flocker-2-20251231T230000.000Z"   # an hour before NOW


def lagging(role="master", pending=0, started=NOW - 5, peer_snapshot=None, peer_age=0.3,
            newest=OLD, error=None):
    r = report(role=role, peer_role="slave" if role == "master" else "master")
    r["peer"].update(snapshot=peer_snapshot, age_seconds=peer_age)
    r["replication"] = {"slave_newest_snapshot": newest,
                        "lag_seconds": None if newest is None else 3600.0,
                        "last_ok_at": None if started is None else started + 1,
                        "last_ok_started": started, "pending": pending,
                        "last_result": "failed" if error else "ok", "last_error": error,
                        "last_error_at": None}
    return r


def test_lag_on_the_master_since_its_last_good_cycle_or_of_the_slaves_newest():
    # nothing pending: as of the start of the last successful cycle (a quiet
    # dataset whose newest snapshot is an hour old shows 5 s)
    assert ff.replication_lag(lagging(), NOW) == (5.0, "since the last successful cycle")
    code, text, perf = ff.check_verdict(lagging(), warn=10, crit=20, now=NOW)
    assert code == 0 and text.endswith("peer beta alive, replication lag 5 s")
    assert perf.endswith(" lag=5.0s;10;20;0 pending=0")
    code, text, perf = ff.check_verdict(lagging(), warn=4, crit=20, now=NOW)
    assert code == 1 and text.startswith(
        "replication lag 5 s > warn 4 s (since the last successful cycle) (alpha master")
    code, text, _ = ff.check_verdict(lagging(), warn=1, crit=4.5, now=NOW)
    assert code == 2 and text.startswith("replication lag 5 s > crit 4.5 s")
    # the last cycle sent a snapshot made after it started: as of that snapshot
    fresh = "flocker-2-20251231T235958.000Z"
    assert ff.replication_lag(lagging(newest=fresh, started=NOW - 100), NOW)[0] == 2.0
    # snapshots pending (the peer was away): the age of the slave's newest,
    # with the reason replication is behind
    r = lagging(pending=2, error="cannot reach node beta")
    assert ff.replication_lag(r, NOW) == (3600.0, "age of the slave's newest snapshot " + OLD)
    code, text, perf = ff.check_verdict(r, warn=60, crit=600, now=NOW)
    assert code == 2 and text.startswith(
        "replication lag 3600 s > crit 600 s (age of the slave's newest snapshot %s) "
        "(last replication error: cannot reach node beta)" % OLD)
    assert perf.endswith(" lag=3600.0s;60;600;0 pending=2")


def test_lag_on_the_slave_from_what_the_master_last_said():
    same = lagging(role="slave", pending=None, started=None, peer_snapshot=OLD, peer_age=0.3)
    assert ff.replication_lag(same, NOW) == (
        0.3, "since the master last named it its newest")
    assert ff.check_verdict(same, warn=1, crit=2, now=NOW)[0] == 0
    newer = lagging(role="slave", pending=None, started=None,
                    peer_snapshot="flocker-2-20260101T000000.000Z")
    assert ff.replication_lag(newer, NOW)[0] == 3600.0
    code, text, _ = ff.check_verdict(newer, warn=60, now=NOW)
    assert code == 1 and text.startswith("replication lag 3600 s > warn 60 s")


def test_no_replica_is_critical_only_with_thresholds():
    r = lagging(newest=None, pending=3, started=None)
    assert ff.replication_lag(r, NOW) == (None, "no replica")
    code, text, perf = ff.check_verdict(r, now=NOW)
    assert code == 0 and "lag=" not in perf and perf.endswith(" pending=3")
    code, text, _ = ff.check_verdict(r, crit=600, now=NOW)
    assert code == 2 and text.startswith("no replica on beta yet, 3 snapshot(s) pending")


def test_threshold_arguments():
    assert [ff.parse_seconds_arg("--warn", t) for t in ("600", "1.5", "90s", "30m", "2h",
                                                        "1d")] == [
        600, 1.5, 90, 1800, 7200, 86400]
    for bad in ("", "-5", "5x", "1h30m", "ten"):
        with pytest.raises(ff.FlockerError) as e:
            ff.parse_seconds_arg("--crit", bad)
        assert "--crit %s: expected seconds" % bad in e.value.message


def test_replication_lag_warning_and_critical_for_real(bed):
    """On the master, without daemons: no replica (critical), then the lag
    grows for real after a sync: OK, WARNING past --warn, CRITICAL past
    --crit; a sync that finds nothing new ends the lag; with the peer away
    and a snapshot pending, the lag is the slave's newest snapshot's age."""
    prepare(bed)
    a = bed.a
    # thresholds on the bed's time scale: a check run itself must take far
    # less than --warn (it takes seconds in an emulated guest)
    warn, crit = S(4), S(8)

    def check(*args):
        p = a.flocker("check", "--no-daemon", "--warn", "%g" % warn, "--crit", "%g" % crit,
                      *args)
        return p.returncode, p.stdout

    code, out = check()
    assert code == 2 and out.startswith("FLOCKER CRITICAL - no replica on beta yet"), out
    write(bed, "x.bin", 20000)
    ok(sync(bed))
    after = time.time()
    code, out = check()
    assert code == 0 and "replication lag " in out and "pending=0" in out, out
    assert check("--quiet") == (0, "")
    time.sleep(max(0.0, after + warn + 0.3 - time.time()))
    code, out = check()
    assert code == 1 and out.startswith("FLOCKER WARNING - replication lag "), out
    assert "> warn %g s (since the last successful cycle)" % warn in out, out
    assert ";%g;%g;0" % (warn, crit) in out, out
    time.sleep(max(0.0, after + crit + 0.3 - time.time()))
    code, out = check("--quiet")
    assert code == 2 and out.startswith("FLOCKER CRITICAL - replication lag "), out
    assert "> crit %g s" % crit in out
    ok(sync(bed))                       # nothing changed, nothing sent: in sync again
    code, out = check()
    assert code == 0, out
    # the peer away: the cycle snapshots what was written but cannot send it
    bed.cut_link()
    try:
        write(bed, "y.bin", 20000)
        fails(sync(bed), ff.EXIT_SSH, "cannot reach node beta")
    finally:
        bed.restore_link()
    code, out = check()
    assert code == 2 and "(age of the slave's newest snapshot flocker-" in out, out
    assert "(last replication error: cannot reach node beta" in out and "pending=1" in out
    # bad thresholds: UNKNOWN, saying why
    p = a.flocker("check", "--warn", "10", "--crit", "5")
    assert p.returncode == 3 and p.stdout.startswith(
        "FLOCKER UNKNOWN - --warn 10 is more than --crit 5"), p.stdout
    p = a.flocker("check", "--warn", "soon")
    assert p.returncode == 3 and "--warn soon: expected seconds" in p.stdout


def test_slave_lag_follows_the_masters_heartbeat_for_real(bed):
    """Daemons on both nodes.  The slave holds what the master names as its
    newest snapshot: no lag, however old that snapshot.  The master still
    heartbeats but cannot replicate (ssh to beta refused): once it names a
    newer snapshot, the slave's lag is its own newest snapshot's age, past
    --warn 3 s (WARNING), then past --crit 5 s (CRITICAL) (both on the
    bed's time scale)."""
    prepare(bed, cluster={"replication_interval": "0.5"}, init=True)
    write(bed, "x.bin", 20000)
    b = bed.b

    warn, crit5 = S(3), S(5)

    def check(crit="%g" % S(300)):
        p = b.flocker("check", "--warn", "%g" % warn, "--crit", crit)
        return p.returncode, p.stdout

    def newest_age():
        names = sorted(n for n in snaps(b.dataset) or {} if ff.is_flocker_snapshot(n))
        return time.time() - ff.snapshot_time(names[-1]) if names else 0.0

    seen = {}

    def settled():
        # the slave's newest snapshot older than --warn, and yet no lag: the
        # master's heartbeat names it as its newest too (that takes until the
        # master's snapshot scan, every 5 s, caught up with its last cycle)
        age = newest_age()
        seen["check"] = check()
        return age > warn + S(0.5) and seen["check"][0] == 0

    da, db = Running(bed.a).wait_ready(), Running(b).wait_ready()
    try:
        wait_for(settled, S(60), step=0.3)
        code, out = seen["check"]
        # the lag is the age of the master's word (its last heartbeat), not
        # of the snapshot: the two figures of the perfdata are the same
        perf = dict(re.findall(r"(peer_age|lag)=([0-9.]+)s", out))
        assert "since" not in out and perf["lag"] == perf["peer_age"], out
        assert float(perf["lag"]) < warn, out
        da.stop()
        broken = bed.write_config(cluster=dict(FAST, replication_interval="0.5"),
                                  nodes={"beta": {"ssh_port": "2222"}},
                                  path=os.path.join(bed.workdir, "alpha-no-ssh.conf"))
        da = Running(bed.a, config=broken, tag="-no-ssh").wait_ready()
        write(bed, "y.bin", 20000)      # snapshotted by alpha, never sent
        wait_for(lambda: set(snaps(bed.a.dataset)) - set(snaps(b.dataset)), S(30), step=0.3)

        def lagging(code, needle, crit="%g" % S(300)):
            seen["check"] = check(crit)
            return seen["check"][0] == code and needle in seen["check"][1]
        # (judged by the text: while alpha's daemon restarted, beta heard no
        # master, which is CRITICAL too)
        try:
            wait_for(lambda: lagging(1, "> warn %g s (age of the slave's newest snapshot "
                                        "flocker-" % warn), S(30), step=0.3)
            wait_for(lambda: lagging(2, "> crit %g s (age of the slave's newest snapshot "
                                     % crit5, crit="%g" % crit5), S(30), step=0.3)
        except AssertionError as e:
            raise AssertionError("%s; last check: %r" % (e, seen["check"])) from None
    finally:
        da.stop()
        db.stop()


def test_daemon_trims_the_event_log_and_check_deep_reads_the_whole_file(bed):
    """The daemon bounds the event log at start-up (event_log_keep_rows) and
    records the trim; an open reads only the header and schema, so damage in
    the middle of the file is found by 'check --deep' (CRITICAL), which
    reads it all."""
    import sqlite3
    init(bed)
    a = bed.a
    conn = sqlite3.connect(a.state_db)
    with conn:
        conn.executemany("INSERT INTO events (ts, level, kind, message) VALUES (?, 'info', "
                         "'liveness', ?)", ((time.time() - 86400 + i, "event %d " % i + "x" * 200)
                                            for i in range(3000)))
    conn.close()
    bed.write_config(cluster={"event_log_keep_rows": "1000"})
    d = Running(a).wait_ready()
    try:
        with ff.StateStore.open(a.state_db) as store:
            events = store.events(limit=10 ** 6)
        assert len(events) <= 1000 + 5, len(events)     # (+ the daemon's own since)
        assert any(e["kind"] == "trim" and "removed" in e["message"] for e in events)
    finally:
        d.stop()
    # damage a page of the events kept (the newest were appended last, at
    # the end of the file; 'status' reads only the newest few)
    pages = os.path.getsize(a.state_db) // 4096
    with open(a.state_db, "r+b") as f:
        f.seek((pages - 10) * 4096)
        f.write(b"\x00" * 4096)
    proc = a.flocker("check", "--no-daemon")
    assert "cannot be used" not in proc.stdout, proc.stdout       # not read: not seen
    proc = a.flocker("check", "--no-daemon", "--deep")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.startswith("FLOCKER CRITICAL - the state file %s cannot be used ("
                                  % a.state_db), proc.stdout
