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
        a = S("alpha", rnd.choice([0, 2, 4, 6]), pa, rnd.choice([0, 0, 1, 4096, rnd.randrange(10**9)]))
        b = S("beta", rnd.choice([1, 3, 5, 7]), policy, rnd.choice([0, 0, 1, 4096, rnd.randrange(10**9)]))
        v = both(a, b)
        if pa != policy:
            assert v.status == "policy-mismatch" and v.winner is None
            continue
        if policy == "manual":
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
            assert policy == "zero-changes-only" and a.changes and b.changes


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


def test_manual_never_resolves():
    for ca, cb in itertools.product([0, 1, 100], repeat=2):
        assert both(S("alpha", 2, "manual", ca), S("beta", 3, "manual", cb)).status == "operator"


def test_divergence_facts_round_trip_and_belong_to_one_attempt():
    """The published facts name their common snapshot and their attempt
    (the newest epoch of the pair when it began); facts an earlier
    resolution left on the same snapshot (a lower attempt) are never read
    as this attempt's, a winner's republished ones (higher) are."""
    text = ff.format_divergence("123", 4, 0, 0, "most-changes", None)
    assert text == "v2 123 4 0 0 most-changes -"
    facts = ff.parse_divergence(text)
    assert facts == {"common_guid": "123", "attempt": 4, "epoch": 0, "changes": 0,
                     "policy": "most-changes", "winner": None}
    assert ff.parse_divergence(ff.format_divergence("9", 7, 6, 10, "manual", "beta"))[
        "winner"] == "beta"
    for bad in (None, "", "v1 123 0 0 most-changes -", "v2 123 x 0 0 most-changes -",
                "v2 123 4 0 0 most-changes"):
        assert ff.parse_divergence(bad) is None, bad
    assert ff.facts_of_this_attempt(facts, "123", 4)
    assert not ff.facts_of_this_attempt(facts, "123", 5)    # left from an earlier attempt
    assert ff.facts_of_this_attempt(dict(facts, attempt=6), "123", 5)   # republished by a winner
    assert not ff.facts_of_this_attempt(facts, "456", 4)    # another common snapshot
    assert not ff.facts_of_this_attempt(None, "123", 4)
