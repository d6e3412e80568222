"""The witness with real daemons: the two hosts and, in the LAN namespace
(192.0.2.158), a real 'flocker_failover.py witness'.  Every test samples
every 0.1 s which host runs the user system, and reads the start/stop
times the user system logged: at most one host may serve at any instant."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import bed as bedmod
from conftest import ff
from test_daemon import DEAD, INTERVAL, S, Running, wait_for
from test_failover import lanbed, serving, service_config, start, svc_log, svc_running  # noqa: F401

WITNESS = ("192.0.2.158", 7789)
LEASE = S(2.0)
TIMEOUT = S(0.2)
MARGIN = ff.witness_margin(LEASE)


class Witness:
    """One witness process in the bed's LAN namespace."""

    def __init__(self, bed, tag="", fresh=False, max_lease=S(5.0)):
        self.bed = bed
        self.state = os.path.join(bed.workdir, "witness.json")
        if not fresh and not os.path.exists(self.state):
            with open(self.state, "w") as f:      # a witness that never lent anything
                json.dump({"version": 1, "clusters": {}}, f)
        self.log = os.path.join(bed.workdir, "daemon-witness%s.log" % tag)
        argv = ["nsenter", "--net=/run/netns/" + bed.lan_ns, sys.executable, bedmod.PROGRAM,
                "witness", "--listen", "%s:%d" % WITNESS,
                "--cluster", "bed=%s" % bed.secret_file, "--state", self.state,
                "--max-lease", "%g" % max_lease]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=f, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()
        wait_for(lambda: "witness listening" in self.text() or self.proc.poll() is not None,
                 S(10))
        assert self.proc.poll() is None, self.text()

    def text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


class Sampler:
    """Every 0.1 s: does each host run the user system?"""

    def __init__(self, bed):
        self.bed = bed
        self.samples = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.time(), svc_running(self.bed.a), svc_running(self.bed.b)))
            self._stop.wait(0.1)

    def stop(self):
        self._stop.set()
        self.thread.join()
        return self

    @property
    def both(self):
        return [s for s in self.samples if s[1] and s[2]]


def overlap(bed):
    """Seconds both hosts ran the user system, from its own start/stop log
    (until now for one still running)."""
    spans = []
    for h in (bed.a, bed.b):
        run, began = [], None
        for what, _, at in svc_log(h):
            if what == "start" and began is None:
                began = at
            elif what == "stop" and began is not None:
                run.append((began, at))
                began = None
        if began is not None:
            run.append((began, time.time()))      # still running
        spans.append(run)
    return sum(max(0.0, min(e1, e2) - max(s1, s2))
               for s1, e1 in spans[0] for s2, e2 in spans[1])


def with_witness(bed, **cluster):
    opts = {"witness": "%s:%d" % WITNESS, "witness_lease": "%g" % LEASE,
            "witness_timeout": "%g" % TIMEOUT}
    opts.update(cluster)
    return service_config(bed, cluster=opts)


def holds_lease(d):
    w = d.status()["witness"]
    return w is not None and w["lease_left_seconds"] > 0


def check(host):
    out = host.flocker("check")
    return out.returncode, out.stdout


@pytest.fixture
def wbed(lanbed):
    w = {"witness": None}
    lanbed.witness = lambda **kw: w.__setitem__("witness", Witness(lanbed, **kw)) or w["witness"]
    try:
        yield lanbed
    finally:
        if w["witness"] is not None:
            w["witness"].kill()


def test_link_cut_while_both_reach_the_witness_leaves_one_master(wbed):
    bed = wbed
    bed.witness()
    with_witness(bed)
    a, b = bed.a, bed.b
    da, db = start(bed)
    sampler = None
    try:
        wait_for(lambda: holds_lease(da), S(10))
        assert not holds_lease(db)
        sampler = Sampler(bed)
        bed.cut_link()
        # much longer than dead_time, the lease and its margin together
        time.sleep(DEAD + 4 * (LEASE + MARGIN))
        sa, sb = da.status(), db.status()
        assert (sa["role"], sa["serving"]) == ("master", True)
        assert (sb["role"], sb["serving"]) == ("slave", False)
        assert sb["peer"]["state"] == "dead"
        assert "does not hold the witness's lease: the peer holds it" in \
            sb["decision"]["reason"]
        assert sb["witness"]["holder"] == "alpha" and sa["witness"]["lease_left_seconds"] > 0
        bed.restore_link()
        wait_for(lambda: db.status()["peer"]["state"] == "alive", S(10))
        time.sleep(2 * DEAD)
        assert serving(da) and db.status()["role"] == "slave"
        sampler.stop()
        print("link cut with a witness: %d samples, both serving in %d, overlap %.3f s"
              % (len(sampler.samples), len(sampler.both), overlap(bed)))
        assert len(sampler.samples) > 10 * (DEAD + 4 * (LEASE + MARGIN)) * 0.8
        assert not sampler.both and overlap(bed) == 0.0
        assert all(s[1] for s in sampler.samples)           # alpha served throughout
        assert [e[0] for e in svc_log(b)] == []
    finally:
        if sampler is not None:
            sampler.stop()
        da.stop()
        db.stop()


def test_link_cut_without_a_witness_gives_two_masters(lanbed):
    """The baseline the witness is for (issue 14): only an arbitrator, the
    heartbeat link cut, both reach the arbitrator: both serve."""
    bed = lanbed
    service_config(bed, cluster={"arbitrator": bed.ARBITRATOR,
                                 "arbitrator_timeout": "%g" % S(0.3)})
    da, db = start(bed)
    sampler = None
    try:
        sampler = Sampler(bed)
        bed.cut_link()
        wait_for(lambda: serving(db), S(15), step=0.05)
        time.sleep(S(2))
        sampler.stop()
        print("link cut without a witness: both serving in %d of %d samples, overlap "
              "%.3f s so far" % (len(sampler.both), len(sampler.samples), overlap(bed)))
        assert sampler.both and serving(da)
    finally:
        if sampler is not None:
            sampler.stop()
        da.stop()
        db.stop()
