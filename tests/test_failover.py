"""Automatic failover with two real daemons: real ZFS, real ssh, two
namespaces joined by a heartbeat link, and a third one, the LAN, that holds
the clients' view of the service address and the arbitrator."""

import os
import re
import time

import pytest

import bed as bedmod
from conftest import dataset_context, ff
from helpers import (DEAD, action_timeline, INTERVAL, Running, S, init, killed, last_service_config, replicated,
                     service_config, serving, start, svc_log, svc_running, wait_for, write_files,
                     zget)


def sched_policy(pid, tid):
    """The scheduling policy of a thread (field 41 of its stat file)."""
    with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
        return int(f.read().rsplit(")", 1)[1].split()[38])


def snaps(ds):
    out = bedmod.sh(["zfs", "get", "-H", "-p", "-o", "name,value", "guid", "-d", "1", ds],
                    check=False).stdout
    return [(line.split("\t")[0].split("@")[1], line.split("\t")[1])
            for line in out.splitlines() if "@" in line]


def reachable_from_lan(bed, address, port=9):
    """A TCP connection from the LAN to address is answered (refused)."""
    code = ("import socket,sys\ns=socket.socket();s.settimeout(1)\ntry:\n"
            " s.connect((sys.argv[1],int(sys.argv[2])))\nexcept ConnectionRefusedError:\n"
            " pass\nexcept OSError:\n sys.exit(1)\n")
    return bed.lan_run([bedmod.sys.executable, "-c", code, address, str(port)],
                       check=False).returncode == 0


METRIC_LINE = re.compile(r'^flocker_[a-z_]+\{(?:[a-z]+="[^"\\]*",?)+\} -?[0-9.e+-]+$')


def metrics(host):
    """The host's metrics file, checked line by line against the text
    format, as {name{labels}: value}."""
    with open(os.path.join(host.bed.workdir, "metrics-%s.prom" % host.name)) as f:
        lines = f.read().splitlines()
    out = {}
    for line in lines:
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert METRIC_LINE.match(line), line
        key, value = line.rsplit(" ", 1)
        out[re.sub(r',?(cluster|node)="[^"]*"', "", key).replace("{,", "{")] = float(value)
    return out


def test_kill_9_of_the_master_promotes_the_slave_then_the_old_master_returns(lanbed):
    bed = lanbed
    # one config per host, differing only in where each writes its metrics
    # (the hosts share this machine's file system)
    service_config(bed, cluster={"metrics_file": os.path.join(bed.workdir, "metrics-beta.prom")})
    cfg_b = bed.write_config(path=os.path.join(bed.workdir, "beta.conf"), **last_service_config)
    service_config(bed, cluster={"metrics_file": os.path.join(bed.workdir,
                                                              "metrics-alpha.prom")})
    a, b = bed.a, bed.b
    init(bed)
    da = Running(a).wait_ready()
    db = Running(b, config=cfg_b).wait_ready()
    wait_for(lambda: serving(da) and replicated(da), S(30), step=0.05)
    try:
        assert svc_running(a) and not svc_running(b)
        # the event loop runs real-time (SCHED_RR = 2); its job threads and
        # everything they start (here the user system) run normally (0)
        pid = da.status()["pid"]
        tasks = {int(t): sched_policy(pid, t) for t in os.listdir("/proc/%d/task" % pid)}
        assert tasks.pop(pid) == 2 and set(tasks.values()) == {0}, tasks
        with open(os.path.join(bed.workdir, "svc-alpha.pid")) as f:
            svc = int(f.read())
        assert sched_policy(svc, svc) == 0
        t = time.time()
        mnt = write_files(a)
        wait_for(lambda: replicated(da, since=t), S(30), step=0.1)
        want = bedmod.tree_digest(mnt)
        wait_for(lambda: reachable_from_lan(bed, bed.SERVICE_ADDRESS), S(5))
        assert bed.neighbour(bed.SERVICE_ADDRESS) == bed.lan_mac(a)
        wait_for(lambda: da.status()["jobs"].get("replicate") is None, S(10), step=0.01)
        wait_for(lambda: metrics(a).get("flocker_replication_last_transfer_bytes{}") is not None
                 and metrics(b).get('flocker_peer_alive{peer="alpha"}') == 1, S(15), step=0.2)
        ma, mb = metrics(a), metrics(b)
        assert (ma["flocker_master{}"], ma["flocker_serving{}"], ma["flocker_epoch{}"]) == \
            (1, 1, 2)
        assert (mb["flocker_master{}"], mb["flocker_serving{}"]) == (0, 0)
        assert 0 <= ma["flocker_replication_lag_seconds{}"] < 30
        assert ma['flocker_heartbeats_rejected_total{reason="bad_mac"}'] == 0

        t_kill = time.time()
        a.kill_all()                  # the master host dies: daemon, user system, sshd
        wait_for(lambda: serving(db), S(15), step=0.02)
        starts = [e for e in svc_log(b) if e[0] == "start"]
        assert len(starts) == 1 and starts[0][1] == 3       # beta's first epoch above 2
        took = starts[0][2] - t_kill
        # silence counts from the last heartbeat, up to one interval before the kill
        assert DEAD - INTERVAL - S(0.05) <= took < DEAD + S(5), took
        sb = db.status()
        assert (sb["role"], sb["epoch"], sb["serving"]) == ("master", 3, True)
        assert zget(b.dataset, "mounted") == "yes" and svc_running(b)
        assert bedmod.tree_digest(zget(b.dataset, "mountpoint")) == want
        # the service address moved: the LAN's ARP table learnt beta's MAC
        # from the gratuitous ARP, and the address answers
        wait_for(lambda: bed.neighbour(bed.SERVICE_ADDRESS) == bed.lan_mac(b), S(5))
        assert reachable_from_lan(bed, bed.SERVICE_ADDRESS)
        history = b.flocker("history", check=True).stdout
        assert "promote begins: no valid heartbeat for" in history
        wait_for(lambda: metrics(b)["flocker_promotions_total{}"] == 1, S(15), step=0.2)
        mb = metrics(b)
        assert (mb["flocker_master{}"], mb["flocker_serving{}"], mb["flocker_epoch{}"]) == \
            (1, 1, 3)
        assert mb['flocker_peer_alive{peer="alpha"}'] == 0
        assert mb['flocker_dead_verdicts_total{peer="alpha"}'] == 1

        # the old master comes back: it yields to epoch 3 and becomes slave
        a.start_sshd()
        bed._wait_for_sshd()
        da = Running(a, tag="-2").wait_ready()
        wait_for(lambda: da.status()["role"] == "slave", S(15), step=0.05)
        assert not svc_running(a) and da.status()["epoch"] == 3
        assert zget(a.dataset, "mounted") == "no" and zget(a.dataset, "readonly") == "on"
        assert a.flocker("status", check=True).returncode == 0
        # replication flows from the new master: a file written on beta
        # reaches alpha (its newest snapshot is beta's)
        t = time.time()
        write_files(b, n=1)
        wait_for(lambda: replicated(db, since=t) and
                 snaps(a.dataset)[-1] == snaps(b.dataset)[-1], S(30), step=0.1)
        # nothing was lost: every snapshot alpha had is still there
        assert all(s in snaps(a.dataset) for s in snaps(b.dataset)[:1])
    finally:
        da.stop()
        db.stop()


def test_the_slave_takes_over_the_moment_the_silence_passes_dead_time(bed):
    """Issue 16 item 1.  With a heartbeat every second (the liveness tick
    every 0.25 s), the slave decides the moment its master's silence passes
    dead_time, not at its next tick; the events that led there come first
    in its event log; and the promotion runs only the zfs commands it needs
    (readonly=off, the mount, one listing, the role marker; and on
    OpenZFS the key's state), the first two side by side (the mount with
    -o rw: OpenZFS mounted read-only when it read readonly before the set
    changed it, and mounted again), the marker while start_command runs."""
    service_config(bed, cluster={"heartbeat_interval": "%g" % S(1.0),
                                 "dead_time": "%g" % S(2.5)},
                   service={"service_address": None})
    a, b = bed.a, bed.b
    da, db = start(bed)
    try:
        a.kill_all()
        wait_for(lambda: serving(db), S(20), step=0.02)
        origin, marks = action_timeline(b, "promote")
        marks = {label: ms for ms, label in reversed(marks)}     # the first of each
        # decided at once (without the wake at the verdict: up to 250 ms)
        assert 0 <= marks["decided"] <= S(50), marks
        assert marks["start_command begins"] <= S(1000), marks
        started = [e for e in svc_log(b) if e[0] == "start"][0][2]
        assert started - origin <= S(1.5), (started - origin, marks)
        zfs = sorted(label.split(" (")[0] for label in marks if label.startswith("zfs "))
        expected = ["zfs list filesystem,volume", "zfs mount rw",
                    "zfs set flocker:role=beta master 3", "zfs set readonly=off"]
        if ff.Zfs().features().encryption:
            expected.insert(0, "zfs get encryption,encryptionroot,keystatus,keylocation")
        assert zfs == expected, marks
        assert zget(b.dataset, "flocker:role") == "beta master 3"
        assert zget(b.dataset, "readonly") == "off" and zget(b.dataset, "mounted") == "yes"
        with ff.StateStore.open(b.state_db, readonly=True) as store:
            messages = [e["message"] for e in store.events(200)]
        dead = [i for i, m in enumerate(messages) if m.startswith("peer alpha is dead")]
        begins = [i for i, m in enumerate(messages) if m.startswith("promote begins")]
        assert dead and begins and dead[-1] < begins[-1], messages[-12:]
    finally:
        da.stop()
        db.stop()


def test_isolated_master_steps_down_before_the_slave_promotes(lanbed):
    bed = lanbed
    service_config(bed, cluster={"arbitrator": bed.ARBITRATOR, "arbitrator_timeout": "%g" % S(0.3)})
    a, b = bed.a, bed.b
    da, db = start(bed)
    try:
        wait_for(lambda: da.status()["arbitrator"] and db.status()["arbitrator"] and
                 da.status()["arbitrator"]["reachable"] and
                 db.status()["arbitrator"]["reachable"], S(10))
        # alpha loses the heartbeat link and the LAN: it is the isolated one
        bed.cut_lan(a)
        bed.cut_link()
        wait_for(lambda: serving(db), S(15), step=0.02)
        wait_for(lambda: not da.status()["serving"], S(5), step=0.02)
        # (the replication cycle in flight may keep the rest of the step-down
        # waiting for its ssh timeouts; the user system stopped first)
        wait_for(lambda: da.status()["role"] == "slave", S(60), step=0.1)
        stop_a = [e for e in svc_log(a) if e[0] == "stop"]
        start_b = [e for e in svc_log(b) if e[0] == "start"]
        assert stop_a and start_b
        assert stop_a[0][2] < start_b[0][2], (stop_a, start_b)   # never both serving
        assert not svc_running(a) and svc_running(b)
        assert "isolated: neither the peer nor the arbitrator answers" in \
            a.flocker("history", check=True).stdout
        # alpha stays a slave while it is isolated: it cannot reach the arbitrator
        time.sleep(3 * DEAD)
        assert da.status()["role"] == "slave" and not svc_running(a)
    finally:
        da.stop()
        db.stop()


def test_no_promotion_when_the_slave_cannot_reach_the_arbitrator(lanbed):
    bed = lanbed
    service_config(bed, cluster={"arbitrator": bed.ARBITRATOR, "arbitrator_timeout": "%g" % S(0.3)})
    a, b = bed.a, bed.b
    da, db = start(bed)
    try:
        wait_for(lambda: db.status()["arbitrator"] and
                 db.status()["arbitrator"]["reachable"], S(10))
        bed.cut_lan(b)
        bed.cut_link()
        wait_for(lambda: db.status()["peer"]["state"] == "dead", S(5))
        time.sleep(4 * DEAD)
        sa, sb = da.status(), db.status()
        assert (sa["role"], sa["serving"]) == ("master", True)   # the master keeps serving
        assert (sb["role"], sb["serving"]) == ("slave", False)
        assert "the arbitrator is not reachable either" in sb["decision"]["reason"]
        assert svc_running(a) and not svc_running(b)
        # the link comes back: nothing happened, the peers see each other again
        bed.restore_link()
        bed.restore_lan(b)
        wait_for(lambda: db.status()["peer"]["state"] == "alive", S(5))
        assert db.status()["role"] == "slave" and da.status()["role"] == "master"
    finally:
        da.stop()
        db.stop()


def test_failing_check_hands_over_and_a_flapping_service_does_not_ping_pong(lanbed):
    bed = lanbed
    w = bed.workdir
    service_config(bed, service={
        "check_command": "sh -c '! [ -e %s/fail-$FLOCKER_NODE ]'" % w,
        "check_interval": "0.3", "check_failures": "2", "hold_down": "60"})
    a, b = bed.a, bed.b
    da, db = start(bed)
    try:
        t = time.time()
        mnt = write_files(a)
        wait_for(lambda: replicated(da, since=t), S(30), step=0.1)
        # a writer keeps writing until the service is stopped
        with open(os.path.join(mnt, "last-words.txt"), "w") as f:
            f.write("written after the last replication\n")
        want = bedmod.tree_digest(mnt)
        open(os.path.join(w, "fail-alpha"), "w").close()
        wait_for(lambda: serving(db), S(30), step=0.05)
        wait_for(lambda: da.status()["role"] == "slave", S(10), step=0.05)
        assert not svc_running(a) and svc_running(b)
        # the final snapshot carried what was written after the last cycle
        assert bedmod.tree_digest(zget(b.dataset, "mountpoint")) == want
        history = a.flocker("history", check=True).stdout
        assert re.search(r"the service check failed \d+ times in a row", history), history
        assert "final snapshot" in history
        assert db.status()["epoch"] == 3

        # now the service fails on beta too: the hold-down keeps it there
        open(os.path.join(w, "fail-beta"), "w").close()
        wait_for(lambda: db.status()["check_failures"] >= 3, S(10), step=0.1)
        time.sleep(S(1.0))
        sb = db.status()
        assert (sb["role"], sb["serving"]) == ("master", True)
        assert "hold-down 60 s" in sb["decision"]["reason"], sb["decision"]
        assert da.status()["role"] == "slave"
        assert [e[0] for e in svc_log(b)] == ["start"]
    finally:
        da.stop()
        db.stop()


def power_loss(*hosts):
    """Every process of each host dies at once (kill -9); the host boots
    again as far as its sshd, its daemon not started yet."""
    for h in hosts:
        h.kill_all()
    for h in hosts:
        h.start_sshd()
    hosts[0].bed._wait_for_sshd()


def test_cold_start_with_the_master_slow_to_boot(lanbed):
    """Both hosts lose power together and the master takes long to boot.
    The default (wait_for_peer = yes, issue 12 item 11) keeps the slave
    from serving its stale replica."""
    bed = lanbed
    service_config(bed)
    a, b = bed.a, bed.b
    da, db = start(bed)
    power_loss(a, b)
    # beta boots alone; wait_for_peer = yes: it never promotes
    db = Running(b, tag="-2").wait_ready()
    try:
        time.sleep(S(1.0) + DEAD + S(2.0))      # startup_wait + dead_time + margin
        sb = db.status()
        assert (sb["role"], sb["serving"]) == ("slave", False)
        assert "wait_for_peer = yes" in sb["decision"]["reason"]
        assert not svc_log(b)
    finally:
        db.stop()
    # wait_for_peer = no (documented): it promotes once startup_wait +
    # dead_time passed without a word from its peer
    service_config(bed, cluster={"wait_for_peer": "no"})
    started = time.monotonic()
    db = Running(b, tag="-3").wait_ready()
    da = None
    try:
        wait_for(lambda: serving(db), S(15), step=0.05)
        took = time.monotonic() - started
        assert took >= S(1.0) + DEAD, took
        assert "promote begins: no valid heartbeat for" in b.flocker("history").stdout
        # the master boots at last: it yields to the newer epoch
        da = Running(a, tag="-2").wait_ready()
        wait_for(lambda: da.status()["role"] == "slave", S(15), step=0.05)
        assert not svc_running(a) and svc_running(b)
    finally:
        if da is not None:
            da.stop()
        db.stop()


def test_outdated_replica_never_promotes_by_itself(lanbed):
    """The master tells a slave that missed its writes (replication failed
    3 times); the slave remembers it across a restart and does not take
    over with that replica when the master is gone.  (wait_for_peer = no:
    the outdated mark alone must hold it back.)"""
    bed = lanbed
    service_config(bed, cluster={"wait_for_peer": "no"})
    a, b = bed.a, bed.b
    da, db = start(bed)
    try:
        wait_for(lambda: replicated(da), S(30), step=0.1)
        b.kill_sshd()                    # replication to beta fails from now on
        write_files(a, n=1)
        wait_for(lambda: db.status()["outdated"], S(30), step=0.1)
    finally:
        da.stop()
        db.stop()
    a.kill_all()
    with ff.StateStore.open(b.state_db) as s:
        assert s.node_state().outdated
    db = Running(b, tag="-2").wait_ready()
    try:
        time.sleep(S(1.0) + DEAD + S(2.0))
        sb = db.status()
        assert (sb["role"], sb["serving"]) == ("slave", False)
        assert "known to be outdated" in sb["decision"]["reason"]
    finally:
        db.stop()


def test_failed_resolution_attempts_never_delay_the_promotion(lanbed):
    """The slave's attempts to join a resolution its master announces fail
    one after the other (the master's sshd is gone) and back off, up to
    60 s; when the master then dies, the slave promotes after dead_time
    like any slave: a failed action never delays a failover."""
    bed = lanbed
    service_config(bed)
    a, b = bed.a, bed.b
    init(bed)
    # beta holds a replica before alpha announces anything: an attempt made
    # while the first full copy was still arriving (zfs-fuse shows the
    # dataset, with no snapshot yet) found "no common snapshot" and left the
    # divergence to an operator, and no attempt followed (seen once)
    assert a.flocker("sync").returncode == 0
    flags = os.path.join(bed.workdir, "alpha-flags")
    da = Running(a, wrapper=True, env={"FFT_EXTRA_FLAGS_FILE": flags}).wait_ready()
    db = Running(b).wait_ready()
    try:
        wait_for(lambda: serving(da) and replicated(da), S(30), step=0.05)
        a.kill_sshd()            # beta's part of a resolution needs alpha's datasets
        # only now does alpha announce a resolution (its flag, which here never
        # ends as a real attempt's does): every attempt of beta's fails.  (Set
        # from the start, beta could join before the sshd was gone, succeed,
        # and have joined for good.)
        with open(flags, "w") as f:
            f.write(str(ff.FLAG_RESOLVING))
        wait_for(lambda: db.log_text().count("resolve failed") >= 4, S(30), step=0.1)
        assert "next try in 8 s" in db.log_text()
        t_kill = time.monotonic()
        a.kill_all()
        wait_for(lambda: serving(db), DEAD + S(10), step=0.05)
        took = time.monotonic() - t_kill
        assert took < DEAD + S(5), took
        assert svc_running(b)
    finally:
        da.stop()
        db.stop()


def test_drop_empty_leftover_destroys_only_an_empty_unheld_newest_snapshot(pool):
    """The one destroy of demotion (zfs-fuse): only the newest flocker
    snapshot, unheld, whose stream from the one before is empty."""
    ds = pool.name + "/d"
    bedmod.sh(["zfs", "create", ds])
    z = ff.Zfs()
    if z.features().written:
        pytest.skip("not on this ZFS: with 'written' no empty cycle snapshot is taken")
    mnt = zget(ds, "mountpoint")
    ctx = dataset_context(ds, z)
    with open(os.path.join(mnt, "a"), "w") as f:
        f.write("a")
    a = ff.snapshot_name(2, time.time())
    z.snapshot(ds, a, False)
    b = ff.snapshot_name(2, time.time() + 1)
    with open(os.path.join(mnt, "b"), "w") as f:
        f.write("b")                      # b holds data a lacks: kept
    z.snapshot(ds, b, False)
    assert ff._drop_empty_leftover(ctx) is None
    c = ff.snapshot_name(2, time.time() + 2)
    z.snapshot(ds, c, False)             # empty, but held: kept
    bedmod.sh(["zfs", "hold", "flocker", "%s@%s" % (ds, c)])
    assert ff._drop_empty_leftover(ctx) is None
    bedmod.sh(["zfs", "release", "flocker", "%s@%s" % (ds, c)])
    bedmod.sh(["zfs", "rename", "%s@%s" % (ds, c), "%s@mine" % ds])
    assert ff._drop_empty_leftover(ctx) is None   # not a flocker snapshot: kept
    bedmod.sh(["zfs", "rename", "%s@mine" % ds, "%s@%s" % (ds, c)])
    assert ff._drop_empty_leftover(ctx) == c      # empty, unheld, ours: the leftover
    assert [s[0] for s in snaps(ds)] == [a, b]
    assert ff._drop_empty_leftover(ctx) is None   # b holds data: kept


def test_kill_9_at_every_step_of_promotion_and_demotion(lanbed):
    """The daemon dies (kill -9) at each step of a promotion, and at each
    step of the old master's demotion when it returns; the restarted daemon
    finishes the change: the service runs exactly where the role is master."""
    bed = lanbed
    service_config(bed)
    a, b = bed.a, bed.b
    running = dict(zip((a, b), start(bed)))
    x, y = a, b                      # x is master, y slave
    steps = max(len(ff.PROMOTE_STEPS), len(ff.DEMOTE_STEPS))
    try:
        for i in range(steps):
            p = ff.PROMOTE_STEPS[i % len(ff.PROMOTE_STEPS)]
            d = ff.DEMOTE_STEPS[i % len(ff.DEMOTE_STEPS)]
            wait_for(lambda: replicated(running[x]), S(30), step=0.05)
            running[y].stop()
            running[y] = Running(y, env={"FLOCKER_FAILPOINT": "promote:" + p},
                                 tag="-p%d" % i).wait_ready()
            wait_for(lambda: running[y].status()["peer"]["state"] == "alive", S(10))
            x.kill_all()                                  # the master host dies
            assert killed(running[y]) != 0  # killed at promote:<p>
            running[y] = Running(y, tag="-p%d-after" % i).wait_ready()
            wait_for(lambda: serving(running[y]), S(20), step=0.05)
            assert svc_running(y) and zget(y.dataset, "mounted") == "yes", p
            assert not svc_running(x)

            x.start_sshd()
            bed._wait_for_sshd()
            running[x] = Running(x, env={"FLOCKER_FAILPOINT": "demote:" + d},
                                 tag="-d%d" % i).wait_ready()
            assert killed(running[x]) != 0  # killed at demote:<d>
            running[x] = Running(x, tag="-d%d-after" % i).wait_ready()
            # (the loop's first role job finishes the demotion)
            wait_for(lambda: running[x].status()["role"] == "slave" and
                     not running[x].status()["recovering"], S(20), step=0.05)
            assert not svc_running(x), d
            assert zget(x.dataset, "mounted") == "no" and zget(x.dataset, "readonly") == "on"
            assert serving(running[y]) and svc_running(y)
            with ff.StateStore.open(x.state_db) as s:
                assert s.unfinished_intent() is None
            x, y = y, x
    finally:
        for r in running.values():
            r.stop()
