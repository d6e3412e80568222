"""The formats two hosts exchange, pinned by fixed bytes (issue 20, item 7).

A round trip (encode, then decode) passes whatever both sides agree on, so a
change made to the encoder and the decoder together, which breaks a node
still running the old file, passes it too.  These vectors fail it: each is
written by hand from the layout documented in the program (the comment above
the code), field by field, and checked both ways: the encoder makes exactly
these bytes, and the decoder reads exactly these fields from them.  The MACs
are HMAC-SHA256 over the hand-written bytes, computed with Python's hmac, not
taken from the encoder (the tests check them with hmac as well).

Also here: every request form that `ssh-gate --help` shows (GATE_HELP) runs
through the gate's parser, as pycodestyle runs the examples in its docstrings,
so the help cannot drift from what the gate accepts."""

import contextlib
import hashlib
import hmac
import io
import itertools
import os
import re
import struct
import types

import pytest

from conftest import ff

SECRET = b"flocker-failover format vectors: a fixed secret"
SECRET_KID = "3613f313"          # sha256(b"flocker-failover key id\0" + SECRET)[:8]
OTHER = b"flocker-failover format vectors: the next secret"
OTHER_KID = "3ba5289f"


def unhex(text):
    """Bytes from commented hex: '#' to the end of a line is a comment."""
    return bytes.fromhex(re.sub(r"#[^\n]*", "", text))


def test_key_id():
    assert ff.key_id(SECRET) == SECRET_KID
    assert ff.key_id(OTHER) == OTHER_KID
    assert SECRET_KID == hashlib.sha256(b"flocker-failover key id\x00" + SECRET).hexdigest()[:8]


# -- the heartbeat (section 4: "One heartbeat is one UDP datagram") -----------

HEARTBEAT = dict(cluster="shop", sender="alpha", generation=0x18D2A3B4C5D, sequence=0x102,
                 role=ff.ROLE_MASTER, epoch=33, snapshot="flocker-33-20260101T000000Z",
                 guid=0x1234567890ABCDEF, health="ok",
                 flags=ff.FLAG_SERVING | ff.FLAG_PEER_OUTDATED,
                 echo_generation=0x18D2A3B0000, echo_sequence=0x101,
                 accepts=(SECRET_KID, OTHER_KID))

HEARTBEAT_BYTES = unhex("""
    464c4b48                  #  0  4  magic "FLKH"
    01                        #  4  1  version 1
    0c                        #  5  1  flags: serving (bit 2) | receiver outdated (bit 3)
    3613f313                  #  6  4  key id of SECRET
    0000018d2a3b4c5d          # 10  8  boot generation
    0000000000000102          # 18  8  sequence 258
    0000018d2a3b0000          # 26  8  echo generation
    0000000000000101          # 34  8  echo sequence 257
    0000000000000021          # 42  8  epoch 33
    01                        # 50  1  role: 1 master
    01                        # 51  1  health: 1 ok
    0038                      # 52  2  body length 56
    04 73686f70               # 54     cluster "shop"
    05 616c706861             #        sender "alpha"
    1b 666c6f636b65722d33332d3230323630313031543030303030305a
                              #        snapshot "flocker-33-20260101T000000Z" (27)
    1234567890abcdef          #        snapshot GUID
    02 3613f313 3ba5289f      #        accepted key ids: 2, SECRET's and OTHER's
    abc0ac6b1c5953ae2c9883728099669ae5b9f2b587c5659a5727f30164f60011
                              # end-32 HMAC-SHA256 with SECRET over bytes 0..109
""")


def test_heartbeat_vector_layout():
    v = HEARTBEAT_BYTES
    assert len(v) == 54 + 56 + 32
    assert struct.unpack_from("!4sBB", v, 0) == (b"FLKH", 1, 0x0C)
    assert struct.unpack_from("!QQQQQ", v, 10) == (0x18D2A3B4C5D, 0x102, 0x18D2A3B0000,
                                                   0x101, 33)
    assert struct.unpack_from("!BBH", v, 50) == (1, 1, 56)
    assert v[-32:] == hmac.new(SECRET, v[:-32], hashlib.sha256).digest()


def test_heartbeat_encodes_to_the_vector():
    assert ff.encode_heartbeat(ff.Heartbeat(**HEARTBEAT), SECRET) == HEARTBEAT_BYTES


def test_heartbeat_vector_decodes_to_its_fields():
    hb = ff.decode_heartbeat(HEARTBEAT_BYTES, ff.wire_keys(OTHER, SECRET))
    assert hb == ff.Heartbeat(key_id=SECRET_KID, **HEARTBEAT)


# -- the witness's datagrams (section 4: "the witness's datagrams") -----------

NONCE = bytes(range(16))
WITNESS_REQUEST = dict(kind=ff.WITNESS_REQUEST, cluster="shop", node="alpha", nonce=NONCE,
                       generation=0x18D2A3B4C5D, sequence=3, lease_ms=5000)
WITNESS_REQUEST_BYTES = unhex("""
    464c4b57                  #  0  4  magic "FLKW"
    01                        #  4  1  version 1
    01                        #  5  1  kind: 1 request
    3613f313                  #  6  4  key id of SECRET
    000102030405060708090a0b0c0d0e0f
                              # 10 16  nonce
    0000018d2a3b4c5d          # 26  8  the node's boot generation
    0000000000000003          # 34  8  request sequence 3
    00001388                  # 42  4  lease asked for: 5000 ms
    00                        # 46  1  answer: 0 in a request
    00000000                  # 47  4  wait: 0 ms
    04 73686f70               # 51     cluster "shop"
    05 616c706861             #        node "alpha"
    00                        #        holder ""
    7f5db196567c1bef90c777b4052369ecef7b22665f20996a6e8017a0cb4ba679
                              # end-32 HMAC-SHA256 with SECRET over bytes 0..62
""")

WITNESS_ANSWER = dict(kind=ff.WITNESS_ANSWER, cluster="shop", node="alpha", nonce=NONCE,
                      generation=0x18D2A3B4C5D, sequence=3, lease_ms=0,
                      answer=ff.WITNESS_HELD, wait_ms=1500, holder="beta")
WITNESS_ANSWER_BYTES = unhex("""
    464c4b57 01               #  0  5  magic, version
    02                        #  5  1  kind: 2 answer
    3613f313                  #  6  4  key id of SECRET
    000102030405060708090a0b0c0d0e0f
                              # 10 16  the request's nonce, echoed
    0000018d2a3b4c5d          # 26  8  the request's generation, echoed
    0000000000000003          # 34  8  the request's sequence, echoed
    00000000                  # 42  4  lease granted: 0 (not granted)
    02                        # 46  1  answer: 2 held by another node
    000005dc                  # 47  4  wait: 1500 ms
    04 73686f70               # 51     cluster "shop"
    05 616c706861             #        node "alpha" (the requester)
    04 62657461               #        holder "beta"
    4ea227a7fb04dba408c7d636f5d70de6fca97b1ae243c2aa5daa006d58268957
                              # end-32 HMAC-SHA256 with SECRET over bytes 0..66
""")


@pytest.mark.parametrize("fields, vector", [(WITNESS_REQUEST, WITNESS_REQUEST_BYTES),
                                            (WITNESS_ANSWER, WITNESS_ANSWER_BYTES)],
                         ids=["request", "answer"])
def test_witness_vectors(fields, vector):
    assert struct.unpack_from("!4sBB4s16sQQIBI", vector) == (
        b"FLKW", 1, fields["kind"], bytes.fromhex(SECRET_KID), NONCE, fields["generation"],
        fields["sequence"], fields["lease_ms"], fields.get("answer", 0),
        fields.get("wait_ms", 0))
    assert vector[-32:] == hmac.new(SECRET, vector[:-32], hashlib.sha256).digest()
    assert ff.encode_witness(ff.WitnessMessage(**fields), SECRET) == vector
    assert ff.witness_cluster(vector) == "shop"
    decoded = ff.decode_witness(vector, ff.wire_keys(SECRET))
    assert decoded == ff.WitnessMessage(key_id=SECRET_KID, **fields)


# -- the divergence facts (section 7: "resolving a divergence") ---------------
#     v3 <common GUID> <attempt> <epoch> <changes in bytes> <serving> <policy> <winner or ->

@pytest.mark.parametrize("args, kw, text, fields", [
    (("15324987654321098765", 33, 34, 4096, "most-changes", "beta"),
     dict(serving=True, recursive=True),
     "v3 15324987654321098765 33 34 4096 1 most-changes+recursive beta",
     dict(common_guid="15324987654321098765", attempt=33, epoch=34, changes=4096,
          serving=True, policy="most-changes", recursive=True, winner="beta")),
    (("77", 5, 4, 0, "manual", None), {},
     "v3 77 5 4 0 0 manual -",
     dict(common_guid="77", attempt=5, epoch=4, changes=0, serving=False,
          policy="manual", recursive=False, winner=None)),
], ids=["all-set", "defaults"])
def test_divergence_facts_vectors(args, kw, text, fields):
    assert ff.format_divergence(*args, **kw) == text
    assert ff.parse_divergence(text) == fields


# -- the other values a node reads off its peer's dataset ---------------------

def test_role_marker_vector():
    assert ff.role_marker("alpha", ff.ROLE_MASTER, 33) == "alpha master 33"
    assert ff.parse_role_marker("alpha master 33") == ("alpha", "master", 33)


def test_snapshot_name_vector():
    """flocker-<epoch>-<UTC time to the millisecond>Z; 1767225600 is
    2026-01-01T00:00:00Z."""
    assert ff.snapshot_name(33, 1767225600.25) == "flocker-33-20260101T000000.250Z"
    assert ff.snapshot_epoch("flocker-33-20260101T000000.250Z") == 33
    assert ff.snapshot_time("flocker-33-20260101T000000.250Z") == 1767225600.25


# -- the ssh gate's session (section 5: "session: the gate writes ...") -------
#
# "flocker-gate 1 NODE\n", then for each request line "RC NOUT NERR\n",
# NOUT bytes of standard output, NERR bytes of standard error.

GATE_FRAMES = [
    ((0, b"tank/shop\n", b""), b"0 10 0\ntank/shop\n"),
    ((1, b"a\n", b"no\n"), b"1 2 3\na\nno\n"),
    ((9, b"", b""), b"9 0 0\n"),
]


@pytest.mark.parametrize("answer, frame", GATE_FRAMES, ids=["out", "out-err", "empty"])
def test_gate_frame_vectors(answer, frame):
    assert ff._gate_frame(*answer) == frame


def gate_config(**kw):
    local = types.SimpleNamespace(name="beta", dataset="tank/shop")
    base = dict(ssh_control_persist=5.0, local=local, recursive=False,
                nodes=[types.SimpleNamespace(name="alpha"), local], path="/etc/flocker.conf")
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_gate_session_writes_the_banner_and_frames():
    """Gate.session, the gate's side: it reads one request per line and
    answers each in a frame (Gate.answer is replaced here: no zfs runs)."""
    answers = {"zfs list -H -o name tank/shop": GATE_FRAMES[0][0],
               "zfs get -H -p -o value guid tank/shop": GATE_FRAMES[1][0]}
    gate = ff.Gate(gate_config(), "/nonexistent", logged=False, client="192.0.2.1")
    gate.answer = answers.__getitem__
    requests_r, requests_w = os.pipe()
    answers_r, answers_w = os.pipe()
    try:
        os.write(requests_w, b"zfs list -H -o name tank/shop\n"
                             b"zfs get -H -p -o value guid tank/shop\n")
        os.close(requests_w)
        assert gate.session(requests_r, answers_w) == ff.EXIT_OK
        answered = os.read(answers_r, 65536)
    finally:
        for fd in (requests_r, requests_w, answers_r, answers_w):
            with contextlib.suppress(OSError):
                os.close(fd)
    assert answered == b"flocker-gate 1 beta\n" + GATE_FRAMES[0][1] + GATE_FRAMES[1][1]


@pytest.mark.parametrize("answer, frame", GATE_FRAMES, ids=["out", "out-err", "empty"])
def test_gate_session_client_reads_a_frame(answer, frame):
    """GateSession.call, the client's side: the request line it writes and
    what it reads from a fixed frame (no ssh: the frame is already in its
    buffer, followed by the start of the next one, which it leaves there)."""
    session = ff.GateSession()
    session.proc = types.SimpleNamespace(stdin=io.BytesIO())
    session.buf = frame + b"0 0 0\n"

    def more(ssh, deadline):
        pytest.fail("the client wanted more than the frame holds")
    session._more = more
    words = ["zfs", "set", "flocker:role=alpha master 33", "tank/shop"]
    got = session.call(None, words, timeout=5.0)
    assert session.proc.stdin.getvalue() == b"zfs set 'flocker:role=alpha master 33' tank/shop\n"
    assert (got.args, got.returncode, got.stdout, got.stderr) == (
        words, answer[0], answer[1].decode(), answer[2].decode())
    assert session.buf == b"0 0 0\n"


# -- every request form of `ssh-gate --help` through the gate's parser --------

# what the help's placeholders stand for, each with values the gate accepts
PLACEHOLDERS = {
    "FIELDS": ff._GATE_FIELDS,
    "PROPS": ("guid", ",".join(ff._GATE_PROPS)),
    "D": ("tank/shop",),
    "CHILD": ("kid", "kid/grandkid"),
    "SNAP": ("flocker-33-20260101T000000Z", "before-upgrade"),
    "flocker-...": ("flocker-33-20260101T000000Z", "flocker-34-20260101T000000.250Z-2"),
    "NODE": ("alpha", "beta"),
    "ROLE": ff.ROLES,
    "EPOCH": ("0", "33"),
}
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in sorted(PLACEHOLDERS, key=len,
                                                                   reverse=True)))


def help_forms():
    """The forms listed in GATE_HELP: the lines indented by two spaces
    between "exactly one of these forms" and the next paragraph, each up
    to its explanation (after two spaces or more)."""
    lines = ff.GATE_HELP.split("\n")
    start = next(i for i, line in enumerate(lines) if "exactly one of these forms" in line)
    forms = []
    for line in lines[start + 1:]:
        if forms and not line.strip():
            break
        if line.startswith("  ") and not line.startswith("   "):
            forms.append(re.split(r"\s{2,}", line.strip())[0])
    return forms


def expand(form):
    """Every request a form stands for: each optional part ([x], [a | b])
    left out or taken, each placeholder filled with each of its values.
    Placeholders are whole words or parts of words (D@SNAP, D[/CHILD])."""
    m = re.search(r"\[([^\[\]]*)\]", form)
    if m:
        out = []
        for choice in [""] + [c.strip() for c in m.group(1).split("|")]:
            text = form[:m.start()] + choice + form[m.end():]
            out.extend(expand(" ".join(text.split())))
        return out
    pieces = _PLACEHOLDER_RE.split(form)
    names = _PLACEHOLDER_RE.findall(form)
    out = []
    for values in itertools.product(*(PLACEHOLDERS[n] for n in names)):
        text = pieces[0]
        for value, piece in zip(values, pieces[1:]):
            text += value + piece
        out.append(text)
    return out


def test_help_forms_are_found():
    forms = help_forms()
    assert len(forms) >= 12, forms
    assert forms[0] == "features" and forms[-1] == "flocker status --json", forms
    for form in forms:
        assert "  " not in form and not form.startswith("("), form


@pytest.mark.parametrize("form", help_forms())
def test_every_help_form_parses(form):
    """Each request a form of the help stands for is accepted, as the kind
    its first words name; -r and D/CHILD only with recursive = yes (as the
    help says), everything else either way."""
    requests = expand(form)
    assert requests and not any(_PLACEHOLDER_RE.search(r) for r in requests), requests
    nodes = ["alpha", "beta"]
    for text in requests:
        recursive_only = " -r" in text or "tank/shop/" in text
        req = ff.parse_gate_request(text, "tank/shop", True, nodes)
        words = text.split()
        assert req.kind == words[0], text
        if req.kind == "zfs":
            assert req.args[0] == words[1], text
            assert req.stream == (words[1] == "recv" and "-u" in words), text
        if recursive_only:
            with pytest.raises(ff.GateRefused):
                ff.parse_gate_request(text, "tank/shop", False, nodes)
        else:
            assert ff.parse_gate_request(text, "tank/shop", False, nodes) == req, text


def test_every_kind_the_gate_accepts_is_in_the_help():
    forms = help_forms()
    firsts = {f.split()[0] for f in forms}
    assert firsts == {"features", "session", "zfs", "flocker"}, firsts
    zfs_subs = {f.split()[1] for f in forms if f.startswith("zfs ")}
    assert zfs_subs == set(ff._GATE_ZFS), (zfs_subs, sorted(ff._GATE_ZFS))
    # and the one-line list of a refusal names the same
    for sub in ff._GATE_ZFS:
        assert sub in ff.GATE_REQUESTS, sub
    for kind in ("features", "session", "flocker status --json"):
        assert kind in ff.GATE_REQUESTS, kind


def test_the_help_example_request_parses():
    """The help's "Try a request by hand" line."""
    m = re.search(r"SSH_ORIGINAL_COMMAND='([^']*)' flocker_failover.py ssh-gate", ff.GATE_HELP)
    assert m, ff.GATE_HELP
    req = ff.parse_gate_request(m.group(1), "tank/shop", False, ["alpha", "beta"])
    assert req == ff.GateRequest("zfs", ("list", "-H", "-o", "name", "tank/shop"))
