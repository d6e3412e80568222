"""Role safety under faults (issue 12): no two masters and no zero masters
on the paths a fault can take, with two real daemons on the bed.  Each
test samples, every 0.1 s, which hosts run the user system."""

import threading
import time

import bed as bedmod
from conftest import ff
from test_daemon import DEAD, INTERVAL, S, Running, wait_for
from test_failover import lanbed, service_config, serving, start, svc_running  # noqa: F401


class Roles:
    """Samples which hosts run the user system every 0.1 s, in a thread,
    until stopped; then tells the longest time both served, and the
    longest time neither did after a given moment."""

    def __init__(self, bed):
        self.bed = bed
        self.samples = []      # (monotonic time, alpha serving, beta serving)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), svc_running(self.bed.a),
                                 svc_running(self.bed.b)))
            self._stop.wait(0.1)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)
        return self

    def _longest(self, pred, since=0.0):
        longest, begun = 0.0, None
        for t, a, b in self.samples:
            if t < since:
                continue
            if pred(a, b):
                begun = t if begun is None else begun
                longest = max(longest, t - begun)
            else:
                begun = None
        return longest

    def both(self, since=0.0):
        """The longest stretch in which both hosts served."""
        return self._longest(lambda a, b: a and b, since)

    def neither(self, since=0.0):
        """The longest stretch in which no host served."""
        return self._longest(lambda a, b: not a and not b, since)


def test_one_way_heartbeat_loss_never_leaves_two_masters(lanbed):
    """Issue 12, item 4.  Phase 1: the slave's heartbeats no longer reach
    the master (the master's still reach the slave): the slave must not
    promote, since it hears a serving master.  Phase 2: the master's
    heartbeats no longer reach the slave: the slave promotes (it hears
    nobody, the arbitrator answers), and the old master, which still hears
    it say "master, newer epoch", steps down at once instead of serving
    beside it for the whole fault."""
    bed = lanbed
    service_config(bed, cluster={"arbitrator": bed.ARBITRATOR,
                                 "arbitrator_timeout": "%g" % S(0.3)})
    a, b = bed.a, bed.b
    da, db = start(bed)
    roles = Roles(bed)
    try:
        wait_for(lambda: db.status()["arbitrator"] and db.status()["arbitrator"]["reachable"],
                 S(10))
        # phase 1: beta -> alpha dropped
        bed.drop_heartbeats(a)
        wait_for(lambda: da.status()["peer"]["state"] == "dead", S(10))
        time.sleep(3 * DEAD)
        sb = db.status()
        assert (sb["role"], sb["serving"]) == ("slave", False), sb["decision"]
        assert "one direction of the link is lost" in sb["decision"]["reason"]
        assert svc_running(a) and not svc_running(b)
        bed.allow_heartbeats(a)
        wait_for(lambda: da.status()["peer"]["state"] == "alive"
                 and db.status()["peer"]["state"] == "alive", S(10))

        # phase 2: alpha -> beta dropped
        cut = time.monotonic()
        bed.drop_heartbeats(b)
        wait_for(lambda: serving(db), S(15), step=0.05)
        wait_for(lambda: not svc_running(a), S(10), step=0.05)
        wait_for(lambda: da.status()["role"] == "slave", S(30), step=0.1)
        assert "one direction of the link is lost" in a.flocker("history", check=True).stdout
        time.sleep(2 * DEAD)     # and it stays so while the fault lasts
        assert da.status()["role"] == "slave" and not svc_running(a) and svc_running(b)
        overlap = roles.both(since=cut)
        print("both served for %.2f s of the one-way loss" % overlap)
        assert overlap <= DEAD + INTERVAL, overlap
        healed = time.monotonic()
        bed.allow_heartbeats(b)
        wait_for(lambda: da.status()["peer"]["state"] == "alive"
                 and db.status()["peer"]["state"] == "alive", S(10))
        time.sleep(2 * DEAD)
        roles.stop()
        assert serving(db) and not svc_running(a)
        assert roles.both(since=healed) == 0.0
        assert roles.neither(since=cut) <= DEAD + S(5)
    finally:
        roles.stop()
        da.stop()
        db.stop()
