"""The daemon replicates with the same cycle as sync, off its loop; a
SIGTERM during a transfer aborts it and leaves both sides as they were."""

import os
import re
import time

import bed as bedmod
from conftest import ff
from helpers import Running, init, wait_for


def snaps(ds):
    out = bedmod.sh(["zfs", "get", "-H", "-p", "-o", "name,value", "guid", "-d", "1", ds],
                    check=False).stdout
    return sorted(line.split("\t")[0].split("@")[1] + "=" + line.split("\t")[1]
                  for line in out.splitlines() if "@" in line)


def newest(ds):
    """The name of ds's newest snapshot (by createtxg), or None."""
    out = bedmod.sh(["zfs", "get", "-H", "-p", "-o", "name,value", "createtxg", "-d", "1", ds],
                    check=False).stdout
    txgs = [(int(line.split("\t")[1]), line.split("\t")[0].split("@")[1])
            for line in out.splitlines() if "@" in line]
    return max(txgs)[1] if txgs else None


def referenced(ds, snap):
    return int(bedmod.sh(["zfs", "get", "-H", "-p", "-o", "value", "referenced",
                          "%s@%s" % (ds, snap)]).stdout)


def receives_into(dataset):
    """pids of the zfs recv processes into dataset on this machine."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                argv = f.read().split(b"\0")[:-1]
        except (OSError, ValueError):
            continue
        if len(argv) >= 3 and os.path.basename(argv[0]) == b"zfs" and argv[1] == b"recv" \
                and argv[-1] == dataset.encode():
            pids.append(int(entry))
    return pids


def test_daemon_replicates_and_sigterm_aborts_a_transfer(bed):
    # snapshot_command, as an operator would lock the data: while `writing`
    # exists the master takes no snapshot (that cycle fails), and `refused`
    # says that a cycle found it so
    writing, refused = (os.path.join(bed.workdir, n) for n in ("writing", "refused"))
    bed.write_config(cluster={"replication_interval": "0.5"}, service={
        "snapshot_command": "sh -c 'test ! -e %s || { touch %s; exit 1; }'" % (writing, refused)})
    init(bed)
    a, b = bed.a, bed.b
    mnt = os.path.join(a.pool.mountpoint, "shop")
    with open(os.path.join(mnt, "first.bin"), "wb") as f:
        f.write(os.urandom(200000))
    want = bedmod.tree_digest(mnt)
    da, db = Running(a).wait_ready(), Running(b).wait_ready()
    try:
        # the master's daemon sends the first full stream by itself
        wait_for(lambda: snaps(b.dataset), 30, step=0.2)
        wait_for(lambda: snaps(b.dataset) == [s for s in snaps(a.dataset)
                                              if s.split("=")[0] in
                                              {x.split("=")[0] for x in snaps(b.dataset)}], 30)
        # the cycle ends by making the replica read-only (after the transfer):
        # read before that, the replica's atimes change and every later
        # receive refuses it as modified
        wait_for(lambda: bedmod.sh(["zfs", "get", "-H", "-o", "value", "readonly",
                                    b.dataset]).stdout.strip() == "on", 30)
        bedmod.sh(["zfs", "mount", b.dataset], check=False)
        got = bedmod.tree_digest(os.path.join(b.pool.mountpoint, "shop"))
        bedmod.sh(["zfs", "unmount", b.dataset], check=False)
        assert got == want
        status = da.status()
        assert status["jobs"] is not None
        # a 40 MB increment over a link throttled to 1 MB/s: the transfer is on
        # the wire for ~40 s; stop the master's daemon in the middle of it.
        # No snapshot is taken while the file is written (under load that
        # takes seconds): no cycle carries a part of it, at full speed before
        # the throttle, or a small part that could still drain to the slave
        # from the link's queue after the stop. Once a cycle was refused, the
        # one that snapshotted before it has ended (cycles run one at a time)
        open(writing, "w").close()
        with open(os.path.join(mnt, "small.bin"), "wb") as f:
            f.write(os.urandom(1000))   # (with 'written', OpenZFS: else no cycle snapshots)
        wait_for(lambda: os.path.exists(refused), 30, step=0.05)
        with open(os.path.join(mnt, "big.bin"), "wb") as f:
            for _ in range(40):
                f.write(os.urandom(1 << 20))
        bed.throttle(a, 8)
        os.unlink(writing)
        # on the wire: the slave's zfs recv has run for 1.5 s (the cycle's
        # own age says less: under load its other steps, through the ssh
        # gate, take that long too, and a SIGTERM then lets the cycle end),
        # and it receives the whole file: from beta's newest snapshot to
        # alpha's newest (a cycle sends that, and takes no snapshot while
        # one is on the wire)
        seen = {}

        def receiving_for(seconds):
            now = time.monotonic()
            pids = set(receives_into(b.dataset))
            for pid in set(seen) - pids:
                del seen[pid]
            return any(now - seen.setdefault(pid, now) >= seconds for pid in pids)

        def on_the_wire():
            ours, theirs = newest(a.dataset), newest(b.dataset)
            return referenced(a.dataset, ours) - referenced(a.dataset, theirs) >= 39 << 20
        wait_for(lambda: receiving_for(1.5) and on_the_wire(), 30, step=0.05)
        # what the slave holds while that transfer is on the wire
        before = snaps(b.dataset)
        started = time.monotonic()
        assert da.stop(timeout=60) == 0
        stop_seconds = time.monotonic() - started
    finally:
        da.stop()
        db.stop()
    assert stop_seconds < 15, stop_seconds
    with ff.StateStore.open(a.state_db) as s:
        last = s.last_replication()
    assert last["result"] == "failed", last     # recorded as failed, not half-recorded
    # the stop ends the transfer, or (since the daemon's stop also ends a
    # cycle's other waits on the network) the request to beta it was in
    assert re.search(r" to beta failed after \d+ bytes: the transfer was stopped: this node "
                     r"gives up the master role, or flocker-failover is shutting down; the "
                     r"transfer to beta was aborted "
                     r"before its end\. Nothing was changed on either node; the next cycle "
                     r"tries again$", last["error"]) or re.search(
        r"^the talk with node beta \(.*\) was cut short: the replication cycle was ended "
        r"\(this node gives up the master role, or the daemon stops\)$",
        last["error"]), last["error"]
    # nothing half-received on the slave: what it held stays, and whatever it
    # holds now is a whole snapshot of the master's (same GUID); the master's
    # newest snapshot, the one on the wire at the stop, is not there
    after, master = snaps(b.dataset), snaps(a.dataset)
    assert set(before) <= set(after) <= set(master), (before, after, master)
    assert master[-1] not in after, (master, after)
    assert "daemon stopped by signal 15" in a.flocker("history", check=True).stdout

    # the next daemons finish the job: the slave gets the whole increment
    # (a master replicates only to a slave whose daemon it hears)
    bed.throttle(a, None)
    da, db = Running(a, tag="-2").wait_ready(), Running(b, tag="-2").wait_ready()
    try:
        wait_for(lambda: len(snaps(b.dataset)) > len(before) and
                 ff.StateStore.open(a.state_db).last_replication()["result"] == "ok", 60,
                 step=0.2)
    finally:
        da.stop()
        db.stop()
    bedmod.sh(["zfs", "mount", b.dataset], check=False)
    assert bedmod.tree_digest(os.path.join(b.pool.mountpoint, "shop")) == \
        bedmod.tree_digest(mnt)


def test_a_cycle_that_carried_data_starts_again_at_once(bed):
    """replication_interval is the pause after a cycle that found nothing
    new; one that carried data runs again as soon as it ends (more was
    probably written meanwhile), so a steady writer's replica lags by about
    one cycle, not by a cycle and up to an interval more."""
    interval = 8.0
    bed.write_config(cluster={"replication_interval": str(interval)})
    init(bed)
    a = bed.a
    a.flocker("sync", check=True)
    with open(os.path.join(a.pool.mountpoint, "shop", "new.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))
    da, db = Running(a).wait_ready(), Running(bed.b).wait_ready()
    try:
        def cycles():
            with ff.StateStore.open(a.state_db) as s:
                return s.conn.execute(
                    "SELECT started, finished, bytes FROM replications WHERE result = 'ok' "
                    "ORDER BY id").fetchall()
        # the sync's row, the cycle that carries new.bin, then the one right
        # after it, which finds nothing, then one an interval later
        rows = wait_for(lambda: len(cycles()) >= 4 and cycles(), 3 * interval + 30, step=0.2)
    finally:
        da.stop()
        db.stop()
    carried = next(i for i, r in enumerate(rows) if i > 0 and r[2] > (1 << 19))
    again, after = rows[carried + 1], rows[carried + 2]
    assert again[0] - rows[carried][1] < 2.0, rows        # at once
    assert again[2] in (0, None) or again[2] < (1 << 19), rows
    assert after[0] - again[1] >= interval - 1.0, rows    # nothing new: the interval
