"""Real daemons in two network namespaces exchanging real heartbeats."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import bed as bedmod
from conftest import ff

HERE = os.path.dirname(os.path.abspath(__file__))
WRAPPER = os.path.join(HERE, "daemon_wrapper.py")
INTERVAL = 0.2      # the bed's heartbeat_interval
DEAD = 1.0          # the bed's dead_time


class Running:
    """One daemon process on a test host, its log in the bed's work dir."""

    def __init__(self, host, *extra, env=None, wrapper=False, tag=""):
        self.host = host
        self.log = os.path.join(host.bed.workdir, "daemon-%s%s.log" % (host.name, tag))
        program = WRAPPER if wrapper else bedmod.PROGRAM
        argv = [sys.executable, program, "--config", host.bed.config_path,
                "--node", host.name, "daemon"] + list(extra)
        full_env = dict(os.environ, **(env or {}))
        with open(self.log, "ab") as f:
            self.proc = host.popen(argv, stdout=f, stderr=f, stdin=subprocess.DEVNULL,
                                   env=full_env)

    def status(self):
        answer = ff.query_daemon(self.host.state_db, {"cmd": "status"}, timeout=5)
        assert answer is not None and answer["ok"], answer
        return answer["status"]

    def request(self, cmd):
        return ff.query_daemon(self.host.state_db, {"cmd": cmd}, timeout=5)

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
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
            self.proc.send_signal(signal.SIGTERM)   # ip netns exec passes it on by exec
        return self.proc.wait(timeout=timeout)


def wait_for(predicate, timeout, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met within %g s" % timeout)


def init(bed):
    assert bed.a.flocker("init", "--role", "master").returncode == 0
    assert bed.b.flocker("init", "--role", "slave").returncode == 0


def start_pair(bed, **kw):
    a = Running(bed.a, **kw)
    b = Running(bed.b, **kw)
    return a.wait_ready(), b.wait_ready()


def both(a, b, key):
    return a.status()["peer"][key], b.status()["peer"][key]


def run_py(host, code, *args, timeout=60):
    return host.run([sys.executable, "-c", code] + [str(x) for x in args], timeout=timeout)


@pytest.fixture
def bed2(zfs_ready):
    try:
        b = bedmod.Bed(links=2)
    except bedmod.BedUnavailable as e:
        pytest.skip("two-host test bed unavailable: %s" % e)
    try:
        yield b
    finally:
        b.close()


def test_see_each_other_cut_restore_status_and_clean_stop(bed):
    init(bed)
    pidfile = os.path.join(bed.workdir, "alpha.pid")
    a = Running(bed.a, "--pidfile", pidfile)
    b = Running(bed.b)
    a.wait_ready(), b.wait_ready()
    wait_for(lambda: both(a, b, "state") == ("alive", "alive"), 5)
    now = time.monotonic()
    sa, sb = a.status(), b.status()
    # when each started and when each saw its peer, on the shared monotonic clock
    started = max(now - sa["uptime_seconds"], now - sb["uptime_seconds"])
    seen = max(now - sa["peer"]["state_age_seconds"], now - sb["peer"]["state_age_seconds"])
    print("peers alive %.3f s after the second daemon started" % (seen - started))
    assert seen - started <= 2 * INTERVAL + 0.05
    assert with_pid(pidfile) == a.proc.pid

    # one-shot status asks the daemon for live values
    out = json.loads(bed.a.flocker("status", "--json", check=True).stdout)
    assert out["daemon"]["pid"] == a.proc.pid and out["peer"]["state"] == "alive"
    assert out["daemon"]["links"][0]["state"] == "up"
    assert out["peer"]["age_seconds"] < DEAD and out["peer"]["role"] == "slave"
    assert set(out["daemon"]["rejected"]) == set(ff.REJECT_REASONS)
    text = bed.a.flocker("status", check=True).stdout
    assert "daemon      running" in text and "link 0" in text and "rejected    none" in text

    cut = time.monotonic()
    bed.cut_link()
    wait_for(lambda: both(a, b, "state") == ("dead", "dead"), DEAD + 3)
    took = time.monotonic() - cut
    for d in (a, b):
        p = d.status()["peer"]
        print("%s: dead verdict after %.3f s of silence"
              % (d.host.name, p["silence_at_last_verdict_seconds"]))
        assert p["dead_verdicts"] == 1
        assert DEAD <= p["silence_at_last_verdict_seconds"] <= DEAD + INTERVAL
    print("both saw the peer dead %.3f s after the cut" % took)
    assert DEAD - INTERVAL <= took <= DEAD + INTERVAL + 0.3

    restored = time.monotonic()
    bed.restore_link()
    wait_for(lambda: both(a, b, "state") == ("alive", "alive"), 5)
    print("alive again %.3f s after the restore" % (time.monotonic() - restored))
    assert time.monotonic() - restored <= 2 * INTERVAL + 0.3
    assert a.status()["rejected"] == dict.fromkeys(ff.REJECT_REASONS, 0)

    # without the daemon, status falls back to the persisted observation
    assert a.stop() == 0 and b.stop() == 0
    assert not os.path.exists(pidfile)
    assert not os.path.exists(ff.control_socket_path(bed.a.state_db))
    out = json.loads(bed.a.flocker("status", "--json", check=True).stdout)
    assert out["daemon"] is None
    assert out["peer"]["role"] == "slave" and out["peer"]["age_seconds"] < 10
    with sqlite3.connect(bed.a.state_db) as db:
        kinds = [r[0] for r in db.execute("SELECT message FROM events ORDER BY id")]
    assert any("daemon started" in k for k in kinds)
    assert any("is dead" in k for k in kinds) and kinds[-1].startswith("daemon stopped")


def with_pid(path):
    with open(path) as f:
        return int(f.read())
