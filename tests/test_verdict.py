"""The divergence verdict: one answer on both hosts, data never lost."""

import itertools
import random

import pytest

from conftest import ff

S = ff.Side
POLICIES = list(ff.POLICIES) + ["prefer-node:alpha", "prefer-node:beta"]


def both(a, b):
    v1, v2 = ff.verdict(a, b), ff.verdict(b, a)
    assert v1 == v2
    return v1


def test_symmetric_and_sound_over_random_histories():
    rnd = random.Random(7)
    for _ in range(20000):
        policy = rnd.choice(POLICIES)
        pa = policy if rnd.random() < 0.95 else rnd.choice(POLICIES)
        a = S("alpha", rnd.choice([0, 2, 4, 6]), pa, rnd.choice([0, 0, 1, 4096, rnd.randrange(10**9)]),
              rnd.random() < 0.5)
        b = S("beta", rnd.choice([1, 3, 5, 7]), policy, rnd.choice([0, 0, 1, 4096, rnd.randrange(10**9)]),
              rnd.random() < 0.5)
        v = both(a, b)
        if a.serving != b.serving:
            # a node that was away rejoins the one that serves, whatever
            # the policy; what it changed meanwhile is kept
            assert v.status == "resolved" and v.winner == ("alpha" if a.serving else "beta")
            assert v.preserve == ((b if a.serving else a).changes > 0)
            continue
        if pa != policy:
            assert v.status == "policy-mismatch" and v.winner is None
            continue
        if policy == "manual" and a.changes and b.changes:
            assert v.status == "operator"
            continue
        if v.status == "resolved":
            loser = a if v.loser == "alpha" else b
            assert {v.winner, v.loser} == {"alpha", "beta"}
            assert v.preserve == (loser.changes > 0)      # changed data is always kept
            if (a.changes > 0) != (b.changes > 0):
                assert v.winner == ("alpha" if a.changes else "beta") and not v.preserve
        else:
            assert v.status == "operator"
            assert policy in ("zero-changes-only", "prefer-node:gamma") or policy == "manual"
            assert a.changes and b.changes


@pytest.mark.parametrize("policy,a,b,winner", [
    ("most-changes", (2, 100), (3, 50), "alpha"),
    ("most-changes", (2, 10), (3, 50), "beta"),
    ("most-changes", (2, 50), (3, 50), "beta"),          # tie: newer epoch
    ("newest-master", (2, 100), (3, 50), "beta"),
    ("newest-master", (4, 1), (3, 50), "alpha"),
    ("oldest-master", (2, 100), (3, 50), "alpha"),
    ("oldest-master", (4, 1), (3, 50), "beta"),
    ("prefer-node:alpha", (2, 1), (3, 999), "alpha"),
    ("prefer-node:beta", (2, 999), (3, 1), "beta"),
    ("zero-changes-only", (2, 0), (3, 5), "beta"),
    ("most-changes", (2, 0), (3, 5), "beta"),            # only one side changed
    ("newest-master", (4, 7), (3, 0), "alpha"),          # the newer master wrote nothing
])
def test_each_policy_can_pick_either_side(policy, a, b, winner):
    v = both(S("alpha", a[0], policy, a[1]), S("beta", b[0], policy, b[1]))
    assert v.status == "resolved" and v.winner == winner


def test_reasons_are_explicit():
    v = both(S("alpha", 2, "most-changes", 100), S("beta", 3, "most-changes", 50))
    assert v.reason == "alpha wins: it changed more (100 bytes against 50)" and v.preserve
    v = both(S("alpha", 2, "most-changes", 0), S("beta", 3, "most-changes", 5))
    assert v.reason == ("beta wins: only beta changed since the common snapshot (5 bytes); "
                        "nothing is lost") and not v.preserve
    v = both(S("alpha", 2, "manual", 1), S("beta", 3, "most-changes", 5))
    assert v.reason == ("the nodes disagree on divergence_policy (alpha: manual, beta: "
                        "most-changes); fix the configuration, nothing is resolved automatically")
    v = both(S("alpha", 2, "zero-changes-only", 1), S("beta", 3, "zero-changes-only", 5))
    assert v.status == "operator" and "an operator decides" in v.reason
    v = both(S("alpha", 2, "prefer-node:gamma", 1), S("beta", 3, "prefer-node:gamma", 5))
    assert v.status == "operator" and "gamma, which is neither alpha nor beta" in v.reason


def test_manual_asks_the_operator_only_when_both_changed():
    """README: a change on one side only continues whatever the policy
    (nothing is lost); with no change on either side the newer epoch
    continues; 'manual' hands the operator only what both sides changed
    (it used to hand over every failback, even with 0 bytes on each side)."""
    for ca, cb in itertools.product([0, 1, 100], repeat=2):
        v = both(S("alpha", 2, "manual", ca), S("beta", 3, "manual", cb))
        if ca and cb:
            assert v.status == "operator" and "divergence_policy = manual" in v.reason
        else:
            assert v.status == "resolved" and not v.preserve
            assert v.winner == ("alpha" if ca else "beta")


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_node_that_was_away_rejoins_the_serving_one_whatever_the_policy(policy):
    """The crashed master returns (not serving) to the slave that took
    over: the one that serves continues, whatever the policy, and what
    the returning node wrote before it died (an unreplicated tail, or only
    access-time noise that outweighs real writes) is kept, never handed
    the service back.  Two serving masters are a split brain: the policy
    decides as before."""
    back = S("alpha", 2, policy, 700000, serving=False)     # crash recovery, atime...
    new = S("beta", 3, policy, 1000, serving=True)
    v = both(back, new)
    assert (v.status, v.winner, v.loser, v.preserve) == ("resolved", "beta", "alpha", True)
    assert "alpha rejoins it as slave" in v.reason and "700000 bytes are kept" in v.reason
    assert ff.is_split_brain(back, new)       # both changed: data is set aside
    # the routine failback: the crashed node changed nothing (or only the
    # new master wrote): a rejoin, no split brain
    for changes in (0, 1000):
        quiet = S("alpha", 2, policy, 0)
        v = both(quiet, S("beta", 3, policy, changes, serving=True))
        assert (v.status, v.winner, v.preserve) == ("resolved", "beta", False)
        assert not ff.is_split_brain(quiet, S("beta", 3, policy, changes, serving=True))
    assert ff.is_split_brain(S("alpha", 2, policy, 0, True), S("beta", 3, policy, 0, True))
    assert ff.is_split_brain(S("alpha", 2, policy, 5), S("beta", 3, policy, 6))
    # an operator's choice still comes first
    v = ff.divergence_verdict(back, new, "alpha", None)
    assert v.winner == "alpha" and "an operator chose it" in v.reason


def test_divergence_facts_round_trip_and_belong_to_one_attempt():
    """The published facts name their common snapshot and their attempt
    (the newest epoch of the pair when it began); facts an earlier
    resolution left on the same snapshot (a lower attempt) are never read
    as this attempt's, a winner's republished ones (higher) are."""
    text = ff.format_divergence("123", 4, 0, 0, "most-changes", None)
    assert text == "v3 123 4 0 0 0 most-changes -"      # pinned: the peer parses it
    facts = ff.parse_divergence(text)
    assert facts == {"common_guid": "123", "attempt": 4, "epoch": 0, "changes": 0,
                     "serving": False, "policy": "most-changes", "recursive": False,
                     "winner": None}
    f = ff.parse_divergence(ff.format_divergence("9", 7, 6, 10, "manual", "beta", True))
    assert f["winner"] == "beta" and f["serving"] is True
    for bad in (None, "", "v1 123 0 0 most-changes -", "v2 123 4 0 0 most-changes -",
                "v3 123 x 0 0 0 most-changes -", "v3 123 4 0 0 2 most-changes -",
                "v3 123 4 0 0 0 most-changes"):
        assert ff.parse_divergence(bad) is None, bad
    assert ff.facts_of_this_attempt(facts, "123", 4)
    assert not ff.facts_of_this_attempt(facts, "123", 5)    # left from an earlier attempt
    assert ff.facts_of_this_attempt(dict(facts, attempt=6), "123", 5)   # republished by a winner
    assert not ff.facts_of_this_attempt(facts, "456", 4)    # another common snapshot
    assert not ff.facts_of_this_attempt(None, "123", 4)


def test_recursive_loser_with_changes_is_left_to_the_operator():
    """Issue 13, item 4: keeping divergent data of a dataset with children
    (recursive = yes) is not done by the tool; a verdict whose loser
    changed anything is refused, the same on both nodes, before anything
    stops (an operator keeps that data by hand: README).  A loser that
    changed nothing rejoins as before."""
    for serving in ((False, False), (True, True), (False, True)):
        for policy in POLICIES:
            for ra, rb in ((True, True), (True, False), (False, True)):
                a = S("alpha", 2, policy, 300, serving[0], recursive=ra)
                b = S("beta", 3, policy, 200, serving[1], recursive=rb)
                v = both(a, b)
                assert v.status != "resolved", (policy, serving, ra, rb, v)
                assert not v.preserve
                if v.status == "operator" and "recursive = yes" in v.reason:
                    assert v.loser is None and v.winner is None
                    assert "no data was changed on either node" in v.reason, v.reason
    v = both(S("alpha", 2, "most-changes", 300, recursive=True),
             S("beta", 3, "most-changes", 200, recursive=True))
    assert v.status == "operator" and v.reason.startswith(
        "alpha would win (it changed more (300 bytes against 200)), but beta changed 200 "
        "bytes since the common snapshot and must keep them"), v.reason
    # a loser that changed nothing: resolved as with recursive = no
    v = both(S("alpha", 2, "most-changes", 300, recursive=True),
             S("beta", 3, "most-changes", 0, recursive=True))
    assert (v.status, v.winner, v.preserve) == ("resolved", "alpha", False)
    v = both(S("alpha", 2, "most-changes", 0, True, recursive=True),
             S("beta", 3, "most-changes", 0, True, recursive=True))
    assert (v.status, v.winner, v.preserve) == ("resolved", "beta", False)
    # an operator's choice of a winner does not get around it
    v = ff.divergence_verdict(S("alpha", 2, "manual", 1, recursive=True),
                              S("beta", 3, "manual", 5, recursive=True), "beta", None)
    assert v.status == "operator" and "recursive = yes" in v.reason, v.reason
    v = ff.divergence_verdict(S("alpha", 2, "manual", 0, recursive=True),
                              S("beta", 3, "manual", 5, recursive=True), "beta", None)
    assert (v.status, v.winner) == ("resolved", "beta")


def test_divergence_facts_say_recursive():
    """With recursive = yes the policy word carries '+recursive': a peer
    of this version reads it; one of an older version sees another policy
    (a mismatch: the operator decides), never a preservation it cannot do."""
    text = ff.format_divergence("9", 4, 2, 10, "most-changes", None, recursive=True)
    assert text == "v3 9 4 2 10 0 most-changes+recursive -"
    f = ff.parse_divergence(text)
    assert f["policy"] == "most-changes" and f["recursive"] is True
    f = ff.parse_divergence(ff.format_divergence("9", 4, 2, 10, "prefer-node:beta", "beta"))
    assert f["policy"] == "prefer-node:beta" and f["recursive"] is False


def test_of_two_serving_masters_exactly_the_older_epoch_yields_before_the_verdict():
    """Two serving masters that hear each other: the one of the older epoch
    stops its user system at once (campaign finding 3), the other keeps
    serving; a node that does not serve, or meets one that does not, or
    knows no epoch of its peer, does not yield."""
    for mine, theirs in itertools.product(range(1, 9), range(1, 9)):
        if mine == theirs:
            continue     # next_epoch: two nodes' epochs never tie
        a = ff.split_brain_yields(mine, theirs, True, True)
        b = ff.split_brain_yields(theirs, mine, True, True)
        assert a != b and a == (theirs > mine)
    assert not ff.split_brain_yields(2, 3, False, True)
    assert not ff.split_brain_yields(2, 3, True, False)
    assert not ff.split_brain_yields(2, None, True, True)
