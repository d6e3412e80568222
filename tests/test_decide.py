"""The decision core: pure rules, tested directly and by simulation."""

import random

import pytest

from conftest import ff

T = ff.Timing(dead_time=5.0, startup_wait=10.0, wait_for_peer=False,
              isolation_time=ff.isolation_time(5.0, 1.0), check_failures=3, hold_down=300)


def facts(**kw):
    base = dict(role="slave", epoch=2, index=1, serving=False, outdated=False, uptime=100.0,
                peer_heard=True, peer_silence=0.5, peer_role="master", peer_epoch=2,
                highest_epoch_seen=2)
    base.update(kw)
    return ff.Facts(**base)


def kind(t=T, **kw):
    return ff.decide(facts(**kw), t).kind


# -- epochs -------------------------------------------------------------------

def test_epochs_of_the_two_nodes_never_meet():
    for seen in range(0, 50):
        a, b = ff.next_epoch(seen, 0), ff.next_epoch(seen, 1)
        assert a > seen and b > seen and a != b
        assert a % 2 == 0 and b % 2 == 1 and max(a, b) == seen + 2 and min(a, b) == seen + 1
    assert ff.initial_epoch("master", 0) == 2 and ff.initial_epoch("master", 1) == 1
    assert ff.initial_epoch("slave", 0) == ff.initial_epoch("slave", 1) == 0
    assert ff.node_index(["beta", "alpha"], "alpha") == 0


# -- the slave -------------------------------------------------------------

def test_slave_waits_while_the_master_is_heard():
    assert kind(peer_silence=4.9) == "wait"


def test_slave_promotes_after_dead_time_with_a_fresh_epoch():
    d = ff.decide(facts(peer_silence=5.0, highest_epoch_seen=6, peer_epoch=6), T)
    assert (d.kind, d.epoch) == ("promote", 7)
    assert d.reason == "no valid heartbeat for 5.0 s"


def test_slave_never_promotes_an_outdated_replica_unless_forced():
    d = ff.decide(facts(peer_silence=60, outdated=True), T)
    assert d.kind == "wait" and "outdated" in d.reason
    d = ff.decide(facts(peer_silence=60, outdated=True, force=True), T)
    assert d.kind == "promote" and d.reason == "the operator forced a takeover"


def test_slave_needs_the_arbitrator_when_one_is_configured():
    assert kind(peer_silence=60, arbitrator=False) == "wait"
    assert kind(peer_silence=60, arbitrator=True) == "promote"


def test_slave_fences_before_promoting():
    assert kind(peer_silence=60, fence=False) == "fence"
    assert kind(peer_silence=60, fence=True) == "promote"
    # a failed arbitrator check comes first: no fencing of a healthy master
    assert kind(peer_silence=60, fence=False, arbitrator=False) == "wait"
    # even a forced takeover fences first
    assert kind(peer_silence=60, fence=False, force=True) == "fence"


def test_starting_slave_that_never_heard_its_peer():
    never = dict(peer_heard=False, peer_role=None, peer_epoch=None)
    assert kind(uptime=14.9, peer_silence=14.9, **never) == "wait"        # < startup + dead
    assert kind(uptime=15.0, peer_silence=15.0, **never) == "promote"
    t = ff.Timing(**dict(T.__dict__, wait_for_peer=True))
    d = ff.decide(facts(uptime=1e6, peer_silence=1e6, **never), t)
    assert d.kind == "wait" and "wait_for_peer = yes" in d.reason
    assert ff.decide(facts(uptime=1e6, peer_silence=1e6, force=True, **never), t).kind == "promote"


def test_two_slaves_wait_for_the_operator_only_when_they_diverged():
    d = ff.decide(facts(peer_role="slave"), T)
    assert d.kind == "wait" and d.reason.startswith("no master")


def test_of_two_slaves_the_one_holding_the_newest_data_promotes():
    """A master stepped down (isolated) while its slave could not take over
    (outdated, or the fault healed too soon): both are slaves and hear each
    other (found by the fault campaign, seed 1 step 3).  The one whose
    replica holds the other's newest snapshot and more takes over; with the
    same newest snapshot, the newer epoch; exactly one of the two."""
    ahead = facts(peer_role="slave", index=0, epoch=2, peer_epoch=0, has_peer_newest=True)
    behind = facts(peer_role="slave", index=1, epoch=0, peer_epoch=2, outdated=True)
    d = ff.decide(ahead, T)
    assert (d.kind, d.epoch) == ("promote", 4) and "holds the newer data" in d.reason
    assert ff.decide(behind, T).kind == "wait"
    # not on the last packets of a peer that went quiet (a node that just
    # stepped down as isolated); a peer that is heard needs no arbitrator
    late = facts(peer_role="slave", index=0, epoch=2, peer_epoch=0, has_peer_newest=True,
                 peer_silence=T.isolation_time)
    assert ff.decide(late, T).kind == "wait"
    heard = facts(peer_role="slave", index=0, epoch=2, peer_epoch=0, has_peer_newest=True,
                  arbitrator=False)
    assert ff.decide(heard, T).kind == "promote"
    # the same newest snapshot: the newer epoch; epochs alike: the first by name
    for (ea, eb), winner in (((2, 3), 1), ((4, 1), 0), ((0, 0), 0)):
        kinds = [ff.decide(facts(peer_role="slave", index=i, epoch=(ea, eb)[i],
                                 peer_epoch=(ea, eb)[1 - i], has_peer_newest=True,
                                 holds_peer_newest=True), T).kind for i in (0, 1)]
        assert kinds[winner] == "promote" and kinds[1 - winner] == "wait", (ea, eb, kinds)


def test_slave_takes_over_when_the_master_hands_over_with_its_newest_snapshot():
    d = ff.decide(facts(peer_role="slave", peer_released=True, holds_peer_newest=True,
                        epoch=2, peer_epoch=6, highest_epoch_seen=6), T)
    assert (d.kind, d.epoch) == ("promote", 7)
    assert d.reason == "the peer handed the master role over"
    d = ff.decide(facts(peer_role="slave", peer_released=True, holds_peer_newest=False), T)
    assert d.kind == "wait" and "lacks its newest snapshot" in d.reason
    # a release this node already took (its own reign, epoch 7, came after the
    # peer's epoch 6) is not taken again: it stepped down since (isolated,
    # or without the witness's lease) and the peer's last heartbeats, still
    # within dead_time, carry the old release
    d = ff.decide(facts(peer_role="slave", peer_released=True, holds_peer_newest=True,
                        epoch=7, peer_epoch=6, highest_epoch_seen=7), T)
    assert d.kind == "wait" and d.reason == (
        "the peer handed over the master role of epoch 6, which this node took "
        "already (epoch 7)"), d
    # the node that handed over waits for its peer; it does not take it back
    d = ff.decide(facts(peer_role="slave", released=True, epoch=4, peer_epoch=4), T)
    assert d.kind == "wait" and "handed the master role over" in d.reason


def test_slave_never_promotes_while_a_serving_master_is_heard_one_way():
    """One direction of the link is lost: the master's authentic packets
    still arrive but do not echo ours (it does not hear us), so the peer is
    not 'alive'; the slave must not take over from a master it hears."""
    d = ff.decide(facts(peer_silence=60, peer_claim_epoch=2, arbitrator=True), T)
    assert d.kind == "wait" and "one direction of the link is lost" in d.reason
    assert kind(peer_silence=60, arbitrator=True) == "promote"
    # the operator may still force it
    assert kind(peer_silence=60, peer_claim_epoch=2, force=True) == "promote"


def test_a_state_file_older_than_the_dataset_takes_the_datasets_role_and_epoch():
    """Issue 12, item 1: restored from a backup, the state file says master
    in epoch 2; the dataset's own marker, written after the state at every
    role change, says slave in epoch 5: the node is slave in epoch 5, and
    never promotes into an epoch it used before."""
    f = ff.state_behind_dataset
    assert f("alpha", "master", 2, ("alpha", "slave", 5)) == ("slave", 5)
    assert f("alpha", "slave", 2, ("alpha", "master", 6)) == ("master", 6)
    assert f("alpha", "master", 4, ("alpha", "slave", 4)) == ("slave", 4)   # a step-down
    assert f("alpha", "slave", 4, ("alpha", "slave", 4)) is None           # current
    assert f("alpha", "slave", 4, ("alpha", "master", 4)) is None   # never toward serving
    assert f("alpha", "master", 6, ("alpha", "slave", 5)) is None
    assert f("alpha", "slave", 2, ("beta", "master", 9)) is None     # the master's, replicated
    assert f("alpha", "slave", 2, None) is None


# -- the master ------------------------------------------------------------

M = dict(role="master", index=0, epoch=4, highest_epoch_seen=4, peer_role="slave", peer_epoch=4)


def test_starting_master_listens_then_resumes_alone():
    never = dict(peer_heard=False, peer_role=None, peer_epoch=None)
    assert kind(uptime=9.9, peer_silence=9.9, **dict(M, **never)) == "wait"
    d = ff.decide(facts(uptime=10.0, peer_silence=10.0, **dict(M, **never)), T)
    assert d.kind == "resume" and "serving alone" in d.reason


def test_starting_master_resumes_when_the_peer_is_slave():
    assert kind(uptime=0.5, **M) == "resume"


def test_starting_master_yields_to_a_newer_master():
    d = ff.decide(facts(uptime=0.5, **dict(M, peer_role="master", peer_epoch=5)), T)
    assert d.kind == "demote" and d.reason == "the peer is master with a newer epoch (5 > 4)"
    # a serving master of an older epoch: both served, the verdict decides
    assert kind(uptime=0.5, peer_serving=True,
                **dict(M, peer_role="master", peer_epoch=3)) == "split-brain"
    # both start as master (a cold start): the newer epoch resumes, the other yields
    d = ff.decide(facts(uptime=0.5, **dict(M, peer_role="master", peer_epoch=3)), T)
    assert d.kind == "resume" and "newer epoch (4 > 3)" in d.reason


def test_serving_master_waits_for_a_starting_former_master_to_yield():
    d = ff.decide(facts(serving=True, **dict(M, peer_role="master", peer_epoch=3)), T)
    assert d.kind == "wait" and "it yields to epoch 4" in d.reason
    assert kind(serving=True, peer_serving=True,
                **dict(M, peer_role="master", peer_epoch=3)) == "split-brain"
    # a starting peer with a newer epoch while we serve: both claim the data
    assert kind(serving=True, **dict(M, peer_role="master", peer_epoch=5)) == "split-brain"


def test_two_serving_masters_are_a_split_brain():
    assert kind(serving=True, **dict(M, peer_role="master", peer_epoch=5)) == "split-brain"


def test_serving_master_keeps_serving_alone_without_arbitrator():
    assert kind(serving=True, peer_silence=1e6, **M) == "wait"


def test_master_steps_down_when_it_hears_a_newer_master_that_does_not_hear_it():
    """The slave took over while it could not hear this master (one
    direction of the link lost); this master still hears it: it steps down
    (the safe direction) instead of serving beside it, arbitrator or not."""
    for arbitrator in (None, True):
        d = ff.decide(facts(serving=True, peer_silence=60, peer_claim_epoch=5,
                            arbitrator=arbitrator, **M), T)
        assert d.kind == "step-down" and "one direction of the link is lost" in d.reason
    # a claim of an older epoch is the other side's to act on
    assert kind(serving=True, peer_silence=60, peer_claim_epoch=3, **M) == "wait"
    # a starting master does not resume beside it
    d = ff.decide(facts(serving=False, peer_silence=60, uptime=1e6, peer_claim_epoch=5, **M), T)
    assert d.kind == "wait" and "not resuming" in d.reason


def test_isolated_master_steps_down():
    assert kind(serving=True, peer_silence=T.isolation_time - 0.01, arbitrator=False, **M) == "wait"
    assert kind(serving=True, peer_silence=T.isolation_time, arbitrator=False, **M) == "step-down"
    assert kind(serving=True, peer_silence=1e6, arbitrator=True, **M) == "wait"


@pytest.mark.parametrize("interval,dead", [(1.0, 5.0), (0.1, 0.5), (0.2, 1.0), (1, 2), (3, 30)])
def test_isolated_master_always_steps_down_before_the_slave_promotes(interval, dead):
    """Both sides measure the same silence, but from their own last packet:
    the measures differ by up to one interval (plus delivery).  Whenever the
    slave may promote, the isolated master has already decided to step down."""
    t = ff.Timing(dead_time=dead, startup_wait=1, wait_for_peer=False,
                  isolation_time=ff.isolation_time(dead, interval))
    rnd = random.Random(interval * 1000 + dead)
    for _ in range(5000):
        slave_silence = rnd.uniform(0, 2 * dead)
        lag = rnd.uniform(0, interval * 0.999)   # the master heard its last packet earlier
        master_silence = slave_silence - lag
        s = ff.decide(facts(peer_silence=slave_silence, arbitrator=True), t)
        m = ff.decide(facts(serving=True, peer_silence=max(0, master_silence), arbitrator=False,
                            **M), t)
        if s.kind == "promote":
            assert m.kind == "step-down", (slave_silence, master_silence)


def test_failing_service_hands_over_only_to_a_healthy_slave_after_hold_down():
    base = dict(M, serving=True)
    assert kind(service_failures=2, peer_up_to_date=True, **base) == "wait"
    assert kind(service_failures=3, peer_up_to_date=True, **base) == "handover"
    d = ff.decide(facts(service_failures=3, peer_up_to_date=False, **base), T)
    assert d.kind == "wait" and "not up to date" in d.reason
    d = ff.decide(facts(service_failures=9, peer_up_to_date=True, since_role_change=60, **base), T)
    assert d.kind == "wait" and "hold-down" in d.reason
    # a dead slave cannot take the service over
    assert kind(service_failures=9, peer_up_to_date=True, peer_silence=60, **base) == "wait"


# -- simulation ------------------------------------------------------------

class Node:
    def __init__(self, index, role, epoch):
        self.index, self.role, self.epoch = index, role, epoch
        self.highest = epoch
        self.up, self.serving, self.outdated = True, False, False
        self.started, self.heard_at, self.peer = 0.0, None, None
        self.reach_arbitrator, self.fenced = True, None
        self.released, self.failures = False, 0
        self.epochs = [epoch]


def simulate(seed, steps=3000):
    rnd = random.Random(seed)
    interval, dt = 0.2, 0.1
    t = ff.Timing(dead_time=1.0, startup_wait=1.0, wait_for_peer=rnd.random() < 0.3,
                  isolation_time=ff.isolation_time(1.0, interval))
    arbitrator = rnd.random() < 0.5
    fence = rnd.choice([None, True, False])        # none, works, fails
    nodes = [Node(0, "master", 2), Node(1, "slave", 0)]
    link = True
    now = 0.0
    promotions = handovers = 0
    for step in range(steps):
        now = round(now + dt, 6)
        r = rnd.random()
        if r < 0.01:
            link = not link
        elif r < 0.02:
            n = rnd.choice(nodes)
            if n.up:
                n.up, n.serving = False, False           # kill -9 / power loss
            else:
                n.up, n.started, n.heard_at, n.peer, n.fenced = True, now, None, None, None
        elif r < 0.03:
            n = rnd.choice(nodes)
            n.reach_arbitrator = not n.reach_arbitrator
        if step % int(interval / dt) == 0 and link and all(n.up for n in nodes):
            for me, other in ((nodes[0], nodes[1]), (nodes[1], nodes[0])):
                me.heard_at, me.peer = now, (other.role, other.epoch, other.serving,
                                             other.released)
                me.highest = max(me.highest, other.epoch)
                if me.role == "slave" and other.role == "master" and rnd.random() < 0.05:
                    me.outdated = True
                if me.role == "slave" and other.role == "master" and rnd.random() < 0.2:
                    me.outdated = False                      # caught up by replication
        for me in nodes:
            if not me.up:
                continue
            other = nodes[1 - me.index]
            f = ff.Facts(
                role=me.role, epoch=me.epoch, index=me.index, serving=me.serving,
                outdated=me.outdated, uptime=now - me.started,
                peer_heard=me.heard_at is not None,
                peer_silence=now - (me.heard_at if me.heard_at is not None else me.started),
                peer_role=me.peer[0] if me.peer else None,
                peer_epoch=me.peer[1] if me.peer else None,
                highest_epoch_seen=me.highest,
                peer_serving=bool(me.peer and me.peer[2]),
                peer_released=bool(me.peer and me.peer[3]),
                holds_peer_newest=True, peer_up_to_date=True,
                service_failures=me.failures, since_role_change=1e9,
                arbitrator=(me.reach_arbitrator if arbitrator else None),
                fence=(me.fenced if fence is not None else None) if me.fenced is not None
                else (False if fence is not None else None))
            d = ff.decide(f, t)
            if me.serving and rnd.random() < 0.01:
                me.failures += 1                          # the service check fails
            if d.kind == "promote" and ff.peer_alive(f, t):
                # only a planned switchover (the peer is alive and gave the role
                # up), or of two slaves the one with the newest data (here they
                # hold the same: the newer epoch, then the first by name)
                assert me.role == "slave" and me.peer[0] == "slave"
                assert f.peer_released or (
                    "both nodes are slaves" in d.reason
                    and (me.epoch, -me.index) > (me.peer[1], -other.index)), d.reason
                assert d.epoch > me.highest and d.epoch % 2 == me.index
                me.role, me.epoch, me.serving, me.failures = "master", d.epoch, True, 0
                me.highest = d.epoch
                promotions += 1
            elif d.kind == "promote":
                # the conditions of a promotion held
                assert me.role == "slave"
                assert not ff.peer_alive(f, t)
                assert not me.outdated
                assert f.arbitrator is not False
                assert f.fence is not False
                if not f.peer_heard:
                    assert not t.wait_for_peer and f.uptime >= t.startup_wait + t.dead_time
                assert d.epoch > me.highest and d.epoch % 2 == me.index
                me.role, me.epoch, me.serving = "master", d.epoch, True
                me.highest = d.epoch
                promotions += 1
            elif d.kind == "fence":
                me.fenced = fence
                if fence:                                  # the fence powers the peer off
                    other.up, other.serving = False, False
            elif d.kind == "resume":
                me.serving = True
            elif d.kind in ("demote", "step-down"):
                me.role, me.serving = "slave", False
            elif d.kind == "handover":
                assert me.serving and ff.peer_alive(f, t) and me.failures >= t.check_failures
                me.role, me.serving, me.released, me.failures = "slave", False, True, 0
                handovers += 1
            elif d.kind == "split-brain":
                if me.epoch < (me.peer[1] or 0):         # stand-in for the divergence verdict
                    me.role, me.serving = "slave", False
            if me.role == "master":
                me.released = False
            me.epochs.append(me.epoch)
        a, b = nodes
        assert not (a.role == b.role == "master" and a.epoch == b.epoch), (seed, step)
        for n in nodes:
            assert n.epochs == sorted(n.epochs)
            if n.role == "master":
                assert n.epoch % 2 == n.index
    return promotions, handovers


def test_randomized_no_two_masters_in_one_epoch_and_no_unfounded_promotion():
    runs = [simulate(seed, steps=2000) for seed in range(120)]
    # the simulation really exercises promotions and planned switchovers
    assert sum(p for p, h in runs) > 50 and sum(h for p, h in runs) > 10, runs
