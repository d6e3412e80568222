"""The ssh gate (issue 7): the peer's key runs only the requests replication
needs, on this node's dataset.  The request language is checked in
microseconds against the exact commands the replication code builds; then,
for real, through the bed's sshd whose authorized_keys forces the gate on
flocker's key (the whole suite replicates through it): hostile requests are
refused, change nothing, and are logged on the peer with their reason."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import bed as bedmod
from conftest import ff
from helpers import (fails, master_digest, mnt, ok, prepare, slave_digest, snaps, sync, wait_for,
                     write)


def zget(ds, prop):
    return bedmod.sh(["zfs", "get", "-H", "-o", "value", prop, ds]).stdout.strip()

D = "tank/shop"
NODES = ("alpha", "beta")
FUSE = ff.ZfsFeatures()


def parse(text, dataset=D, recursive=False):
    return ff.parse_gate_request(text, dataset, recursive, NODES)


def refused(text, *needles, recursive=False):
    with pytest.raises(ff.GateRefused) as e:
        parse(text, recursive=recursive)
    for n in needles:
        assert n in e.value.reason, e.value.reason
    return e.value.reason


def request(words):
    """The request text the client sends for an argument list."""
    return " ".join(ff.shlex.quote(w) for w in words)


# ---------------------------------------------------------------------------
# the request language (pure)
# ---------------------------------------------------------------------------

def test_every_request_replication_makes_is_allowed():
    """Built by the same functions the replication cycle uses, for zfs-fuse
    and for modern OpenZFS, recursive or not."""
    modern = ff.ZfsFeatures(resumable=True, written=True, destroy_multi=True,
                            list_parsable=True, createtxg=True)
    snaps_ = ["flocker-2-20260101T000000.000Z", "flocker-2-20260101T000010.500Z-2"]
    for features in (FUSE, modern):
        for r in (False, True):
            made = [["zfs"] + ff.listing_args(D, features),
                    ["zfs", "get", "-H", "-p", "-o", "value", "written", D],
                    ["zfs", "list", "-H", "-o", "name", "tank"],
                    ["zfs", "list", "-H", "-o", "name", D],
                    ["zfs", "set", "readonly=on", D],
                    ["zfs", "set", "%s=%s" % (ff.ROLE_PROPERTY,
                                              ff.role_marker("alpha", "master", 12)), D],
                    ["zfs", "recv", "-A", D],
                    ff.build_recv_argv(D, features.resumable)]
            made += [["zfs"] + c for c in ff.hold_commands(D, snaps_ + ["users own"], r)]
            made += [["zfs"] + c for c in ff.release_commands(D, snaps_, r)]
            made += [["zfs"] + c for c in ff.destroy_commands(D, snaps_, r, features)]
            if r:       # the replica's tree, a child's partial receive dropped
                made += [["zfs"] + ff.tree_args(D, features),
                         ["zfs", "recv", "-A", D + "/kid"], ["zfs", "recv", "-A", D + "/a/b"]]
            for words in made:
                req = parse(request(words), recursive=r)
                assert req.kind == "zfs" and list(req.args) == words[1:], words
    assert parse(request(ff.build_recv_argv(D, False))).stream
    assert not parse("zfs recv -A " + D).stream
    for text in ("features", "session"):
        assert parse(text) == ff.GateRequest(text, ())
    assert parse("flocker status --json") == ff.GateRequest("flocker", ("status", "--json"))
    # a dataset deeper down: its parents may be listed, not its siblings
    assert parse("zfs list -H -o name tank/a", dataset="tank/a/b").args[-1] == "tank/a"


@pytest.mark.parametrize("text,needles", [
    ("", ["no request", "no login shell"]),
    ("   ", ["no request"]),
    ("rm -rf /", ["'rm' is not a request of the gate"]),
    ("sh -c id", ["'sh' is not a request"]),
    ("/bin/bash", ["is not a request"]),
    ("zfs", ["needs one of"]),
    ("zfs rollback -r %s@flocker-1-20260101T000000.000Z" % D, ["zfs rollback is not allowed"]),
    ("zfs rename %s tank/x" % D, ["zfs rename is not allowed"]),
    ("zfs create tank/x", ["zfs create is not allowed"]),
    ("zfs send %s@x" % D, ["zfs send is not allowed"]),
    ("zfs mount %s" % D, ["zfs mount is not allowed"]),
    ("zfs upgrade -a", ["zfs upgrade is not allowed"]),
    # other datasets, for every operation
    ("zfs get -H -p -o name,property,value guid -d 1 tank/other", ["tank/other is not tank/shop"]),
    ("zfs get -H -p -o name,property,value guid -d 1 tank/shop/kid", ["is not tank/shop"]),
    ("zfs recv -u tank/other", ["tank/other is not tank/shop"]),
    ("zfs recv -u tank", ["tank is not tank/shop"]),
    ("zfs recv -A tank/other", ["is not tank/shop"]),
    ("zfs hold flocker tank/other@s", ["tank/other is not tank/shop"]),
    ("zfs release flocker tank/other@s", ["is not tank/shop"]),
    ("zfs set readonly=on tank/other", ["tank/other is not tank/shop"]),
    ("zfs list -H -o name tank/other", ["of tank/shop or one of its parents"]),
    ("zfs list -H -o name tank/shop/kid", ["of tank/shop or one of its parents"]),
    ("zfs destroy tank/other@flocker-1-20260101T000000.000Z", ["tank/other is not tank/shop"]),
    # destroy: only flocker replication snapshots of the dataset
    ("zfs destroy %s" % D, ["a dataset is never destroyed"]),
    ("zfs destroy tank", ["a dataset is never destroyed"]),
    ("zfs destroy %s@mine" % D, ["@mine: not a flocker replication snapshot"]),
    ("zfs destroy %s@flocker-1-20260101T000000.000Z,mine" % D, ["@mine: not a flocker"]),
    ("zfs destroy %s@flocker-x" % D, ["not a flocker replication snapshot"]),
    ("zfs destroy %s@" % D, ["not a flocker replication snapshot"]),
    ("zfs destroy -r %s@flocker-1-20260101T000000.000Z" % D,
     ["-r (child datasets too) is allowed only with recursive = yes"]),
    ("zfs destroy -R %s@flocker-1-20260101T000000.000Z" % D, ["with no other option"]),
    ("zfs destroy -f %s@flocker-1-20260101T000000.000Z" % D, ["with no other option"]),
    ("zfs destroy -d %s@flocker-1-20260101T000000.000Z" % D, ["with no other option"]),
    ("zfs destroy %s@flocker-1-20260101T000000.000Z %s@flocker-2-20260101T000000.000Z"
     % (D, D), ["with no other option"]),
    # receive: never forced, no other options
    ("zfs recv -F -u %s" % D, ["never -F"]),
    ("zfs recv -u -F %s" % D, ["never -F"]),
    ("zfs recv -u -d %s" % D, ["only 'zfs recv -u [-s] tank/shop'"]),
    ("zfs recv %s" % D, ["only 'zfs recv -u [-s] tank/shop'"]),
    ("zfs recv -u -o mountpoint=/ %s" % D, ["only"]),
    # holds: only the flocker tag
    ("zfs hold mine %s@s" % D, ["only 'zfs hold [-r] flocker"]),
    ("zfs release -r flocker %s@s" % D, ["allowed only with recursive = yes"]),
    ("zfs hold flocker %s" % D, ["only snapshots"]),
    # set: readonly=on and flocker:role only, well formed
    ("zfs set readonly=off %s" % D, ["only 'zfs set readonly=on"]),
    ("zfs set mountpoint=/ %s" % D, ["only 'zfs set readonly=on"]),
    ("zfs set 'flocker:role=mallory master 3' %s" % D, ["only 'zfs set readonly=on"]),
    ("zfs set 'flocker:role=alpha master x' %s" % D, ["only"]),
    ("zfs set 'flocker:role=alpha  master 3' %s" % D, ["only"]),
    ("zfs set readonly=on %s tank/other" % D, ["only"]),
    # get: only the properties and fields replication reads
    ("zfs get -H -p -o name,property,value all -d 1 %s" % D, ["PROPERTIES among"]),
    ("zfs get -H -p -o name,property,value guid,mountpoint -d 1 %s" % D, ["PROPERTIES among"]),
    ("zfs get -H -p -o name,source,value guid -d 1 %s" % D, ["FIELDS one of"]),
    ("zfs get -H -p -o name,property,value guid -r %s" % D, ["allowed only with recursive = yes"]),
    ("zfs get -H -p -o name,property,value guid -d 2 %s" % D, ["only the form"]),
    ("zfs get guid %s" % D, ["only the form"]),
    # the gate's own requests take no arguments; flocker: status only (so far)
    ("features now", ["takes no arguments"]),
    ("session 1", ["takes no arguments"]),
    ("flocker promote", ["only flocker-failover command the gate runs"]),
    ("flocker status", ["only flocker-failover command"]),
    ("flocker status --json --config /tmp/x", ["only flocker-failover command"]),
    # shell syntax never gets in, whatever follows it
    ("zfs list -H -o name %s; rm -rf /" % D, ["';'", "no shell runs here"]),
    ("zfs list -H -o name %s | sh" % D, ["'|'"]),
    ("zfs list -H -o name %s && reboot" % D, ["'&'"]),
    ("zfs list -H -o name $(reboot)", ["'$'", "'('", "')'"]),
    ("zfs list -H -o name `reboot`", ["'`'"]),
    ("zfs list -H -o name %s\nreboot" % D, ["'\\n'"]),
    ("zfs list -H -o name %s\rreboot" % D, ["'\\r'"]),
    ("zfs list -H -o name %s > /etc/passwd" % D, ["'>'"]),
    ("zfs recv -u %s < /dev/zero" % D, ["'<'"]),
    ("zfs list -H -o name ${HOME}", ["'$'", "'{'"]),
    ('zfs list -H -o name "%s"' % D, ["'\"'"]),
    ("zfs list -H -o name %s\\" % D, ["'\\\\'"]),
    ("zfs list -H -o name tank/*", ["'*'"]),
    ("zfs\tlist -H -o name %s" % D, ["'\\t'"]),
    ("zfs destroy %s@flocker-1-20260101T000000.000Z%%flocker-9-20260101T000000.000Z" % D,
     ["'%'"]),
    ("zfs list -H -o name 'tank/shop", ["cannot be split into words"]),
    ("x" * 5000, ["more than 4096"]),
])
def test_refused(text, needles):
    refused(text, *needles)


def test_recursive_allows_r_exactly_where_children_follow():
    snap = "%s@flocker-1-20260101T000000.000Z" % D
    for sub in ("hold -r flocker", "release -r flocker", "destroy -r"):
        assert parse("zfs %s %s" % (sub, snap), recursive=True).args[1] == "-r"
    # a child's partial receive (issue 13, item 4): recursive = yes only,
    # only datasets below D, nothing else
    assert parse("zfs recv -A %s/kid" % D, recursive=True).args == ("recv", "-A", D + "/kid")
    refused("zfs recv -A %s/kid" % D, "only with recursive = yes")
    for bad in (D + "/", D + "//kid", D + "/kid/", D + "kid", "tank/other/kid", "tank"):
        with pytest.raises(ff.GateRefused):
            parse("zfs recv -A %s" % bad, recursive=True)
    refused("zfs recv -u %s/kid" % D, "tank/shop/kid is not tank/shop", recursive=True)
    refused("zfs recv -A -u %s/kid" % D, "is not tank/shop", recursive=True)
    refused("zfs recv -A %s/kid@s" % D, "not a dataset below", recursive=True)
    get_r = "zfs get -H -p -o name,property,value guid,receive_resume_token -r " + D
    assert parse(get_r, recursive=True).args[-2:] == ("-r", D)
    refused(get_r, "-r (child datasets too) is allowed only with recursive = yes")
    refused(get_r.replace(D, D + "/kid"), "is not tank/shop", recursive=True)
    refused(get_r.replace("-r", "-d 2"), "only the form", recursive=True)
    refused("zfs destroy -r -r %s" % snap, "with no other option", recursive=True)
    refused("zfs destroy -r %s" % D, "a dataset is never destroyed", recursive=True)
    refused("zfs destroy -R %s" % snap, "with no other option", recursive=True)


# The first 24 bytes of real streams (zfs-fuse, x86: little-endian): the
# BEGIN record's type and payload length (4 bytes each), the magic
# 0x2f5bacbac (8) and drr_versioninfo (8), whose two low bits are the
# header type: 1 a plain stream ('send -i'), 2 a compound one: a package
# ('send -R', '-p': its payload lists the datasets and their properties,
# here 0x1c0 bytes; a plain stream per dataset follows) or, with no
# payload, the snapshots of one dataset in a row ('send -I').
PLAIN_LE = bytes.fromhex("0000000000000000accbbaf5020000000100000000000000")
PACKAGE_LE = bytes.fromhex("00000000c0010000accbbaf5020000000200000000000000")
SNAPSHOTS_LE = bytes.fromhex("0000000000000000accbbaf5020000000200000000000000")
# the same from a big-endian sender (zfs recv byte-swaps what it reads)
PLAIN_BE = bytes.fromhex("000000000000000000000002f5bacbac0000000000000001")
PACKAGE_BE = bytes.fromhex("00000000000001c000000002f5bacbac0000000000000002")


def header(first):
    """A whole BEGIN record (312 bytes) starting with first."""
    return first + bytes(312 - len(first))


def test_stream_header_decides_before_anything_is_received():
    """(issue 13, item 5) The gate reads the stream's first record itself:
    a package stream carries properties (and with -R child datasets),
    which a node with recursive = no never takes; anything that is not a
    zfs send stream is refused too (pure)."""
    for first in (PLAIN_LE, PLAIN_BE, SNAPSHOTS_LE):
        assert ff.stream_refusal(header(first), recursive=False) == ""
        assert ff.stream_refusal(header(first), recursive=True) == ""
    for first in (PACKAGE_LE, PACKAGE_BE):
        reason = ff.stream_refusal(header(first), recursive=False)
        assert "package stream" in reason and "recursive = yes" in reason, reason
        assert ff.stream_refusal(header(first), recursive=True) == ""
    # a feature flag (bits 2 to 31) beside the header type changes nothing
    flagged = bytearray(header(PACKAGE_LE))
    flagged[16] |= 0x04
    flagged[18] |= 0x02
    assert "package stream" in ff.stream_refusal(bytes(flagged), recursive=False)
    flagged = bytearray(header(PLAIN_BE))
    flagged[23] |= 0xfc
    assert ff.stream_refusal(bytes(flagged), recursive=False) == ""
    not_a_stream = [
        (b"", "ended after 0 bytes"),
        (header(PLAIN_LE)[:311], "ended after 311 bytes"),
        (header(b"\x01" + PLAIN_LE[1:]), "not a zfs send stream"),     # not BEGIN
        (header(PLAIN_LE[:8] + b"\xad" + PLAIN_LE[9:]), "not a zfs send stream"),
        (header(PLAIN_LE[:16] + b"\x03" + PLAIN_LE[17:]), "header type 3"),
        (header(PLAIN_LE[:16] + b"\x00" + PLAIN_LE[17:]), "header type 0"),
        (b"#!/bin/sh\nchmod u+s /bin/sh\n" * 20, "not a zfs send stream"),
    ]
    for head, needle in not_a_stream:
        for r in (False, True):
            reason = ff.stream_refusal(head, recursive=r)
            assert needle in reason, (head[:24], reason)


# ---------------------------------------------------------------------------
# for real: ssh with flocker's key into the bed's gate
# ---------------------------------------------------------------------------

WARNING = 3 * 8 + 4    # syslog facility daemon, severity warning


def gated(bed, remote, stdin=subprocess.DEVNULL, timeout=60):
    """ssh alpha -> beta with flocker's key; remote is the request text."""
    argv = bed.a.ssh_argv(bed.b, [remote] if remote is not None else [], gated=True)
    return subprocess.run(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def test_hostile_requests_are_refused_change_nothing_and_are_logged(bed):
    prepare(bed)
    write(bed, "x.bin", 20000)
    ok(sync(bed))
    b = bed.b
    ds = b.dataset
    other = b.pool.name + "/other"
    bedmod.sh(["zfs", "create", other])
    bedmod.sh(["zfs", "snapshot", ds + "@mine"])
    bedmod.sh(["zfs", "snapshot", other + "@flocker-1-20260101T000000.000Z"])
    flocker_snap = [n for n in snaps(ds) if ff.is_flocker_snapshot(n)][0]
    mark = os.path.join(bed.workdir, "pwned")
    canary = os.path.join(bed.workdir, "canary")
    open(canary, "w").close()
    before = {d: snaps(d) for d in (ds, other)}
    ro = bedmod.sh(["zfs", "get", "-H", "-o", "value", "readonly", ds]).stdout

    cases = [
        ("rm -rf %s" % canary, "'rm' is not a request of the gate"),
        ("rm -rf /", "'rm' is not a request of the gate"),
        ("touch %s" % mark, "'touch' is not a request"),
        (None, "no request"),                                      # a login shell
        ("zfs destroy %s" % ds, "a dataset is never destroyed"),
        ("zfs destroy %s@mine" % ds, "not a flocker replication snapshot"),
        ("zfs destroy -r %s@%s" % (ds, flocker_snap), "allowed only with recursive = yes"),
        ("zfs destroy -R %s@%s" % (ds, flocker_snap), "with no other option"),
        ("zfs destroy %s" % other, "a dataset is never destroyed"),
        ("zfs destroy %s@flocker-1-20260101T000000.000Z" % other, "is not %s" % ds),
        ("zfs get -H -p -o name,property,value guid -d 1 %s" % other, "is not %s" % ds),
        ("zfs recv -u %s" % other, "is not %s" % ds),
        ("zfs recv -F -u %s" % ds, "never -F"),
        ("zfs rollback %s@mine" % ds, "zfs rollback is not allowed"),
        ("zfs set readonly=off %s" % ds, "only 'zfs set readonly=on"),
        ("zfs list -H -o name %s; touch %s" % (ds, mark), "';'"),
        ("zfs list -H -o name %s | touch %s" % (ds, mark), "'|'"),
        ("zfs list -H -o name %s && touch %s" % (ds, mark), "'&'"),
        ("zfs list -H -o name $(touch %s)" % mark, "'$'"),
        ("zfs list -H -o name `touch %s`" % mark, "'`'"),
        ("zfs list -H -o name %s\ntouch %s" % (ds, mark), "'\\n'"),
        ("zfs list -H -o name %s > %s" % (ds, mark), "'>'"),
        ("zfs recv -u %s < %s" % (ds, canary), "'<'"),
        ("flocker promote", "only flocker-failover command the gate runs"),
    ]
    for text, reason in cases:
        p = gated(bed, text)
        assert p.returncode == ff.EXIT_REFUSED, (text, p.returncode, p.stdout, p.stderr)
        assert "ssh-gate on beta: refused: " in p.stderr and reason in p.stderr, (text, p.stderr)
        assert p.stdout == ""
        # the reason is logged on beta (syslog), with the request
        prio, line = bed.gate_log.wait_for(reason, repr(text or "")[1:-1][:40])
        assert prio == WARNING and "flocker-failover[" in line and "refused" in line

    # nothing happened
    assert not os.path.exists(mark) and os.path.exists(canary)
    assert {d: snaps(d) for d in (ds, other)} == before
    assert bedmod.sh(["zfs", "get", "-H", "-o", "value", "readonly", ds]).stdout == ro
    # and what is allowed still works (once the operator removed @mine,
    # which is history the master lacks)
    bedmod.sh(["zfs", "destroy", ds + "@mine"])
    write(bed, "y.bin", 20000)
    ok(sync(bed))
    p = gated(bed, "zfs list -H -o name " + ds)
    assert p.returncode == 0 and p.stdout.strip() == ds, p.stderr


def test_destroy_through_the_gate_takes_only_flocker_snapshots(bed):
    prepare(bed)
    ds = bed.b.dataset
    bedmod.sh(["zfs", "create", ds])
    names = ["flocker-1-20260101T000000.000Z", "flocker-1-20260101T000001.000Z", "keep"]
    for n in names:
        bedmod.sh(["zfs", "snapshot", "%s@%s" % (ds, n)])
    p = gated(bed, "zfs destroy %s@%s" % (ds, names[0]))
    assert p.returncode == 0, p.stderr
    assert sorted(snaps(ds)) == names[1:]
    p = gated(bed, "zfs destroy %s@%s,keep" % (ds, names[1]))
    assert p.returncode == ff.EXIT_REFUSED and "@keep: not a flocker" in p.stderr
    assert sorted(snaps(ds)) == names[1:]
    # a held replication snapshot: the gate lets it through, zfs refuses it
    assert gated(bed, "zfs hold flocker %s@%s" % (ds, names[1])).returncode == 0
    p = gated(bed, "zfs destroy %s@%s" % (ds, names[1]))
    assert p.returncode not in (0, ff.EXIT_REFUSED) and names[1] in snaps(ds)


def test_a_master_takes_no_writes_from_its_peer_through_the_gate(bed):
    """A peer that takes itself for master (mid-cycle, or across a one-way
    link loss) must not write into a live dataset: the gate of a node whose
    state says master refuses recv, set, destroy, hold and release, and
    still answers what only reads."""
    prepare(bed)
    write(bed, "x.bin", 20000)
    ok(sync(bed))
    ds = bed.b.dataset
    snap = sorted(snaps(ds))[-1]
    # beta becomes master in its state file (as a promotion records it)
    assert bed.drive(bed.b, "promote", 3).returncode == 0
    for request in ("zfs set readonly=on %s" % ds,
                    "zfs destroy %s@%s" % (ds, snap),
                    "zfs hold flocker %s@%s" % (ds, snap),
                    "zfs release flocker %s@%s" % (ds, snap),
                    "zfs recv -u %s" % ds):
        p = gated(bed, request)
        assert p.returncode == ff.EXIT_REFUSED, (request, p.stderr)
        assert "node beta is master here (epoch 3)" in p.stderr, p.stderr
    assert snap in snaps(ds) and snaps(ds)[snap][1] > 0       # still there, still held
    assert zget(ds, "readonly") == "off"         # as the promotion left it
    p = gated(bed, "zfs list -H -o name " + ds)
    assert p.returncode == 0 and p.stdout.strip() == ds, p.stderr
    # and the master's own cycle says why it cannot send
    r = sync(bed)
    assert r.returncode != 0 and "beta says it is master" in r.stderr, r.stderr


def read_frame(f):
    head = f.readline().split()
    rc, nout, nerr = (int(w) for w in head)
    return rc, f.read(nout).decode(), f.read(nerr).decode()


def test_session_answers_framed_refuses_the_same_and_ends_when_idle(bed):
    prepare(bed, cluster={"ssh_control_persist": "2"})
    ds = bed.b.dataset
    bedmod.sh(["zfs", "create", ds])
    argv = bed.a.ssh_argv(bed.b, ["session"], gated=True)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"flocker-gate 1 beta\n"

        def ask(text):
            proc.stdin.write(text.encode() + b"\n")
            proc.stdin.flush()
            return read_frame(proc.stdout)

        rc, out, err = ask("zfs list -H -o name " + ds)
        assert (rc, out, err) == (0, ds + "\n", "")
        rc, out, err = ask("zfs list -H -o name %s; touch /tmp/x" % ds)
        assert rc == ff.EXIT_REFUSED and out == "" and "';'" in err
        rc, out, err = ask("zfs recv -u " + ds)     # its stream needs its own connection
        assert rc == ff.EXIT_REFUSED and "not taken within a session" in err
        rc, out, err = ask("zfs list -H -o name %s/nothing" % bed.b.pool.name)
        assert rc == ff.EXIT_REFUSED
        rc, out, err = ask("zfs hold flocker %s@nosuch" % ds)    # allowed; zfs says no
        assert rc not in (0, ff.EXIT_REFUSED) and out == "" and "nosuch" in err
        rc, out, err = ask("features")
        assert rc == 0 and ff.parse_zfs_features(out) == ff.parse_zfs_features(
            ff.gate_features_text().decode())
        rc, out, err = ask("flocker status --json")
        assert rc == 0 and json.loads(out)["node"] == "beta", err
        # idle for ssh_control_persist (2 s): the gate ends the session
        t0 = time.monotonic()
        assert proc.stdout.read() == b""
        assert proc.wait(timeout=30) == 0 and 1.5 < time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_peer_without_the_gate_is_named_with_the_fix(bed):
    """A key without the forced command: replication refuses to guess and
    says which authorized_keys line to write."""
    prepare(bed, cluster={"ssh_identity": bed.admin_key})
    write(bed, "x.bin", 10000)
    fails(sync(bed), ff.EXIT_SSH, "node beta", "runs no flocker-failover ssh gate",
          'restrict,command="/usr/local/sbin/flocker_failover.py --config '
          '/etc/flocker/flocker.conf ssh-gate"', bed.admin_key + ".pub")
    assert snaps(bed.b.dataset) is None


def test_gate_that_cannot_read_its_configuration(bed):
    """The request is refused with the gate's own reason (run on beta by
    hand, as sshd would run it)."""
    prepare(bed)
    env = dict(os.environ, SSH_ORIGINAL_COMMAND="zfs list -H -o name " + bed.b.dataset,
               SSH_CONNECTION="192.0.2.1 5555 192.0.2.2 22")
    p = bed.b.run([sys.executable, bedmod.PROGRAM, "--config", bed.config_path + ".missing",
                   "--syslog-socket", bed.gate_log.path, "ssh-gate"], check=False, env=env)
    assert p.returncode == ff.EXIT_CONFIG and p.stdout == ""
    assert "ssh-gate: cannot serve requests: " in p.stderr and ".missing" in p.stderr
    bed.gate_log.wait_for("cannot serve the peer")
    # without SSH_ORIGINAL_COMMAND and outside sshd: how to use it
    env.pop("SSH_ORIGINAL_COMMAND")
    env.pop("SSH_CONNECTION")
    p = bed.b.run([sys.executable, bedmod.PROGRAM, "--config", bed.config_path, "ssh-gate"],
                  check=False, env=env)
    assert p.returncode == ff.EXIT_USAGE and "forced command" in p.stderr
    assert "SSH_ORIGINAL_COMMAND='zfs list" in p.stderr


def test_by_hand_and_without_a_syslog_socket(bed):
    """Run as sshd runs it: an allowed request replaces the gate with zfs;
    a refusal without a syslog socket tells the client it was not logged."""
    prepare(bed)
    base = [sys.executable, bedmod.PROGRAM, "--config", bed.config_path,
            "--syslog-socket", os.path.join(bed.workdir, "none.sock"), "ssh-gate"]
    env = dict(os.environ, SSH_CONNECTION="192.0.2.1 5555 192.0.2.2 22",
               SSH_ORIGINAL_COMMAND="zfs list -H -o name " + bed.b.pool.name)
    p = bed.b.run(base, check=False, env=env)
    assert p.returncode == 0 and p.stdout == bed.b.pool.name + "\n", p.stderr
    env["SSH_ORIGINAL_COMMAND"] = "rm -rf /"
    p = bed.b.run(base, check=False, env=env)
    assert p.returncode == ff.EXIT_REFUSED and p.stdout == ""
    assert "refused: 'rm' is not a request" in p.stderr
    assert "not logged on beta: no syslog socket there" in p.stderr


def _gate_sessions_on(h):
    """pids of the gate processes serving sessions on host h."""
    out = []
    for pid in bedmod._netns_pids(h.ns):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                words = f.read().split(b"\0")
        except OSError:
            continue
        if b"ssh-gate" in words and bedmod.runs_program(words):
            out.append(pid)
    return out


CYCLES = r"""
import sys
sys.path.insert(0, %(root)r)
import flocker_failover as ff
cfg = ff.load_config(%(config)r, "alpha")
with ff.StateStore.open(cfg.local.state_db, lock_for="test") as store:
    for i in range(3):
        r = ff.replicate_once(cfg, store, ff.Zfs(), ff.peer_zfs(cfg))
        print("cycle", i, r.message, flush=True)
        sys.stdin.readline()
"""


def test_cycles_share_one_gate_session_and_survive_its_death(bed):
    """Like the daemon: cycles in one process reuse one session (a no-change
    cycle starts no gate process); when the session's gate dies, the next
    cycle opens a new one by itself."""
    prepare(bed)
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    code = CYCLES % {"root": bedmod.ROOT, "config": bed.config_path}
    proc = bed.a.popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    try:
        assert "up to date" in proc.stdout.readline()
        first = _gate_sessions_on(bed.b)
        assert len(first) == 1
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert "up to date" in proc.stdout.readline()
        assert _gate_sessions_on(bed.b) == first          # the same session
        os.kill(first[0], signal.SIGKILL)
        write(bed, "y.bin", 10000)
        proc.stdin.write("\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert "beta: sent flocker-" in line, (line, proc.stderr.read())
        again = _gate_sessions_on(bed.b)
        assert len(again) == 1 and again != first
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the process closed its session on the way out
    deadline = time.monotonic() + 10
    while _gate_sessions_on(bed.b) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gate_sessions_on(bed.b) == []


GUARDED = ("mountpoint", "canmount", "exec", "setuid", "devices", "readonly")


def test_receive_excludes_every_guarded_property_where_zfs_can(zfs_ready):
    """OpenZFS 2.3.2 (recorded usage): 'zfs recv -x P' for each property
    that places, mounts, shares or runs files; zfs-fuse has no -x: the
    same receive, and the gate puts back what the stream changed."""
    path = os.path.join(os.path.dirname(__file__), "data", "openzfs-2.3.2-usage.txt")
    with open(path) as f:
        args, guarded = ff.gate_recv_args(("recv", "-u", "-s", D), f.read(), package=True)
    assert guarded == list(ff.RECV_GUARDED)
    assert args == ["recv"] + [w for p in ff.RECV_GUARDED for w in ("-x", p)] + [
        "-u", "-s", D]
    if zfs_ready == "zfs-fuse":
        here = ff.gate_features_text().decode()
        args, guarded = ff.gate_recv_args(("recv", "-u", D), here, package=True)
        assert args == ["recv", "-u", D]
        assert set(guarded) == set(ff.RECV_GUARDED) - {"overlay"}, guarded


def guarded_props(ds):
    return {p: bedmod.sh(["zfs", "get", "-H", "-o", "value,source", p, ds]).stdout.split()
            for p in GUARDED}


def test_a_stream_cannot_place_or_enable_files_through_the_gate(bed):
    """(issue 13, item 5) A 'zfs send -p' stream carries properties that
    zfs recv applies: whoever holds the peer's key could mount the replica
    over /usr/local/bin, with exec and setuid, at this node's next boot or
    promotion.  Through the gate, a stream never changes where the replica
    mounts, whether it mounts, or what may run from it (OpenZFS: 'zfs recv
    -x' keeps them out; zfs-fuse, which has no -x: the gate puts back what
    the stream changed, before anything mounts the replica).  A package
    stream is taken only with recursive = yes (see below)."""
    prepare(bed, cluster={"recursive": "yes"})
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    a, b = bed.a, bed.b
    common = [n for n in snaps(a.dataset) if ff.is_flocker_snapshot(n)][-1]
    # the slave's operator hardened the replica; the master's stream says otherwise
    for kv in ("exec=off", "setuid=off", "devices=off"):
        bedmod.sh(["zfs", "set", kv, b.dataset])
    before = guarded_props(b.dataset)
    evil = os.path.join(bed.workdir, "evil-bin")
    for kv in ("mountpoint=" + evil, "exec=on", "setuid=on", "devices=on", "canmount=on",
               "readonly=off"):
        bedmod.sh(["zfs", "set", kv, a.dataset], check=False)   # (may fail to remount)
        assert zget(a.dataset, kv.split("=")[0]) == kv.split("=")[1], kv
    bedmod.sh(["zfs", "snapshot", a.dataset + "@evil"])
    send = subprocess.Popen(a.argv(["zfs", "send", "-p", "-i", "@" + common,
                                    a.dataset + "@evil"]), stdout=subprocess.PIPE)
    recv = subprocess.run(a.ssh_argv(b, ["zfs", "recv", "-u", b.dataset], gated=True),
                          stdin=send.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)
    send.stdout.close()
    assert send.wait(timeout=60) == 0
    assert recv.returncode == 0, recv.stderr
    assert "evil" in snaps(b.dataset)                       # the data arrived
    # (zfs-fuse: put back by the gate's watcher the moment zfs recv ended)
    wait_for(lambda: not any(v[1] == "received" for v in guarded_props(b.dataset).values()),
             5)
    after = guarded_props(b.dataset)
    # the same values, none of them the stream's (canmount cannot be
    # inherited: put back as a local 'on', its default)
    assert {p: v[0] for p, v in after.items()} == {p: v[0] for p, v in before.items()}, after
    assert all(v[1] != "received" for v in after.values()), after
    assert {p: v for p, v in after.items() if p != "canmount"} == \
        {p: v for p, v in before.items() if p != "canmount"}
    # (zfs-fuse) said on the slave, with the client and the property
    if not ff.parse_zfs_features(ff.gate_features_text().decode()).recv_exclude:
        bed.gate_log.wait_for("set mountpoint=" + evil, "put back")
    # and replication goes on (the cycle sets readonly=on as always)
    bedmod.sh(["zfs", "inherit", "mountpoint", a.dataset])
    if zget(a.dataset, "mounted") != "yes":
        # (zfs-fuse, under load: the set above found the dataset busy, and
        # what is not mounted an inherit does not mount)
        bedmod.sh(["zfs", "mount", a.dataset])
    write(bed, "y.bin", 10000)
    ok(sync(bed))
    assert guarded_props(b.dataset)["mountpoint"] == before["mountpoint"]


# what a hostile package stream sets on the master's dataset and a child
# (sharenfs only where nothing can be shared: no exportfs on this machine)
EVIL = ("exec=on", "setuid=on", "devices=on", "readonly=off", "canmount=on")
SHARED = ("sharenfs",) if bedmod.shutil.which("exportfs") is None else ()
WATCHED = GUARDED + SHARED


def _make_evil(bed, evil_dir):
    """On the master: its dataset, and a new child 'kid', carry every
    property that would place or run files on the slave (mountpoint
    evil_dir, evil_dir-kid), in snapshot @evil (mounted there or not:
    that is the master's own business)."""
    a = bed.a.dataset
    bedmod.sh(["zfs", "create", a + "/kid"])
    for ds in (a + "/kid", a):
        bedmod.sh(["zfs", "unmount", ds])
    places = ((a, evil_dir), (a + "/kid", evil_dir + "-kid"))
    for ds, where in places:
        for kv in ("canmount=noauto", "mountpoint=" + where) + EVIL:
            bedmod.sh(["zfs", "set", kv, ds], check=False)
    # sharing last (OpenZFS sets nothing more on a dataset it cannot
    # share; zfs may say it cannot share: it is set all the same)
    for ds, where in places:
        for prop in SHARED:
            bedmod.sh(["zfs", "set", prop + "=on", ds], check=False)
    for ds, where in places:
        for kv in ("mountpoint=" + where,) + EVIL + tuple(p + "=on" for p in SHARED):
            assert zget(ds, kv.split("=")[0]) == kv.split("=")[1], (ds, kv)
    bedmod.sh(["zfs", "snapshot", "-r", a + "@evil"])


def _unmake_evil(bed):
    """The master's dataset and its child as they were before (plain)."""
    a = bed.a.dataset
    for ds in (a, a + "/kid"):
        bedmod.sh(["zfs", "unmount", ds], check=False)
    for ds in (a + "/kid", a):          # sharing first (see _make_evil)
        for prop in SHARED:
            bedmod.sh(["zfs", "inherit", prop, ds], check=False)
    for ds in (a, a + "/kid"):
        for prop in ("mountpoint", "exec", "setuid", "devices", "readonly"):
            bedmod.sh(["zfs", "inherit", prop, ds], check=False)   # (may say: cannot share)
        bedmod.sh(["zfs", "set", "canmount=on", ds], check=False)
    for ds in (a + "/kid", a):          # (zfs-fuse mounts what it changes)
        bedmod.sh(["zfs", "unmount", ds], check=False)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(mnt(bed.a, a + "/kid"))    # left empty where a mounts
    for ds in (a, a + "/kid"):
        assert zget(ds, "mountpoint") == mnt(bed.a, ds), ds
        bedmod.sh(["zfs", "mount", ds])


def _send_through_gate(bed, send_args, timeout=120):
    """zfs send SEND_ARGS on the master | ssh (flocker's key) slave 'zfs
    recv -u D': the gate on the slave decides.  Returns the ssh result."""
    a, b = bed.a, bed.b
    send = subprocess.Popen(a.argv(["zfs", "send"] + list(send_args)),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        recv = subprocess.run(a.ssh_argv(b, ["zfs", "recv", "-u", b.dataset], gated=True),
                              stdin=send.stdout, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=timeout)
    finally:
        send.stdout.close()
        if send.wait(timeout=60) is None:       # pragma: no cover
            send.kill()
    return recv


def _tree(ds):
    """{dataset: {property: [value, source]}} of ds and below, for the
    guarded properties (and 'mounted')."""
    out = {}
    p = bedmod.sh(["zfs", "get", "-H", "-r", "-o", "name,property,value,source",
                   ",".join(WATCHED + ("mounted",)), ds])
    for line in p.stdout.splitlines():
        name, prop, value, source = line.split("\t")
        if "@" not in name:
            out.setdefault(name, {})[prop] = [value, source]
    return out


def _mounts_of(ds):
    """{dataset: where it is mounted} for ds and the datasets below it."""
    out = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[0] == ds or fields[0].startswith(ds + "/"):
                out[fields[0]] = fields[1].replace("\\040", " ")
    return out


def test_package_stream_is_refused_when_not_recursive(bed):
    """(issue 13, item 5) With recursive = no, replication sends plain
    streams only.  A package stream ('zfs send -R' or '-p': a list of
    datasets with their properties, then a stream per dataset) would set
    the replica's mountpoint, exec, setuid, canmount and sharenfs and create
    child datasets: the gate reads the stream's first record and refuses
    it before anything is received, says why to the client and logs it.
    The replica stays exactly as it was; plain replication goes on."""
    prepare(bed)
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    a, b = bed.a, bed.b
    common = [n for n in snaps(a.dataset) if ff.is_flocker_snapshot(n)][-1]
    before = (snaps(b.dataset), _tree(b.pool.name), slave_digest(bed))
    evil = os.path.join(bed.workdir, "evil-bin")
    _make_evil(bed, evil)
    for flags in (["-R"], ["-p"]):
        recv = _send_through_gate(bed, flags + ["-i", "@" + common, a.dataset + "@evil"])
        assert recv.returncode == ff.EXIT_REFUSED, (flags, recv.returncode, recv.stderr)
        assert "ssh-gate on beta: refused: " in recv.stderr, recv.stderr
        assert "package stream" in recv.stderr and "recursive = no" in recv.stderr
        prio, line = bed.gate_log.wait_for("package stream", "zfs recv -u " + b.dataset)
        assert prio == WARNING
        # nothing arrived: no snapshot, no child, not a property
        assert (snaps(b.dataset), _tree(b.pool.name)) == before[:2]
    assert slave_digest(bed) == before[2]
    # the plain stream of the same snapshot is taken (and carries no property)
    recv = _send_through_gate(bed, ["-i", "@" + common, a.dataset + "@evil"])
    assert recv.returncode == 0, recv.stderr
    assert "evil" in snaps(b.dataset)
    assert _tree(b.pool.name) == before[1]
    _unmake_evil(bed)
    write(bed, "y.bin", 10000)
    ok(sync(bed))
    assert slave_digest(bed) == master_digest(bed)
    assert _tree(b.pool.name) == before[1]


def test_package_stream_of_a_recursive_pair_sets_no_guarded_property(bed, zfs_ready):
    """(issue 13, item 5) With recursive = yes, package streams are what
    replication sends ('zfs send -R'): the gate takes them, and the guard
    covers every dataset the stream creates or changes below the replica
    too (OpenZFS: 'zfs recv -x' applies to the descendants; zfs-fuse: the
    gate puts back what the stream set, on each of them).  Nothing mounts
    anywhere but below the replica's own mountpoint."""
    prepare(bed, cluster={"recursive": "yes"})
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    a, b = bed.a, bed.b
    common = [n for n in snaps(a.dataset) if ff.is_flocker_snapshot(n)][-1]
    before = _tree(b.dataset)
    evil = os.path.join(bed.workdir, "evil-bin")
    _make_evil(bed, evil)
    recv = _send_through_gate(bed, ["-R", "-i", "@" + common, a.dataset + "@evil"])
    assert recv.returncode == 0, recv.stderr
    kid = b.dataset + "/kid"
    assert "evil" in snaps(kid)                        # the child arrived

    # (zfs-fuse: the gate puts back what the stream set, and unmounts what
    # that mounted, the moment zfs recv ended)
    deadline = time.monotonic() + bedmod.scaled(5)
    while True:
        after = _tree(b.dataset)
        received = [(ds, prop) for ds, props in after.items()
                    for prop, (value, src) in props.items() if src == "received"]
        mounted = [ds for ds in after if after[ds]["mounted"][0] == "yes"
                   and before.get(ds, {}).get("mounted", ["no"])[0] != "yes"]
        if not (received or mounted) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not received and not mounted, (after, bed.gate_log.messages)
    # canmount, which cannot be inherited, may have been put back as a local 'on'
    assert after[b.dataset].pop("canmount")[0] == before[b.dataset].pop("canmount")[0]
    assert after[b.dataset] == before[b.dataset], after
    # the new child: every guarded property inherited from the replica (or
    # the default), never the stream's; canmount, not inheritable: on.
    # (zfs-fuse keeps the received value of a dataset the receive made
    # through 'zfs inherit': there the gate sets the value it would inherit)
    inherited = ("inherited from " + b.dataset,) + (
        ("local",) if zfs_ready == "zfs-fuse" else ())
    for prop in WATCHED:
        value, source = after[kid][prop]
        assert source != "received", (prop, value, source)
        if prop == "mountpoint":
            assert value == os.path.join(mnt(b), "kid") and source in inherited, \
                (prop, value, source)
        elif prop == "canmount":
            assert value == "on", (prop, value, source)
        else:
            assert value == after[b.dataset][prop][0], (prop, value, source)
    # none of them mounted (received with -u), and mounted, the replica
    # lands where it always did
    assert _mounts_of(b.dataset) == {}
    bedmod.sh(["zfs", "mount", b.dataset])
    try:
        assert _mounts_of(b.dataset) == {b.dataset: mnt(b)}
    finally:
        # (zfs-fuse may call it busy for a moment right after the mount:
        # seen once, "target is busy"; the program's own retries)
        ff.Zfs().run(["unmount", b.dataset], retry_busy=True)
    _unmake_evil(bed)
    write(bed, "y.bin", 10000)
    ok(sync(bed))


def test_zfs_programs_are_found_in_fixed_directories_only(monkeypatch, tmp_path):
    """(issue 13, item 5) zfs and zpool are found in ZFS_DIRS, whatever
    PATH says; where none holds them, the error says what to do (pure
    lookup, this machine's files)."""
    planted = tmp_path / "bin"
    planted.mkdir()
    for name in ("zfs", "zpool"):
        (planted / name).write_text("#!/bin/sh\nexit 1\n")
        (planted / name).chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (planted, os.environ.get("PATH", "")))
    monkeypatch.setattr(ff, "_ZFS_PROGRAMS", {})
    for name in ("zfs", "zpool"):
        path = ff.zfs_program(name)
        assert os.path.dirname(path) in ff.ZFS_DIRS and os.access(path, os.X_OK), path
    assert ff.program_of(["zfs", "list"]) == ff.zfs_program("zfs")
    assert ff.program_of(["ssh", "x"]) == "ssh"
    monkeypatch.setattr(ff, "_ZFS_PROGRAMS", {})
    monkeypatch.setattr(ff, "ZFS_DIRS", (str(tmp_path / "none"), "/nonexistent"))
    with pytest.raises(ff.ZfsError) as e:
        ff.zfs_program("zpool")
    assert e.value.exit_code == ff.EXIT_ZFS
    for needle in ("no zpool program in %s /nonexistent" % (tmp_path / "none"),
                   "never through PATH", "ln -s /usr/local/sbin/zpool /usr/sbin/zpool"):
        assert needle in e.value.message, e.value.message


def test_a_zfs_planted_early_on_path_is_never_run(bed):
    """(issue 13, item 5) sshd's PATH (and init's) puts /usr/local/bin
    first: a 'zfs' there (planted by whoever may write there, or a dataset
    received with mountpoint=/usr/local/bin) would run as root for every
    request.  The commands and the gate run zfs and zpool from fixed
    directories: with a planted zfs and zpool first on PATH, a sync, the
    gate's requests, a session and a receive all work and never run them."""
    prepare(bed)
    write(bed, "x.bin", 10000)
    ok(sync(bed))
    planted = os.path.join(bed.workdir, "planted-bin")
    ran = os.path.join(bed.workdir, "planted-ran")
    os.makedirs(planted)
    for name in ("zfs", "zpool"):
        with open(os.path.join(planted, name), "w") as f:
            f.write("#!/bin/sh\necho \"$0 $*\" >> %s\nexit 1\n" % ran)
        os.chmod(os.path.join(planted, name), 0o755)
    env = dict(os.environ, PATH=planted + ":" + os.environ.get("PATH", "/usr/bin:/bin"))
    a, b = bed.a, bed.b
    # a one-shot command on the master: listing, snapshot, zpool sync, zfs send
    write(bed, "y.bin", 10000)
    for command in ("sync", "status"):
        p = a.run([sys.executable, bedmod.PROGRAM, "--config", bed.config_path, "--node",
                   "alpha", command], check=False, env=env)
        assert not os.path.exists(ran), open(ran).read()
        ok(p)
    # the gate on the slave, as sshd runs it but with that PATH
    gate = [sys.executable, bedmod.PROGRAM, "--config", bed.config_path,
            "--syslog-socket", bed.gate_log.path, "ssh-gate"]
    genv = dict(env, SSH_CONNECTION="192.0.2.1 5555 192.0.2.2 22")

    def ask(text, **kw):
        return b.run(gate, check=False, env=dict(genv, SSH_ORIGINAL_COMMAND=text), **kw)
    p = ask("zfs list -H -o name " + b.dataset)
    assert p.returncode == 0 and p.stdout == b.dataset + "\n", p.stderr
    p = ask("features")
    assert p.returncode == 0 and ff.parse_zfs_features(p.stdout) == ff.parse_zfs_features(
        ff.gate_features_text().decode())
    p = ask("session", input="zfs get -H -p -o value guid %s\n" % b.dataset)
    assert p.returncode == 0 and p.stdout.splitlines()[1].startswith("0 "), p.stdout
    common = [n for n in snaps(a.dataset) if ff.is_flocker_snapshot(n)][-1]
    bedmod.sh(["zfs", "snapshot", a.dataset + "@plain"])
    stream = subprocess.run(["zfs", "send", "-i", "@" + common, a.dataset + "@plain"],
                            stdout=subprocess.PIPE, check=True, timeout=60).stdout
    p = subprocess.run(b.argv(gate), input=stream, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60,
                       env=dict(genv, SSH_ORIGINAL_COMMAND="zfs recv -u " + b.dataset))
    assert p.returncode == 0, p.stderr
    assert "plain" in snaps(b.dataset)
    assert not os.path.exists(ran), open(ran).read()


def test_putting_back_keeps_what_is_set_here_meanwhile(pool):
    """The watcher's rule (zfs-fuse), on real ZFS: a value set on this node
    before the receive that the stream cleared is set again; a value set
    here while the receive ran (the master's 'set readonly=on', after a
    promotion left readonly=off) is never undone."""
    ds = pool.name + "/replica"
    bedmod.sh(["zfs", "create", ds])
    bedmod.sh(["zfs", "unmount", ds])       # (as a replica is: received with -u)
    bedmod.sh(["zfs", "set", "readonly=on", ds])            # set here meanwhile
    before = {ds: {"readonly": ("off", "local"), "exec": ("off", "local"),
                   "mounted": ("no", "-")}}
    # (exec=off, set here before; the stream cleared it: now the default)
    assert zget(ds, "exec") == "on"
    assert ff._restore_guarded(ds, ["readonly", "exec"], before, "192.0.2.1") == ""
    assert bedmod.sh(["zfs", "get", "-H", "-o", "value,source", "readonly,exec",
                      ds]).stdout.split() == ["on", "local", "off", "local"]
