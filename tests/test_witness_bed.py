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
from helpers import (DEAD, INTERVAL, S, service_config, serving, start, svc_log, svc_running,
                     wait_for)

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
        # FFT_PYTHON: as the daemons (helpers.Running), e.g. Python 3.8
        argv = ["nsenter", "--net=/run/netns/" + bed.lan_ns,
                os.environ.get("FFT_PYTHON", sys.executable), bedmod.PROGRAM,
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


def holds_address(host):
    """host holds the service address on its LAN interface."""
    out = bedmod.sh(["ip", "-n", host.ns, "-o", "addr", "show", "dev", "lan0"],
                    check=False).stdout
    return (" %s/" % host.bed.SERVICE_ADDRESS) in out


class Sampler:
    """Every 0.1 s: does each host serve (run the user system, or hold the
    service address)?"""

    def __init__(self, bed):
        self.bed = bed
        self.samples = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            a, b = self.bed.a, self.bed.b
            self.samples.append((time.time(), svc_running(a) or holds_address(a),
                                 svc_running(b) or holds_address(b)))
            self._stop.wait(0.1)

    def stop(self):
        self._stop.set()
        self.thread.join()
        return self

    @property
    def both(self):
        return [s for s in self.samples if s[1] and s[2]]


def overlap(bed, killed=None):
    """Seconds both hosts ran the user system, from its own start/stop log
    (until now for one still running; killed: {host: when kill -9 ended it})."""
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
            run.append((began, (killed or {}).get(h, time.time())))  # still running
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
        assert len(sampler.samples) > 5 * (DEAD + 4 * (LEASE + MARGIN))   # ~ every 0.1 s
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


def test_master_cut_from_everything_stops_serving_before_the_slave_promotes(wbed):
    bed = wbed
    bed.witness()
    with_witness(bed)
    a, b = bed.a, bed.b
    da, db = start(bed)
    sampler = None
    try:
        wait_for(lambda: holds_lease(da), S(10))
        sampler = Sampler(bed)
        t_cut = time.time()
        bed.cut_lan(a)
        bed.cut_link()
        wait_for(lambda: serving(db), S(20), step=0.05)
        wait_for(lambda: not svc_running(a), S(5))
        stop_a = [e for e in svc_log(a) if e[0] == "stop"]
        start_b = [e for e in svc_log(b) if e[0] == "start"]
        assert stop_a and len(start_b) == 1
        # alpha's last renewal was answered at most an interval (and the
        # answer's way) before the cut; beta had to wait for its lease to
        # run out at the witness, and the margin after it
        took = start_b[0][2] - t_cut
        print("master cut from everything: alpha stopped %.2f s, beta started %.2f s after "
              "the cut (lease %g s, margin %g s)" % (stop_a[0][2] - t_cut, took, LEASE, MARGIN))
        assert took >= LEASE + MARGIN - INTERVAL - TIMEOUT - S(0.1), took
        assert stop_a[0][2] < start_b[0][2]
        assert stop_a[0][2] - t_cut < LEASE, stop_a        # before its lease ran out
        wait_for(lambda: da.status()["role"] == "slave", S(60), step=0.1)
        assert "the witness's lease was not renewed" in a.flocker("history", check=True).stdout
        # alpha, still cut off, stays a slave without the lease
        time.sleep(2 * (LEASE + MARGIN))
        assert da.status()["role"] == "slave" and not svc_running(a)
        sampler.stop()
        print("overlap: %d samples, both serving in %d, %.3f s by the service's log"
              % (len(sampler.samples), len(sampler.both), overlap(bed)))
        assert not sampler.both and overlap(bed) == 0.0
    finally:
        if sampler is not None:
            sampler.stop()
        da.stop()
        db.stop()


def test_a_restarted_witness_lends_no_second_lease_early(wbed):
    """kill -9 of the witness while alpha holds the lease, alpha cut from
    everything at once, the witness back at once: beta must wait out the
    whole lease, counted from the restart, and the margin."""
    bed = wbed
    w = bed.witness()
    with_witness(bed)
    a, b = bed.a, bed.b
    da, db = start(bed)
    sampler = None
    try:
        wait_for(lambda: holds_lease(da), S(10))
        sampler = Sampler(bed)
        w.kill()
        bed.cut_lan(a)
        bed.cut_link()
        t_restart = time.time()
        w = bed.witness(tag="-2")
        assert "alpha held the lease" in w.text()
        wait_for(lambda: serving(db), S(20), step=0.05)
        start_b = [e for e in svc_log(b) if e[0] == "start"]
        print("witness restarted: beta started %.2f s after the restart (lease %g s + "
              "margin %g s)" % (start_b[0][2] - t_restart, LEASE, MARGIN))
        # a witness that forgot would have lent it after dead_time (1 s)
        assert start_b[0][2] - t_restart >= LEASE + MARGIN, start_b
        wait_for(lambda: not svc_running(a), S(5))
        sampler.stop()
        assert not sampler.both and overlap(bed) == 0.0
    finally:
        if sampler is not None:
            sampler.stop()
        da.stop()
        db.stop()


def test_witness_down_changes_nothing_then_no_failover_without_it(wbed):
    bed = wbed
    w = bed.witness()
    with_witness(bed)
    a, b = bed.a, bed.b
    da, db = start(bed)
    sampler = None
    try:
        wait_for(lambda: holds_lease(da), S(10))
        sampler = Sampler(bed)
        w.kill()
        time.sleep(DEAD + 3 * (LEASE + MARGIN))
        sa, sb = da.status(), db.status()
        assert (sa["role"], sa["serving"], sb["role"]) == ("master", True, "slave")
        assert sa["witness"]["lease_left_seconds"] == 0 and not sa["witness"]["reachable"]
        assert [e[0] for e in svc_log(a)] == ["start"]
        for host in (a, b):
            code, out = check(host)
            assert code == 1 and "the witness 192.0.2.158:7789 does not answer" in out, out
            assert "no failover is possible until it answers again" in out
        assert "does NOT answer" in a.flocker("status", check=True).stdout

        # the master dies while the witness is down: no promotion.  (The
        # sampler stops here: a host killed with -9 keeps the service
        # address on its interface, which is no serving; overlap() below
        # reads the user system's own log up to the kill.)
        sampler.stop()
        a.kill_all()
        t_kill = time.time()
        time.sleep(DEAD + 2 * (LEASE + MARGIN))
        sb = db.status()
        assert (sb["role"], sb["serving"]) == ("slave", False)
        assert "does not hold the witness's lease" in sb["decision"]["reason"]
        code, out = check(b)
        assert code == 2 and "failover is not possible: the master is gone and the witness " \
            "192.0.2.158:7789 does not answer" in out, out
        # the witness returns: it knows alpha held the lease and waits it out
        t_back = time.time()
        bed.witness(tag="-2")
        wait_for(lambda: serving(db), S(20), step=0.05)
        start_b = [e for e in svc_log(b) if e[0] == "start"][0][2]
        print("witness back %.1f s after the master died; beta started %.2f s after that"
              % (t_back - t_kill, start_b - t_back))
        assert start_b - t_back >= LEASE + MARGIN
        sampler.stop()
        assert not sampler.both and overlap(bed, killed={a: t_kill}) == 0.0
    finally:
        if sampler is not None:
            sampler.stop()
        da.stop()
        db.stop()


@pytest.mark.parametrize("witness", [False, True], ids=["without-witness", "with-witness"])
def test_kill_9_of_the_master_failover_time(wbed, witness):
    bed = wbed
    if witness:
        bed.witness()
        with_witness(bed)
    else:
        service_config(bed)
    a, b = bed.a, bed.b
    da, db = start(bed)
    try:
        if witness:
            wait_for(lambda: holds_lease(da), S(10))
        time.sleep(S(1))
        t_kill = time.time()
        a.kill_all()
        wait_for(lambda: serving(db), S(20), step=0.05)
        took = [e for e in svc_log(b) if e[0] == "start"][0][2] - t_kill
        print("kill -9 of the master -> slave serving: %.2f s %s (dead_time %g s%s)" % (
            took, "with a witness" if witness else "without a witness", DEAD,
            ", lease %g s, margin %g s" % (LEASE, MARGIN) if witness else ""))
        least = (LEASE + MARGIN if witness else DEAD) - INTERVAL - TIMEOUT - S(0.1)
        assert least <= took < least + S(5), took
    finally:
        da.stop()
        db.stop()


def test_forged_and_replayed_requests_get_no_answer(wbed):
    """From the LAN: a valid question is answered; the same datagram again,
    one signed with another key, and one with a flipped bit are not."""
    bed = wbed
    bed.witness()
    code = r"""
import importlib.util, json, os, socket, sys
spec = importlib.util.spec_from_file_location("ff", sys.argv[1])
ff = importlib.util.module_from_spec(spec); spec.loader.exec_module(ff)
key = open(sys.argv[2], "rb").read().strip()
keys = ff.wire_keys(key)
m = ff.WitnessMessage(kind=ff.WITNESS_REQUEST, cluster="bed", node="gamma",
                      nonce=os.urandom(16), generation=1, sequence=1, lease_ms=0)
good = ff.encode_witness(m, key)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[3], int(sys.argv[4])))
def ask(packet):
    s.send(packet)
    s.settimeout(1.0)
    try:
        a = ff.decode_witness(s.recv(2048), keys)
        return [a.answer, a.nonce == m.nonce]
    except socket.timeout:
        return None
print(json.dumps({"good": ask(good), "replayed": ask(good),
                  "other_key": ask(ff.encode_witness(
                      ff.replace(m, sequence=2), os.urandom(32).hex().encode())),
                  "flipped": ask(good[:-1] + bytes([good[-1] ^ 1]))}))
"""
    out = bed.lan_run([sys.executable, "-c", code, bedmod.PROGRAM, bed.secret_file,
                       WITNESS[0], str(WITNESS[1])]).stdout
    assert json.loads(out) == {"good": [ff.WITNESS_HELD, True], "replayed": None,
                               "other_key": None, "flipped": None}


def test_promote_force_takes_over_without_the_witness_and_keeps_serving(wbed):
    """The master is dead and the witness down: check says CRITICAL and names
    'promote --force'; the operator runs it: the slave serves, and does not
    step down for want of a lease it cannot get; once the witness is back
    it obtains the lease and goes on as usual."""
    bed = wbed
    w = bed.witness()
    with_witness(bed)
    a, b = bed.a, bed.b
    da, db = start(bed)
    try:
        wait_for(lambda: holds_lease(da), S(10))
        w.kill()
        a.kill_all()
        time.sleep(DEAD + LEASE + MARGIN)
        assert not serving(db)
        assert "'promote --force' takes over without it" in check(b)[1]
        out = b.flocker("promote", "--force", "--wait", "%g" % S(30))
        assert out.returncode == 0, out.stdout + out.stderr
        assert serving(db)
        time.sleep(DEAD + 2 * (LEASE + MARGIN))
        sb = db.status()
        assert (sb["role"], sb["serving"]) == ("master", True), sb["decision"]
        assert [e[0] for e in svc_log(b)] == ["start"]
        bed.witness(tag="-2")
        wait_for(lambda: holds_lease(db), S(20))
        time.sleep(DEAD)
        assert serving(db) and [e[0] for e in svc_log(b)] == ["start"]
    finally:
        da.stop()
        db.stop()


def test_a_cut_right_after_a_switchover_never_makes_two_masters(wbed):
    """After 'promote' (planned switchover) the new master waits for the old
    master's lease to run out; the link fails in that window: the new
    master steps down, the old one, still holding the lease, takes over."""
    bed = wbed
    bed.witness(max_lease=S(10))
    lease = S(6.0)
    with_witness(bed, witness_lease="%g" % lease)
    a, b = bed.a, bed.b
    da, db = start(bed)
    sampler = None
    try:
        wait_for(lambda: holds_lease(da), S(10))
        sampler = Sampler(bed)
        out = b.flocker("promote", "--wait", "%g" % S(30))
        assert out.returncode == 0, out.stdout + out.stderr
        assert serving(db) and not holds_lease(db)
        bed.cut_link()
        t_cut = time.time()
        wait_for(lambda: not svc_running(b), S(10))
        wait_for(lambda: serving(da), S(20), step=0.05)
        # (the replication cycle in flight may keep the rest of beta's
        # step-down waiting for its ssh timeouts; the user system stopped first)
        wait_for(lambda: db.status()["role"] == "slave", S(60), step=0.1)
        time.sleep(DEAD + lease)
        assert serving(da) and db.status()["role"] == "slave"
        history = b.flocker("history").stdout
        assert "the witness lent its lease to the peer" in history or \
            "the witness's lease was not renewed" in history, history
        sampler.stop()
        starts = [e for e in svc_log(a) if e[0] == "start"]
        print("cut %.1f s after the switchover: beta stepped down, alpha serves again "
              "%.2f s after the cut; both serving in %d of %d samples, overlap %.3f s"
              % (t_cut - sampler.samples[0][0], starts[-1][2] - t_cut, len(sampler.both),
                 len(sampler.samples), overlap(bed)))
        assert not sampler.both and overlap(bed) == 0.0
        # beta served once: it did not take the old release again after it
        # stepped down (alpha's last heartbeats, within dead_time, carried it)
        assert [e[0] for e in svc_log(b)] == ["start", "stop"]
    finally:
        if sampler is not None:
            sampler.stop()
        da.stop()
        db.stop()
