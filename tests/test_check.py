"""check: the monitoring verdict, unit-tested and created for real."""


import pytest

import bed as bedmod
from conftest import ff
from test_daemon import Running, init, wait_for


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
