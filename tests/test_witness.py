"""The witness: its datagrams, its lease logic on both sides, the decision
rules that use it, the timing rules of the configuration, its server's
persistence (pure or in-process; the real daemons are in
test_witness_bed.py)."""

import json
import os
import sys

import pytest

from conftest import ff

KEY = b"k" * 16 + bytes(range(32))
OTHER = b"o" * 16 + bytes(range(32, 64))
KEYS = ff.wire_keys(KEY)
NONCE = bytes(range(16))


def request(node="alpha", seq=1, lease=10.0, gen=7, nonce=NONCE, cluster="bed"):
    return ff.WitnessMessage(kind=ff.WITNESS_REQUEST, cluster=cluster, node=node, nonce=nonce,
                             generation=gen, sequence=seq, lease_ms=int(lease * 1000))


# -- the datagrams -------------------------------------------------------------

def test_request_bytes_are_pinned():
    """The layout written out above encode_witness, byte for byte."""
    packet = ff.encode_witness(request(), KEY)
    kid = bytes.fromhex(ff.key_id(KEY))[:4]
    head = (b"FLKW" + b"\x01" + b"\x01" + kid + NONCE + (7).to_bytes(8, "big")
            + (1).to_bytes(8, "big") + (10000).to_bytes(4, "big") + b"\x00"
            + (0).to_bytes(4, "big") + b"\x03bed" + b"\x05alpha" + b"\x00")
    assert packet[:-32] == head
    import hashlib
    import hmac
    assert packet[-32:] == hmac.new(KEY, head, hashlib.sha256).digest()
    assert ff.decode_witness(packet, KEYS) == ff.replace(
        request(), key_id=ff.key_id(KEY))
    assert ff.witness_cluster(packet) == "bed"


def test_answer_round_trip():
    a = ff.replace(request(), kind=ff.WITNESS_ANSWER, answer=ff.WITNESS_HELD,
                               lease_ms=0, wait_ms=1500, holder="beta")
    assert ff.decode_witness(ff.encode_witness(a, KEY), KEYS).holder == "beta"


@pytest.mark.parametrize("mangle,reason", [
    (lambda p: p[:-1] + bytes([p[-1] ^ 1]), "bad_mac"),
    (lambda p: p[:50], "truncated"),
    (lambda p: p + b"x" * 1200, "oversized"),
    (lambda p: b"FLKH" + p[4:], "malformed"),
    (lambda p: p[:4] + b"\x02" + p[5:], "bad_version"),
    (lambda p: ff.encode_witness(request(), OTHER), "unknown_key"),
    # an answer's fields in a request: refused after the MAC, as malformed
    (lambda p: ff.encode_witness(ff.replace(request(), answer=1), KEY),
     "malformed"),
    (lambda p: ff.encode_witness(ff.replace(request(), sequence=0), KEY),
     "malformed"),
])
def test_forged_and_broken_datagrams_are_refused(mangle, reason):
    with pytest.raises(ff.WireReject) as e:
        ff.decode_witness(mangle(ff.encode_witness(request(), KEY)), KEYS)
    assert e.value.reason == reason


# -- the witness's ledger --------------------------------------------------------

def book(now=0.0, saved=None, max_lease=60.0):
    return ff.LeaseBook(max_lease, now, {} if saved is None else saved)


def test_one_holder_at_a_time_until_its_lease_and_the_margin_ran_out():
    b = book()
    a = b.request("bed", "alpha", 1, 1, 10.0, now=100.0)
    assert (a.answer, a.lease, a.persist) == (ff.WITNESS_GRANTED, 10.0, True)
    margin = ff.witness_margin(10.0)
    assert margin == 1.0
    # beta is refused while alpha's lease runs, and for the margin after it
    for seq, now in enumerate((100.1, 109.9, 110.0, 110.99), start=1):
        a = b.request("bed", "beta", 1, seq, 10.0, now=now)
        assert (a.answer, a.holder) == (ff.WITNESS_HELD, "alpha"), now
        assert a.wait == pytest.approx(111.0 - now)
    a = b.request("bed", "beta", 1, 9, 10.0, now=111.0)
    assert (a.answer, a.persist) == (ff.WITNESS_GRANTED, True)
    a = b.request("bed", "alpha", 1, 2, 10.0, now=111.5)
    assert (a.answer, a.holder) == (ff.WITNESS_HELD, "beta")


def test_the_holder_renews_and_keeps_it():
    b = book()
    b.request("bed", "alpha", 1, 1, 10.0, now=0.0)
    for i in range(2, 50):
        a = b.request("bed", "alpha", 1, i, 10.0, now=i * 1.0)
        assert a.answer == ff.WITNESS_GRANTED and not a.persist   # nothing new to record
        assert b.request("bed", "beta", 1, i, 10.0, now=i + 0.5).answer == ff.WITNESS_HELD
    # a longer lease than before is recorded before it is answered
    assert b.request("bed", "alpha", 1, 99, 20.0, now=60.0).persist


def test_replayed_or_old_requests_get_no_answer():
    b = book()
    assert b.request("bed", "alpha", 5, 10, 10.0, now=0.0) is not None
    assert b.request("bed", "alpha", 5, 10, 10.0, now=1.0) is None    # the same again
    assert b.request("bed", "alpha", 5, 9, 10.0, now=1.0) is None     # an older one
    assert b.request("bed", "alpha", 4, 99, 10.0, now=1.0) is None    # an older daemon's
    assert b.request("bed", "alpha", 6, 1, 10.0, now=1.0) is not None  # a new daemon
    # each node and each cluster counts on its own
    assert b.request("bed", "beta", 5, 10, 10.0, now=1.0) is not None
    assert b.request("shop", "alpha", 5, 10, 10.0, now=1.0).answer == ff.WITNESS_GRANTED


def test_a_question_never_takes_the_lease():
    b = book()
    a = b.request("bed", "beta", 1, 1, 0.0, now=0.0)
    assert (a.answer, a.holder, a.persist) == (ff.WITNESS_HELD, "", False)
    assert b.request("bed", "alpha", 1, 1, 10.0, now=0.1).answer == ff.WITNESS_GRANTED
    a = b.request("bed", "beta", 1, 2, 0.0, now=0.2)
    assert (a.answer, a.holder) == (ff.WITNESS_HELD, "alpha")


def test_a_lease_longer_than_the_witness_lends_is_refused():
    a = book(max_lease=30.0).request("bed", "alpha", 1, 1, 31.0, now=0.0)
    assert a.answer == ff.WITNESS_REFUSED and "at most 30 s" in a.holder


def test_a_restarted_witness_waits_out_the_lease_it_lent():
    b = book()
    b.request("bed", "alpha", 3, 1, 10.0, now=5.0)
    saved = json.loads(json.dumps(b.record()))      # as the state file holds it
    assert saved == {"bed": {"holder": "alpha", "lease": 10.0, "nodes": {"alpha": [3, 1]}}}
    # it restarts at (its new clock's) 1000: beta waits a whole lease and the margin
    r = ff.LeaseBook(60.0, 1000.0, saved)
    a = r.request("bed", "beta", 1, 1, 10.0, now=1000.0)
    assert (a.answer, a.holder, a.wait) == (ff.WITNESS_HELD, "alpha", 11.0)
    assert r.request("bed", "beta", 1, 2, 10.0, now=1010.9).answer == ff.WITNESS_HELD
    # the holder itself may renew at once (it is the only one that may hold it)
    assert r.request("bed", "alpha", 3, 2, 10.0, now=1000.5).answer == ff.WITNESS_GRANTED
    assert r.request("bed", "alpha", 3, 1, 10.0, now=1000.6) is None   # replay, still
    # had alpha not renewed, beta gets it after the lease and the margin
    r = ff.LeaseBook(60.0, 1000.0, saved)
    assert r.request("bed", "beta", 1, 3, 10.0, now=1011.0).answer == ff.WITNESS_GRANTED


def test_a_witness_without_its_state_file_lends_nothing_for_max_lease():
    b = ff.LeaseBook(30.0, 0.0, None)
    end = 30.0 + ff.witness_margin(30.0)
    a = b.request("bed", "alpha", 1, 1, 10.0, now=0.0)
    assert (a.answer, a.wait) == (ff.WITNESS_WAITING, end)
    assert b.request("bed", "alpha", 1, 2, 10.0, now=end - 0.01).answer == ff.WITNESS_WAITING
    assert b.request("bed", "alpha", 1, 3, 10.0, now=end).answer == ff.WITNESS_GRANTED


# -- the node's view ------------------------------------------------------------

def answer(kind, lease=10.0, holder="", seq=1):
    return ff.replace(request(seq=seq), kind=ff.WITNESS_ANSWER, answer=kind,
                                  lease_ms=int(lease * 1000), holder=holder)


def test_the_node_counts_its_lease_from_when_it_asked():
    v = ff.WitnessView("alpha")
    assert v.left(0.0) == 0.0
    v.answered(sent_at=100.0, m=answer(ff.WITNESS_GRANTED), now=100.4)
    assert v.left(100.4) == pytest.approx(9.6) and v.left(111.0) == 0.0
    v.answered(sent_at=101.0, m=answer(ff.WITNESS_GRANTED, seq=2), now=101.1)
    assert v.left(101.1) == pytest.approx(9.9)
    # a refusal leaves what was granted (waiting: the witness restarted) ...
    v.answered(102.0, answer(ff.WITNESS_WAITING, lease=0, seq=3), 102.1)
    assert v.left(102.1) == pytest.approx(8.9) and not v.other_holds()
    # ... but the word that the peer holds it ends it
    v.answered(103.0, answer(ff.WITNESS_HELD, lease=0, holder="beta", seq=4), 103.1)
    assert v.left(103.1) == 0.0 and v.other_holds()
    assert v.reachable(104.0, within=1.0) and not v.reachable(104.2, within=1.0)


def test_a_stalled_node_drops_its_lease_and_the_answers_to_what_it_asked_before():
    v = ff.WitnessView("alpha")
    v.answered(100.0, answer(ff.WITNESS_GRANTED), 100.1)
    v.lost(now=104.0)
    assert v.left(104.0) == 0.0
    v.answered(103.5, answer(ff.WITNESS_GRANTED, seq=2), 104.1)   # asked before the stall
    assert v.left(104.1) == 0.0
    v.answered(104.2, answer(ff.WITNESS_GRANTED, seq=3), 104.3)
    assert v.left(104.3) == pytest.approx(9.9)


# -- the decision rules -------------------------------------------------------------

T = ff.Timing(dead_time=5.0, startup_wait=10.0, wait_for_peer=False,
              isolation_time=ff.isolation_time(5.0, 1.0), witness_lead=ff.witness_lead(10.0))


def facts(**kw):
    base = dict(role="master", epoch=2, index=0, serving=True, outdated=False, uptime=100.0,
                peer_heard=True, peer_silence=0.5, peer_role="slave", peer_epoch=2,
                highest_epoch_seen=2, witness=9.0)
    base.update(kw)
    return ff.Facts(**base)


def decide(**kw):
    return ff.decide(facts(**kw), T)


def test_master_holding_the_lease_keeps_serving_when_only_the_link_is_cut():
    d = decide(peer_silence=60.0, witness=8.0)
    assert (d.kind, d.reason.split(":")[0]) == ("wait", "serving alone")


def test_master_steps_down_when_half_its_lease_is_gone_and_the_peer_is_silent():
    d = decide(peer_silence=3.0, witness=4.9)
    assert d.kind == "step-down" and "lease was not renewed (4.9 s left)" in d.reason
    # not before the peer was silent for isolation_time (3 s here)
    assert decide(peer_silence=2.9, witness=4.9).kind == "wait"
    assert decide(peer_silence=3.0, witness=5.1).kind == "wait"
    assert decide(peer_silence=60.0, witness=0.0).kind == "step-down"


def test_a_witness_that_is_down_changes_nothing_while_the_nodes_hear_each_other():
    assert decide(peer_silence=0.2, witness=0.0).reason == "serving"
    assert decide(role="slave", serving=False, peer_role="master", witness=0.0,
                  epoch=1, index=1).kind == "wait"


def test_master_steps_down_when_the_witness_lent_the_peer_its_lease():
    d = decide(peer_silence=3.0, witness=0.0, witness_other=True)
    assert d.kind == "step-down" and "lent its lease to the peer" in d.reason
    # ... but not while both hear each other: the split-brain rules decide then
    assert decide(peer_silence=0.2, witness=0.0, witness_other=True).kind == "wait"


def slave(**kw):
    base = dict(role="slave", serving=False, epoch=1, index=1, peer_role="master",
                peer_silence=6.0)
    base.update(kw)
    return decide(**base)


def test_slave_promotes_only_holding_the_lease():
    d = slave(witness=0.0)
    assert d.kind == "wait" and "does not hold the witness's lease" in d.reason
    assert "the peer holds it" in slave(witness=0.0, witness_other=True).reason
    assert slave(witness=9.5).kind == "promote"
    assert slave(witness=None).kind == "promote"           # no witness configured
    assert slave(witness=0.0, force=True).kind == "promote"  # the operator's word


def test_a_starting_master_does_not_resume_alone_without_the_lease():
    d = decide(serving=False, peer_heard=False, peer_silence=20.0, uptime=20.0, witness=0.0)
    assert d.kind == "wait" and "does not hold the witness's lease" in d.reason
    assert decide(serving=False, peer_heard=False, peer_silence=20.0, uptime=20.0,
                  witness=9.0).kind == "resume"


@pytest.mark.parametrize("interval,dead,lease", [
    (1.0, 5.0, 10.0), (1.0, 2.0, 4.0), (0.2, 1.0, 2.0), (0.5, 30.0, 30.0), (2.0, 4.0, 60.0)])
def test_the_isolated_master_has_stepped_down_before_the_slave_can_have_the_lease(
        interval, dead, lease):
    """A simulation on one clock: the master is cut from everything at 0
    right after a renewal (the worst case: its lease is as long as it gets);
    every request the master makes afterwards is lost, the slave asks every
    interval, and the two run their own decide() every 50 ms."""
    assert ff.witness_timing_problem(interval, dead, lease, interval / 2) is None
    t = ff.Timing(dead_time=dead, startup_wait=dead, wait_for_peer=False,
                  isolation_time=ff.isolation_time(dead, interval),
                  witness_lead=ff.witness_lead(lease))
    book_, master, slave_ = ff.LeaseBook(lease * 2, 0.0, {}), ff.WitnessView("alpha"), \
        ff.WitnessView("beta")
    sent = -0.01
    book_.request("bed", "alpha", 1, 1, lease, now=0.0)            # answered at 0
    master.answered(sent, answer(ff.WITNESS_GRANTED, lease=lease), 0.0)
    last_heard = -interval          # the last heartbeat each got from the other
    stepped_down = promoted = None
    seq = 1
    for step in range(int((lease * 3 + dead * 2) / 0.05)):
        now = step * 0.05
        if step % int(round(interval / 0.05)) == 0 and now - last_heard >= dead:
            seq += 1
            a = book_.request("bed", "beta", 1, seq, lease, now=now)
            slave_.answered(now, ff.replace(
                answer(a.answer, lease=a.lease, holder=a.holder, seq=seq)), now)
        fm = facts(peer_silence=now - last_heard, witness=master.left(now))
        if stepped_down is None and ff.decide(fm, t).kind == "step-down":
            stepped_down = now
        fs = facts(role="slave", serving=False, epoch=1, index=1, peer_role="master",
                   peer_silence=now - last_heard, witness=slave_.left(now))
        if promoted is None and ff.decide(fs, t).kind == "promote":
            promoted = now
    assert stepped_down is not None and promoted is not None
    # the master began stopping at least the margin plus half a lease earlier
    # (or, where isolation_time is the later, two intervals more than the margin:
    # witness_lease is at least dead_time)
    assert promoted - stepped_down >= \
        ff.witness_margin(lease) + min(lease / 2, 2 * interval) - 0.1, \
        (stepped_down, promoted)


# -- the configuration -------------------------------------------------------------

@pytest.mark.parametrize("interval,dead,lease,timeout,problem", [
    (1.0, 5.0, 10.0, 0.5, None),
    (1.0, 5.0, 3.9, 0.5, "witness_lease: expected at least 4 times heartbeat_interval (4 s)"),
    (1.0, 12.0, 10.0, 0.5, "witness_lease: expected at least dead_time (12 s)"),
    (1.0, 5.0, 4000.0, 0.5, "witness_lease: expected at most 3600 s"),
    (1.0, 5.0, 10.0, 1.5, "witness_timeout: expected at most heartbeat_interval (1 s)"),
])
def test_witness_timings_are_validated_together(interval, dead, lease, timeout, problem):
    got = ff.witness_timing_problem(interval, dead, lease, timeout)
    assert (got is None) if problem is None else got.startswith(problem), got


CONFIG = """\
[cluster]
name = bed
secret_file = {secret}
state_db = {dir}/state.db
{extra}
[node alpha]
address = 192.0.2.1
dataset = tank/shop

[node beta]
address = 192.0.2.2
dataset = tank/shop
"""


@pytest.fixture
def conf(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    return lambda extra: CONFIG.format(secret=secret, dir=tmp_path, extra=extra)


def test_the_configuration_reads_the_witness_options(conf):
    cfg = ff.parse_config(conf("witness = 192.0.2.254:7789\nwitness_lease = 12\n"))
    assert (cfg.witness, cfg.witness_lease, cfg.witness_timeout) == \
        (("192.0.2.254", 7789), 12.0, 0.5)
    assert ff.parse_config(conf("")).witness is None
    assert "witness = 192.0.2.254:7789" in ff.describe_config(cfg)
    # the timings of an unused witness are not held against the configuration
    assert ff.parse_config(conf("witness_lease = 1\n")).witness is None


@pytest.mark.parametrize("extra,message", [
    ("witness = witness.lan:7789", "[cluster] witness: expected HOST:PORT (IPv6: "
     "[ADDRESS]:PORT), e.g. 192.0.2.254:7789 (an IP address, not a name"),
    ("witness = 192.0.2.254:7789\nwitness_lease = 4", "[cluster] witness_lease: expected "
     "at least dead_time (5 s): half a lease must outlast a stall"),
    ("witness = 192.0.2.254:7789\nwitness_timeout = 2", "[cluster] witness_timeout: "
     "expected at most heartbeat_interval (1 s)"),
])
def test_bad_witness_options_are_refused_with_what_to_do(conf, extra, message):
    with pytest.raises(ff.ConfigError) as e:
        ff.parse_config(conf(extra + "\n"), "f.conf")
    assert message in e.value.message, e.value.message


# -- the server, in this process ----------------------------------------------------

def server(tmp_path, max_lease=60.0, now=0.0):
    s = ff.WitnessServer(("127.0.0.1", 0), {"bed": KEYS}, str(tmp_path / "witness.json"),
                         max_lease)
    s.open(now)
    return s


def ask(s, now, **kw):
    out = s.handle(ff.encode_witness(request(**kw), KEY), now)
    return None if out is None else ff.decode_witness(out, KEYS)


def test_the_grant_is_on_disk_before_the_answer_leaves(tmp_path):
    path = tmp_path / "witness.json"
    s = server(tmp_path)
    # a first start without a state file: nothing for max_lease and its margin
    assert ask(s, 1.0).answer == ff.WITNESS_WAITING
    s.close()
    s = server(tmp_path, now=100.0)            # it knows now that it lent nothing
    orig = ff.write_durably
    seen = []

    def spy(p, text):
        seen.append(json.loads(text))
        orig(p, text)
    ff.write_durably = spy
    try:
        a = ask(s, 100.0, seq=2)
    finally:
        ff.write_durably = orig
    assert a.answer == ff.WITNESS_GRANTED and a.lease_ms == 10000 and a.nonce == NONCE
    assert seen and seen[-1]["clusters"]["bed"]["holder"] == "alpha"
    assert json.loads(path.read_text())["clusters"]["bed"]["holder"] == "alpha"
    s.close()
    # restarted: beta must wait out alpha's whole lease, alpha renews at once
    s = server(tmp_path, now=500.0)
    a = ask(s, 500.0, node="beta", seq=1)
    assert (a.answer, a.holder, a.wait_ms) == (ff.WITNESS_HELD, "alpha", 11000)
    assert ask(s, 500.1, seq=3).answer == ff.WITNESS_GRANTED
    s.close()


def test_the_server_answers_nothing_forged_replayed_or_unknown(tmp_path):
    s = server(tmp_path)
    s.close()
    s = server(tmp_path)
    good = ff.encode_witness(request(), KEY)
    assert s.handle(good, 0.0) is not None
    assert s.handle(good, 0.1) is None                          # replayed
    assert s.handle(good[:-1] + bytes([good[-1] ^ 1]), 0.2) is None        # forged
    assert s.handle(ff.encode_witness(request(seq=5), OTHER), 0.3) is None  # wrong key
    assert s.handle(ff.encode_witness(request(seq=6, cluster="shop"), KEY), 0.4) is None
    answer_ = ff.encode_witness(ff.replace(
        request(seq=7), kind=ff.WITNESS_ANSWER, answer=1), KEY)
    assert s.handle(answer_, 0.5) is None                       # an answer reflected
    assert {k: v for k, v in s.rejected.items() if v} == {
        "replay": 1, "bad_mac": 1, "unknown_key": 1, "wrong_cluster": 1, "malformed": 1}
    s.close()


def test_an_unwritable_state_file_means_no_lease(tmp_path):
    s = server(tmp_path)
    s.close()
    s = server(tmp_path)
    os.chmod(str(tmp_path), 0o500)
    try:
        if os.access(str(tmp_path), os.W_OK):
            orig = ff.write_durably

            def broken(p, text):
                raise PermissionError(13, "Permission denied")
            ff.write_durably = broken
        else:
            orig = None
        try:
            assert ask(s, 0.0) is None
            assert ask(s, 0.1, seq=2) is None        # still nothing on disk: no answer
        finally:
            if orig is not None:
                ff.write_durably = orig
    finally:
        os.chmod(str(tmp_path), 0o700)
    assert ask(s, 0.2, seq=3).answer == ff.WITNESS_GRANTED
    s.close()


def test_a_corrupt_state_file_stops_the_witness_with_what_to_do(tmp_path):
    (tmp_path / "witness.json").write_text("{not json")
    with pytest.raises(ff.StateError) as e:
        server(tmp_path)
    assert "move it aside and the witness lends nothing for --max-lease" in e.value.message


# -- check ---------------------------------------------------------------------------

def report(role="master", state="alive", peer_role="slave", reachable=True):
    return {"node": "alpha", "role": role, "epoch": 2,
            "peer": {"node": "beta", "state": state, "role": peer_role, "age_seconds": 0.1},
            "daemon": {"rejected": {}, "witness": {
                "address": "192.0.2.158:7789", "reachable": reachable,
                "error": None if reachable else "no answer within 0.5 s"}},
            "preserved": []}


def test_check_says_when_the_witness_makes_failover_impossible():
    assert ff.check_verdict(report())[0] == ff.CHECK_OK
    code, text, _ = ff.check_verdict(report(reachable=False))
    assert code == ff.CHECK_WARNING and text.startswith(
        "the witness 192.0.2.158:7789 does not answer (no answer within 0.5 s): no failover "
        "is possible until it answers again")
    code, text, _ = ff.check_verdict(report(role="slave", peer_role="master", reachable=False))
    assert code == ff.CHECK_WARNING
    code, text, _ = ff.check_verdict(report(role="slave", peer_role="master", state="dead",
                                            reachable=False))
    assert code == ff.CHECK_CRITICAL and "failover is not possible: the master is gone and " \
        "the witness 192.0.2.158:7789 does not answer" in text


def test_the_node_takes_only_the_answer_to_its_own_request(conf):
    """A fake witness on loopback answers with garbage, a forged answer, a
    recorded answer to an earlier request, then the real one."""
    import socket
    import threading
    fake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake.bind(("127.0.0.1", 0))
    cfg = ff.parse_config(conf("witness = 127.0.0.1:%d\nwitness_timeout = 1\n"
                               % fake.getsockname()[1]))
    key = cfg.secret
    old = ff.encode_witness(ff.replace(
        request(seq=1, nonce=b"\x01" * 16), kind=ff.WITNESS_ANSWER,
        answer=ff.WITNESS_GRANTED), key)

    def serve():
        data, addr = fake.recvfrom(2048)
        m = ff.decode_witness(data, ff.wire_keys(key))
        good = ff.replace(m, kind=ff.WITNESS_ANSWER, answer=ff.WITNESS_GRANTED)
        for packet in (b"garbage", ff.encode_witness(good, OTHER), old,
                       ff.encode_witness(good, key)):
            fake.sendto(packet, addr)
    t = threading.Thread(target=serve)
    t.start()
    try:
        sent_at, got, why, refused = ff.ask_witness(cfg, request(seq=2, nonce=b"\x02" * 16))
    finally:
        t.join()
        fake.close()
    assert got is not None and got.nonce == b"\x02" * 16 and got.sequence == 2, why
    assert refused == 3


def test_no_witness_listening_is_said_plainly(conf):
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()           # nothing listens there now
    cfg = ff.parse_config(conf("witness = 127.0.0.1:%d\nwitness_timeout = 0.2\n" % port))
    _, got, why, _ = ff.ask_witness(cfg, request())
    assert got is None and why == "no answer within 0.2 s"


def test_witness_command_line_errors_say_what_to_do(tmp_path):
    assert ff.parse_witness_listen("192.0.2.7:9000") == ("192.0.2.7", 9000)
    assert ff.parse_witness_listen(":9000") == ("0.0.0.0", 9000)
    assert ff.parse_witness_listen("[2001:db8::1]") == ("2001:db8::1", ff.WITNESS_PORT)
    for bad in ("witness.lan:7789", "192.0.2.7:0", "192.0.2.7:x"):
        with pytest.raises(ff.ConfigError) as e:
            ff.parse_witness_listen(bad)
        assert "expected ADDRESS:PORT, e.g. 192.0.2.254:7789" in e.value.message
    secret = tmp_path / "s"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    name, keys = ff.parse_witness_cluster("bed=%s" % secret)
    assert name == "bed" and len(keys) == 1
    for bad in ("bed", "bed=relative", "b/d=%s" % secret, "bed=%s,%s,%s" % ((secret,) * 3)):
        with pytest.raises(ff.ConfigError) as e:
            ff.parse_witness_cluster(bad)
        assert "expected NAME=SECRET_FILE or NAME=SECRET_FILE,PREVIOUS_SECRET_FILE" in \
            e.value.message
    secret.chmod(0o644)
    with pytest.raises(ff.ConfigError) as e:
        ff.parse_witness_cluster("bed=%s" % secret)
    assert "run: chmod 600" in e.value.message
    proc = ff.subprocess.run([sys.executable, ff.__file__, "witness", "--cluster",
                              "bed=%s" % secret, "--max-lease", "0.5"],
                             capture_output=True, text=True)
    assert proc.returncode == ff.EXIT_CONFIG and "chmod 600" in proc.stderr
    secret.chmod(0o600)
    proc = ff.subprocess.run([sys.executable, ff.__file__, "witness", "--cluster",
                              "bed=%s" % secret, "--max-lease", "0.5"],
                             capture_output=True, text=True)
    assert proc.returncode == ff.EXIT_CONFIG and "--max-lease 0.5: expected seconds from 1" \
        in proc.stderr


# -- running it at boot ------------------------------------------------------------

CONTRIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "contrib")


def test_the_systemd_unit_starts_the_witness_with_arguments_it_takes():
    with open(os.path.join(CONTRIB, "systemd", "flocker-witness.service")) as f:
        line = [x for x in f if x.startswith("ExecStart=")][0]
    argv = line.split("=", 1)[1].split()
    assert argv[:2] == ["/usr/bin/python3", "/usr/local/sbin/flocker_failover.py"]
    args = ff.build_parser().parse_args(argv[2:])
    assert args.handler is ff.cmd_witness and args.cluster == ["shop=/etc/flocker/secret"]
    assert ff.parse_witness_listen(args.listen) == ("0.0.0.0", ff.WITNESS_PORT)
    assert args.state == ff.WITNESS_STATE


def test_the_init_script_starts_answers_and_stops(tmp_path):
    """On loopback: start, status, a real question answered, stop."""
    import socket
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    pidfile, defaults = tmp_path / "w.pid", tmp_path / "default"
    defaults.write_text(
        'PYTHON=%s\nPROGRAM=%s\nWITNESS_ARGS="--listen 127.0.0.1:%d --cluster bed=%s '
        '--state %s"\nPIDFILE=%s\nLOGFILE=%s\n' % (
            sys.executable, ff.__file__, port, secret, tmp_path / "w.json", pidfile,
            tmp_path / "w.log"))
    env = dict(os.environ, FLOCKER_WITNESS_DEFAULTS=str(defaults))

    def script(action):
        return ff.subprocess.run(["sh", os.path.join(CONTRIB, "init.d", "flocker-witness"),
                                  action], env=env, capture_output=True, text=True,
                                 timeout=60)
    assert script("status").returncode == 3
    st = script("start")
    try:
        assert st.returncode == 0 and st.stdout.startswith("flocker-witness started (pid "), st
        assert script("status").returncode == 0
        key = secret.read_text().strip().encode()
        q = ff.replace(request(lease=0), cluster="bed")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            c.sendto(ff.encode_witness(q, key), ("127.0.0.1", port))
            a = ff.decode_witness(c.recv(2048), ff.wire_keys(key))
        # a first start without a state file: it answers, but lends nothing yet
        assert (a.answer, a.nonce) == (ff.WITNESS_WAITING, NONCE)
    finally:
        st = script("stop")
    assert (st.returncode, st.stdout) == (0, "flocker-witness stopped\n")
    assert not pidfile.exists() and script("status").returncode == 3
    assert "witness listening on UDP 127.0.0.1" in (tmp_path / "w.log").read_text()


def test_who_asks_for_the_lease():
    assert ff.wants_lease("master", "alive") and ff.wants_lease("master", "unknown")
    assert ff.wants_lease("slave", "dead")
    assert not ff.wants_lease("slave", "alive") and not ff.wants_lease("slave", "unknown")


def test_metrics_show_the_witness(conf):
    cfg = ff.parse_config(conf(""))
    live = {"role": "master", "epoch": 2, "serving": True, "rejected": {},
            "peer": {"node": "beta", "state": "alive", "dead_verdicts": 0},
            "witness": {"reachable": False, "lease_left_seconds": 3.5}}
    text = ff.render_metrics(cfg, live, 0.0)
    assert 'flocker_witness_reachable{cluster="bed",node=""} 0' in text
    assert 'flocker_witness_lease_left_seconds{cluster="bed",node=""} 3.5' in text
    del live["witness"]
    assert "witness" not in ff.render_metrics(cfg, live, 0.0)



def test_an_answer_from_another_address_of_the_witness_counts(conf):
    """A witness listening on 0.0.0.0 of a host with several addresses may
    answer from another address than the one it was asked at."""
    import socket
    import threading
    asked = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    asked.bind(("127.0.0.1", 0))
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", 0))
    cfg = ff.parse_config(conf("witness = 127.0.0.1:%d\nwitness_timeout = 1\n"
                               % asked.getsockname()[1]))

    def serve():
        data, addr = asked.recvfrom(2048)
        m = ff.decode_witness(data, ff.wire_keys(cfg.secret))
        other.sendto(ff.encode_witness(ff.replace(
            m, kind=ff.WITNESS_ANSWER, answer=ff.WITNESS_GRANTED), cfg.secret), addr)
    t = threading.Thread(target=serve)
    t.start()
    try:
        _, got, why, _ = ff.ask_witness(cfg, request())
    finally:
        t.join()
        asked.close()
        other.close()
    assert got is not None and got.answer == ff.WITNESS_GRANTED, why


def test_an_unwritable_state_file_at_the_first_start_is_said_as_such(tmp_path):
    s = ff.WitnessServer(("127.0.0.1", 0), {"bed": KEYS},
                         str(tmp_path / "missing" / "witness.json"), 60.0)
    with pytest.raises(ff.StateError) as e:
        s.open(0.0)
    assert e.value.message == ("cannot write the witness's state file %s: No such file or "
                               "directory; it must be writable (--state names another)"
                               % (tmp_path / "missing" / "witness.json"))
    s.close()
