"""replication_bandwidth: the stream through our own relay, limited by a
token bucket (smooth, never more than a second's worth at once), with the
heartbeats on time meanwhile and the replica identical."""

import hashlib
import os
import sys
import time

import pytest

import bed as bedmod
from conftest import HEARTBEAT_TIMING, ff
from helpers import DEAD, Running, init, wait_for

MiB = 1 << 20


@pytest.mark.parametrize("text,rate", [
    ("0", 0), ("20M", 20 * MiB), ("512K", 512 << 10), ("1G", 1 << 30), ("65536", 65536),
    ("5MB/s", 5 * MiB), ("2m", 2 * MiB)])
def test_the_bandwidth_option_reads_sizes(text, rate):
    assert ff._p_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "1.5M", "-1", "100", "2T", "20 M"])
def test_a_bad_bandwidth_is_refused_with_what_is_expected(text):
    with pytest.raises(ff._Invalid) as e:
        ff._p_rate(text)
    assert "bytes per second: 0 (no limit) or a whole number with K, M or G" in e.value.expected


def test_the_token_bucket_keeps_the_rate_and_never_bursts_above_a_second():
    """Writes of up to 1 MiB, as the relay makes them, against an invented
    clock: the total never exceeds rate x elapsed (the bucket starts empty),
    and after a pause of the receiver no more than one second's worth
    goes at once."""
    rate = 5 * MiB
    now = 100.0
    b = ff.TokenBucket(rate, now)
    sent, start = 0, now
    while sent < 50 * MiB:
        n = b.allowed(MiB, now)
        if n == 0:
            now = b.ready_at(MiB, now)
            continue
        b.spend(n)
        sent += n
        assert sent <= rate * (now - start) + 1, (sent, now - start)
    assert 9.9 <= now - start <= 10.1, now - start
    # the receiver pauses for 30 s: then at most a second's worth at once
    now += 30.0
    burst = 0
    while True:
        n = b.allowed(MiB, now)
        if n == 0:
            break
        b.spend(n)
        burst += n
    assert burst == rate


def test_the_relay_holds_the_rate(tmp_path):
    """pipe_transfer itself: 20 MiB at 4 MiB/s take 5 s (± 15 %), byte for byte."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(20 * MiB))
    dst = tmp_path / "dst"
    out = ff.pipe_transfer(["cat", str(src)], ["sh", "-c", "cat > %s" % dst], 30.0,
                           rate=4 * MiB)
    assert out.ok, out
    assert 4.25 <= out.seconds <= 5.75, out.seconds
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


def start_then_write(bed, rate, mib):
    """Replication limited to rate, cycles every 5 s: the slave holds a
    replica (one sync before the daemons start), a file of mib MiB is
    written, then both daemons start, and the first cycle that finds the
    peer alive carries the file whole, as one increment.  (The daemons
    started first and the test waited for a cycle before writing: two
    replication intervals of nothing.)"""
    bed.write_config(cluster={"replication_interval": "5", "replication_bandwidth": rate})
    init(bed)
    a = bed.a
    a.flocker("sync", check=True)
    mnt = os.path.join(a.pool.mountpoint, "shop")
    with open(os.path.join(mnt, "big.tmp"), "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    os.rename(os.path.join(mnt, "big.tmp"), os.path.join(mnt, "big.bin"))
    return Running(a).wait_ready(), Running(bed.b).wait_ready()


@HEARTBEAT_TIMING
def test_a_limited_replication_takes_its_time_and_the_heartbeats_stay_on_time(bed):
    """A 50 MiB increment at 5 MiB/s through the real cycle (zfs send, our
    relay, ssh, the gate, zfs recv) takes 10 s ± 15 %; the daemons meanwhile
    see no silence (no dead verdict); the replica is identical."""
    a, b = bed.a, bed.b
    mnt = os.path.join(a.pool.mountpoint, "shop")
    da, db = start_then_write(bed, "5M", 50)
    try:

        def big_cycle():
            with ff.StateStore.open(a.state_db) as s:
                rows = s.conn.execute(
                    "SELECT seconds, bytes FROM replications WHERE result = 'ok' "
                    "AND bytes > ? ORDER BY id DESC LIMIT 1", (40 * MiB,)).fetchall()
            return rows[0] if rows else None
        seconds, size = wait_for(big_cycle, 90, step=0.5)      # (the transfer's own time)
        expected = size / (5 * MiB)
        print("%d bytes in %.2f s (%.2f MiB/s; the limit alone: %.2f s)"
              % (size, seconds, size / seconds / MiB, expected))
        assert expected * 0.85 <= seconds <= expected * 1.15 + 1.0, (seconds, expected)
        for d in (da, db):      # (with the other heartbeat-timing tests, one at a time)
            s = d.status()
            assert s["peer"]["dead_verdicts"] == 0, s["peer"]
            assert all(lk["max_gap_seconds"] < DEAD for lk in s["links"]), s["links"]
        # the slave catches up with the master's newest snapshot
        wait_for(lambda: newest(b.dataset) == newest(a.dataset), 60, step=0.2)
    finally:
        da.stop()
        db.stop()
    bedmod.sh(["zfs", "mount", b.dataset], check=False)
    assert bedmod.tree_digest(os.path.join(b.pool.mountpoint, "shop")) == \
        bedmod.tree_digest(mnt)


def newest(ds):
    out = bedmod.sh(["zfs", "get", "-H", "-p", "-o", "name,value", "guid", "-d", "1", ds],
                    check=False).stdout.splitlines()
    return out[-1].split("\t")[1] if out and "@" in out[-1] else None


def test_status_shows_a_long_transfer_while_it_runs(bed):
    """A transfer held to 2 MiB/s: status (text, --json) and the metrics
    file show how far it is, its rate, and (where zfs send -n -P gives the
    total: OpenZFS) the expected size and the time left."""
    a = bed.a
    da, db = start_then_write(bed, "2M", 30)
    try:
        seen = []

        def midway():
            tr = da.status().get("transfer")
            if tr and tr["bytes"] > 4 * MiB:
                seen.append(tr)
            return len(seen) >= 2 and seen[-1]["bytes"] > seen[0]["bytes"] + MiB
        assert wait_for(midway, 60, step=0.5), seen
        tr = seen[-1]
        assert tr["what"].startswith("alpha -> beta: %s@flocker-" % a.dataset), tr
        assert 1.0 * MiB <= tr["rate_bytes_per_second"] <= 3.0 * MiB, tr
        if tr["total"] is not None:          # OpenZFS: zfs send -n -P
            assert tr["total"] >= 30 * MiB and tr["eta_seconds"] is not None, tr
        else:                                # zfs-fuse cannot tell
            assert not ff.Zfs().features().send_estimate and tr["eta_seconds"] is None
        text = a.flocker("status", check=True).stdout
        assert "transfer    alpha -> beta: %s@flocker-" % a.dataset in text, text
        assert "MiB/s" in text
        # the metrics file says the same (both bed daemons share one path:
        # rendered here from alpha's live status, as its daemon does)
        text = ff.render_metrics(ff.load_config(bed.config_path, "alpha"), da.status(), 0.0)
        line = [ln for ln in text.splitlines() if ln.startswith("flocker_transfer_bytes{")]
        assert line and float(line[0].split()[-1]) > 4 * MiB, line
        # done: no transfer shown
        wait_for(lambda: da.status().get("transfer") is None, 60, step=0.5)
        assert "transfer    " not in a.flocker("status", check=True).stdout
    finally:
        da.stop()
        db.stop()


def test_sync_draws_a_progress_line_on_a_terminal_only(bed):
    bed.write_config(cluster={"replication_bandwidth": "4M"})
    init(bed)
    a = bed.a
    mnt = os.path.join(a.pool.mountpoint, "shop")
    with open(os.path.join(mnt, "big.bin"), "wb") as f:
        f.write(os.urandom(8 * MiB))
    # on a terminal (script(1) gives it one): the line, redrawn in place
    cmd = " ".join([sys.executable, bedmod.PROGRAM, "--config", bed.config_path, "--node",
                    "alpha", "sync"])
    out = a.run(["script", "-qec", cmd, "/dev/null"], timeout=120).stdout
    # (\r, then erase the line: the captured text reads the \r as a newline)
    assert out.count("\x1b[K") >= 2 and "alpha -> beta: %s@flocker-" % a.dataset in out, out
    assert "MiB/s" in out and "sent " in out, out
    # for cron: nothing but the result
    with open(os.path.join(mnt, "more.bin"), "wb") as f:
        f.write(os.urandom(8 * MiB))
    r = a.flocker("sync", timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
