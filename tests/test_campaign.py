"""The fault campaign (issue 15): a short one with a fixed seed, so CI runs
it every time, and the regression tests of what longer runs of
contrib/campaign found."""

import importlib.machinery
import importlib.util
import io
import os
import time

import bed as bedmod
from conftest import need
from helpers import DEAD, S, replicated, service_config, serving, start, svc_running, wait_for

CAMPAIGN = os.path.join(bedmod.ROOT, "contrib", "campaign")


def load_campaign():
    loader = importlib.machinery.SourceFileLoader("campaign", CAMPAIGN)
    spec = importlib.util.spec_from_loader("campaign", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_a_short_campaign_holds_every_audit(zfs_ready):
    """About a minute of faults drawn from seed 22 against a running pair
    (two links, arbitrator, the fsyncing server and the LAN client), every
    fault of contrib/campaign in the draw: no audit violated, no
    acknowledged write lost."""
    campaign = load_campaign()
    faults = list(campaign.Campaign.FAULTS)
    out = io.StringIO()
    try:
        c = campaign.run_campaign(22, 1.0, links=2, out=out, faults=faults)
    except bedmod.BedUnavailable as e:
        need(False, "two-host test bed unavailable: %s" % e)
    print(out.getvalue())
    assert c.step >= 3, out.getvalue()[-3000:]
    assert c.writes["acknowledged"] > 0
    assert c.writes["lost"] == 0, c.report
    assert c.violations == [], c.report


def test_an_isolated_master_whose_slave_did_not_take_over_serves_again(lanbed):
    """The slave's replica is outdated (its sshd gone: replication fails),
    so it must not take over; then the master is cut from everything
    (LAN and link) for 2 dead_times: it steps down, as it should.  When the
    fault heals, the node with the newest data (alpha) must serve again:
    invariant 2, someone serves within dead_time + startup_wait (plus a
    resolution) after a heal."""
    bed = lanbed
    service_config(bed, cluster={"arbitrator": bed.ARBITRATOR,
                                 "arbitrator_timeout": "%g" % S(0.3)})
    a, b = bed.a, bed.b
    da, db = start(bed)
    try:
        b.kill_sshd()                         # replication fails: beta falls behind
        wait_for(lambda: db.status()["outdated"], S(30), step=0.1)
        bed.cut_lan(a)
        bed.cut_link()
        wait_for(lambda: da.status()["role"] == "slave", S(30), step=0.1)
        time.sleep(DEAD)
        assert db.status()["role"] == "slave" and not svc_running(b)   # outdated: waits
        bed.restore_link()
        bed.restore_lan(a)
        b.start_sshd()
        bed._wait_for_sshd()
        wait_for(lambda: da.status()["peer"]["state"] == "alive", S(10))
        try:
            wait_for(lambda: serving(da) or serving(db), DEAD + S(1.0) + S(10), step=0.1)
        except AssertionError:
            raise AssertionError("nobody serves after the heal: alpha: %s; beta: %s"
                                 % (da.status()["decision"]["reason"],
                                    db.status()["decision"]["reason"]))
        assert serving(da) and not svc_running(b)     # the newest data serves
    finally:
        da.stop()
        db.stop()


def test_a_foreign_snapshot_on_the_slave_is_never_destroyed(lanbed):
    """An operator (or a backup tool) snapshots the slave's replica; the
    master goes on writing and replicating.  The snapshot is not ours:
    whatever replication does next, it must still exist afterwards (on the
    replica, or kept with the replica's preserved data)."""
    bed = lanbed
    service_config(bed)
    a, b = bed.a, bed.b
    da, db = start(bed)
    try:
        bedmod.sh(["zfs", "snapshot", b.dataset + "@operators-own"])
        since = time.time()
        mnt = bedmod.sh(["zfs", "get", "-H", "-o", "value", "mountpoint",
                         a.dataset]).stdout.strip()
        with open(os.path.join(mnt, "after-the-foreign-snapshot"), "w") as f:
            f.write("x" * 100000)
        # the master's next cycles meet the foreign snapshot; give them time
        # to fail, resolve, and replicate again
        deadline = time.monotonic() + S(20)
        while time.monotonic() < deadline and not replicated(da, since=since):
            time.sleep(0.2)
        time.sleep(S(3))
        snaps = bedmod.sh(["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r",
                           b.pool.name]).stdout.split()
        assert any(s.endswith("@operators-own") for s in snaps), (
            "the slave's own snapshot was destroyed; beta's log ends:\n"
            + "".join(db.log_text().splitlines(True)[-15:]))
    finally:
        da.stop()
        db.stop()



def test_a_one_way_loss_healed_right_after_the_takeover_leaves_one_writer_at_once(zfs_ready):
    """Finding 3 of the campaign (both served 1.5-2.8 s, limit 1.4 s): the
    master's heartbeats stop reaching the slave, which promotes (the
    arbitrator answers it); the loss heals the moment the slave's user
    system runs, before the old master heard it say "master, newer epoch"
    on the one-way link (where it steps down at once).  Both now hear each
    other and both serve: a split brain, and the old master went on
    writing until the verdict's round trips over ssh were done.  The pair
    of the campaign (its writing client, replication every 0.5 s), the
    fault three times: both serve no longer than dead_time + one interval."""
    campaign = load_campaign()
    out = io.StringIO()
    c = campaign.Campaign(3, links=2, out=out, faults=["one_way_to_takeover"])
    try:
        try:
            c.build()
        except bedmod.BedUnavailable as e:
            need(False, "two-host test bed unavailable: %s" % e)
        for _ in range(3):
            assert c.run_step("one_way_to_takeover", 0.3 * DEAD, 0.5), out.getvalue()[-3000:]
    finally:
        c.close()
    print(out.getvalue())
    limit = campaign.DEAD + campaign.INTERVAL + 2 * campaign.SAMPLE
    longest = max([o[2] for o in c.overlaps] or [0.0])
    assert len(c.overlaps) >= 1 and longest <= limit, out.getvalue()[-6000:]
    assert c.violations == [], out.getvalue()[-6000:]
