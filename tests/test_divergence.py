"""Split brain with two real daemons: both serve while the link is cut and
both write; when the link returns, both reach the same verdict, the winner
serves its version, the loser keeps its own in a preserved dataset and
replicates the winner's.  Every file written on either side stays readable
somewhere (checksums)."""

import hashlib
import os
import time

import bed as bedmod
from conftest import dataset_context, ff
from helpers import (Pair, S, check_nothing_lost, files_in, killed, preserved, replicated, serving,
                     svc_log, wait_for, zget)


def run_scenario(p, policy, writes, expect, policy_b=None):
    """One split brain under policy: writes = (bytes on the master, bytes on
    the slave); expect = "master" or "slave": who must win."""
    if policy_b is not None or policy != p.policy:
        p.reconfigure(policy, policy_b)
        p.policy = policy
    # each split starts from a settled pair: the slave holds the master's
    # newest snapshot and is not outdated (a receive that zfs-fuse failed
    # after the last resolution, "I/O error" or "dataset is busy", is retried
    # by the next cycle; a split before that would find the slave outdated,
    # and rightly refusing to promote)
    wait_for(p.settled, S(60), step=0.1)
    m, s = p.roles()
    kept = {h: preserved(h) for h in (m, s)}
    written = p.split({m: writes[0], s: writes[1]})
    p.heal()
    winner = wait_for(p.settled, S(60), step=0.1)
    assert winner is (m if expect == "master" else s), (policy, writes, winner)
    loser = s if winner is m else m
    check_nothing_lost(winner, loser, written, kept[loser])
    return winner, loser


def test_every_policy_picks_the_master_or_the_slave_and_loses_nothing(lanbed):
    """In one bed, one split brain after the other (the roles move with
    the verdicts); the original master and slave are those of each split."""
    bed = lanbed
    p = Pair(bed, "most-changes")
    p.policy = "most-changes"
    try:
        w, l = run_scenario(p, "most-changes", (300000, 100000), "master")
        assert p.d[w].status()["epoch"] == 4            # above both (2 and 3)
        for h in (w, l):
            assert "alpha wins: it changed more" in h.flocker("history").stdout
        run_scenario(p, "most-changes", (100000, 300000), "slave")
        # under most-changes, a side that changed nothing keeps nothing
        run_scenario(p, "most-changes", (0, 100000), "slave")
        # the slave promoted during the split, so it always has the newer epoch
        run_scenario(p, "newest-master", (100000, 100000), "slave")
        run_scenario(p, "oldest-master", (100000, 100000), "master")
        m, s = p.roles()
        run_scenario(p, "prefer-node:" + m.name, (100000, 200000), "master")
        m, s = p.roles()
        run_scenario(p, "prefer-node:" + s.name, (200000, 100000), "slave")
        run_scenario(p, "zero-changes-only", (0, 100000), "slave")
        run_scenario(p, "zero-changes-only", (100000, 0), "master")
    finally:
        p.stop()


def test_manual_and_mismatched_policies_wait_for_the_operator(lanbed):
    """Nothing resolves and nothing is destroyed; status and check report
    the split brain as CRITICAL; 'resolve --winner' resolves it."""
    bed = lanbed
    p = Pair(bed, "manual")
    p.policy = "manual"
    try:
        for policy, policy_b, why in (
                ("manual", None, "divergence_policy = manual: an operator decides"),
                ("most-changes", "newest-master", "the nodes disagree on divergence_policy")):
            if policy_b is not None:
                p.reconfigure(policy, policy_b)
            m, s = p.roles()
            written = p.split({m: 100000, s: 200000})
            p.heal()
            wait_for(lambda: all(d.status()["divergence"]["unresolved"]
                                 for d in p.d.values()), S(30), step=0.1)
            # both stay master and keep their data; only the newer epoch
            # serves: the older one stopped writing as it met it (campaign
            # finding 3: two writers no longer than it takes to hear each other)
            newer = max(p.d, key=lambda h: p.d[h].status()["epoch"])
            for h, d in p.d.items():
                st = d.status()
                assert why in st["divergence"]["unresolved"], st["divergence"]
                assert st["role"] == "master" and st["serving"] == (h is newer), st
                r = h.flocker("check", config=p.config[h])
                assert r.returncode == 2 and "split brain unresolved" in r.stdout, r.stdout
                assert files_in(h.dataset) == dict(files_in(h.dataset), **written[h])
            r = m.flocker("resolve", "--dry-run", config=p.config[m])
            assert r.returncode == 0 and "an operator decides" in r.stdout, r.stdout + r.stderr
            # the operator picks the slave's version, on the master's node
            kept = preserved(m)
            r = m.flocker("resolve", "--winner", s.name, "--wait", "%g" % S(60), timeout=S(90),
                          config=p.config[m])
            assert r.returncode == 0, r.stdout + r.stderr
            assert wait_for(p.settled, S(60), step=0.1) is s
            check_nothing_lost(s, m, written, kept)
            assert "an operator chose it" in m.flocker("history").stdout
            # a preserved dataset waits: WARNING
            assert m.flocker("check", config=p.config[m]).returncode == 1
    finally:
        p.stop()


# kill -9 of one daemon at a step of a resolution: (which side, failpoint)
CRASHES = [("loser", "resolve:published"), ("loser", "resolve:verdict"),
           ("loser", "preserve:rename"), ("loser", "preserve:clone"),
           ("loser", "preserve:promote"), ("loser", "demote:unmount"),
           ("winner", "resolve:published"), ("winner", "resolve:verdict")]
# (the winner's own promotion is the failover's, killed at every step in
# test_failover.py; a failpoint there would fire at the daemon's restart)


def test_kill_9_at_steps_of_a_resolution_loses_nothing(lanbed):
    """most-changes: the master writes more and wins, the slave loses.  The
    chosen daemon dies at the step; restarted, the resolution completes and
    every file written on either side is still readable."""
    bed = lanbed
    p = Pair(bed, "most-changes")
    p.policy = "most-changes"
    try:
        for side, point in CRASHES:
            m, s = p.roles()
            victim = m if side == "winner" else s
            p.d[victim].stop()
            p.start(victim, env={"FLOCKER_FAILPOINT": point})
            # (stopping the master's daemon told the slave it may be outdated;
            # that clears once the master is back and the slave holds its
            # newest snapshot)
            wait_for(lambda: all(d.status()["peer"]["state"] == "alive" and
                                 not d.status()["outdated"] for d in p.d.values()), S(20))
            kept = {h: preserved(h) for h in (m, s)}
            written = p.split({m: 200000, s: 100000})
            p.heal()
            assert killed(p.d[victim], 60) != 0, point   # died at the step
            p.start(victim)
            winner = wait_for(p.settled, S(60), step=0.1)
            assert winner is m, point
            check_nothing_lost(m, s, written, kept[s])
            for h in (m, s):
                with ff.StateStore.open(h.state_db) as st:
                    assert st.unfinished_intent() is None, (point, h)
    finally:
        p.stop()


def test_a_loser_never_takes_over_with_the_data_it_lost_when_the_winner_dies(lanbed):
    """The winner dies right after the verdict (kill -9 at resolve:verdict),
    before it serves or sends anything; the loser has kept its own data
    aside and is slave holding the common snapshot.  It must not take over
    on that snapshot when the winner stays silent past dead_time: the
    winner's writes since the split are nowhere else, and serving without
    them is the wrong data (seen once in a full run, where the restart of
    the winner took longer than dead_time).  The loser stays slave, marked
    OUTDATED (status, check CRITICAL), until the winner is back and it
    holds the winner's newest snapshot."""
    bed = lanbed
    p = Pair(bed, "most-changes")
    p.policy = "most-changes"
    try:
        m, s = p.roles()
        p.d[m].stop()
        p.start(m, env={"FLOCKER_FAILPOINT": "resolve:verdict"})
        wait_for(lambda: all(d.status()["peer"]["state"] == "alive" and
                             not d.status()["outdated"] for d in p.d.values()), S(20))
        kept = {h: preserved(h) for h in (m, s)}
        written = p.split({m: 200000, s: 100000})
        p.heal()
        assert killed(p.d[m], 60) != 0
        # the loser carries out its part, then hears nothing from the winner
        wait_for(lambda: p.d[s].status()["role"] == "slave" and
                 p.d[s].status()["peer"]["state"] == "dead", S(30), step=0.1)
        time.sleep(S(3))       # three dead_times more
        st = p.d[s].status()
        assert st["role"] == "slave" and not st["serving"] and st["outdated"], st
        assert [e[0] for e in svc_log(s)][-1] == "stop", svc_log(s)
        r = s.flocker("check", config=p.config[s])
        assert r.returncode == 2 and "OUTDATED" in r.stdout, r.stdout
        # the winner returns: it serves its data, the loser receives it and
        # is up to date again
        p.start(m)
        assert wait_for(p.settled, S(60), step=0.1) is m
        check_nothing_lost(m, s, written, kept[s])
        assert "replica no longer outdated" in s.flocker("history").stdout
    finally:
        p.stop()


def test_drop_empty_divergence_destroys_only_changeless_snapshots(pool):
    """The losing side's snapshots after the common one are destroyed only
    when the stream from the common snapshot to the newest is empty."""
    ds = pool.name + "/d"
    bedmod.sh(["zfs", "create", ds])
    z = ff.Zfs()
    mnt = zget(ds, "mountpoint")

    ctx = dataset_context(ds, z)
    X1, X2, X3 = (ff.snapshot_name(3, 1e9 + i) for i in range(3))
    with open(os.path.join(mnt, "a"), "w") as f:
        f.write("a")
    z.snapshot(ds, "common", False)
    common = z.listing(ds).snap("common")
    z.snapshot(ds, X1, False)        # nothing changed: empty
    z.snapshot(ds, X2, False)
    with open(os.path.join(mnt, "b"), "w") as f:
        f.write("b")
    z.snapshot(ds, X3, False)        # holds b: the stream is not empty
    try:
        ff._drop_empty_divergence(ctx, common)
        raise AssertionError("destroyed snapshots although one carries a change")
    except ff.ActionError as e:
        assert "changed since common after all; nothing was destroyed" in e.message
    assert [s.name for s in z.listing(ds).snaps] == ["common", X1, X2, X3]
    bedmod.sh(["zfs", "destroy", ds + "@" + X3])   # (the test's own clean-up)
    os.remove(os.path.join(mnt, "b"))
    with open(os.path.join(mnt, "a")) as f:
        assert f.read() == "a"
    # b was removed again, but the dataset has unsnapshotted changes; the
    # snapshots after common are empty: those go, the data stays
    assert ff._drop_empty_divergence(ctx, common) == [X2, X1]
    assert [s.name for s in z.listing(ds).snaps] == ["common"]
    with open(os.path.join(mnt, "a")) as f:
        assert f.read() == "a"


def test_foreign_snapshot_on_the_slave_is_no_split_brain_and_is_kept(bed):
    """An operator's (or zfs-auto-snapshot's, sanoid's) snapshot of the
    replica after the common one blocks the incremental receive; it is no
    divergence: no resolution, no restart of the service, and the snapshot
    is never destroyed.  The master says which snapshot blocks and what to
    do; once the operator removed it, replication goes on."""
    p = Pair(bed, "most-changes")
    m, s = bed.a, bed.b
    try:
        foreign = s.dataset + "@hourly-test"
        bedmod.sh(["zfs", "snapshot", foreign])
        with open(os.path.join(zget(m.dataset, "mountpoint"), "new.bin"), "wb") as f:
            f.write(os.urandom(50000))
        wait_for(lambda: "hourly-test" in p.d[m].log_text(), S(30), step=0.1)
        time.sleep(S(4))       # many cycles of 0.5 s
        text = {h: p.d[h].log_text() for h in (m, s)}
        for h in (m, s):
            assert "resolving a divergence" not in text[h], text[h]
            assert "split brain" not in h.flocker("history").stdout
        assert [e[0] for e in svc_log(m)] == ["start"]       # never restarted
        assert serving(p.d[m]) and p.d[s].status()["role"] == "slave"
        assert bedmod.sh(["zfs", "list", "-H", "-o", "name", foreign]).returncode == 0
        line = [x for x in text[m].splitlines() if "hourly-test" in x][0]
        assert "not made by flocker-failover" in line and "zfs destroy" in line, line
        # the same refusal once a minute, not every cycle
        assert len([x for x in text[m].splitlines() if "hourly-test" in x]) == 1, text[m]
        bedmod.sh(["zfs", "destroy", foreign])      # the operator's choice
        since = time.time()
        wait_for(lambda: replicated(p.d[m], since), S(30), step=0.1)
    finally:
        p.stop()


def test_drop_empty_divergence_never_destroys_a_foreign_snapshot(pool):
    """A loser's empty snapshots after the common one go, except those not
    named by flocker-failover (an operator's, zfs-auto-snapshot's): they
    stay, and the event says so."""
    ds = pool.name + "/d"
    bedmod.sh(["zfs", "create", ds])
    z = ff.Zfs()
    ctx = dataset_context(ds, z)
    z.snapshot(ds, "common", False)
    common = z.listing(ds).snap("common")
    x1, x2 = ff.snapshot_name(3, 1e9), ff.snapshot_name(3, 1e9 + 1)
    for name in (x1, "hourly-test", x2, "zfs-auto-snap_daily"):
        z.snapshot(ds, name, False)
    assert ff._drop_empty_divergence(ctx, common) == [x2, x1]
    assert [s.name for s in z.listing(ds).snaps] == ["common", "hourly-test",
                                                     "zfs-auto-snap_daily"]
    assert "kept 2 snapshot(s) not made by flocker-failover" in ctx.store.events[-1]
    assert "hourly-test" in ctx.store.events[-1]


def test_loser_keeps_its_settings_and_child_and_serves_them_after_a_failover(bed):
    """The loser's dataset has its own mountpoint, atime=off, compression
    and recordsize, and an unrelated child dataset of the user's.  After the
    resolution it keeps all of them (the preserved copy is set aside); when
    it is promoted later, the service finds the winner's data at its usual
    path, the child mounted in it, untouched; discard-preserved removes only
    what diverged."""
    p = Pair(bed, "most-changes")
    m, s = bed.a, bed.b
    mp = os.path.join(m.pool.mountpoint, "srv", "shop")
    own = {"mountpoint": mp, "atime": "off", "compression": "on", "recordsize": "16384"}
    try:
        for prop, value in own.items():
            bedmod.sh(["zfs", "set", "%s=%s" % (prop, value), m.dataset])
        kid = m.dataset + "/kid"
        bedmod.sh(["zfs", "create", kid])
        with open(os.path.join(mp, "kid", "child.txt"), "w") as f:
            f.write("the user's own child dataset\n")
        kid_files = bedmod.tree_digest(os.path.join(mp, "kid"))
        written = p.split({m: 100000, s: 300000})       # the slave changed more: m loses
        p.heal()
        assert wait_for(p.settled, S(60), step=0.1) is s
        [kept] = preserved(m)
        got = {prop: bedmod.sh(["zfs", "get", "-H", "-p", "-o", "value,source", prop,
                                m.dataset]).stdout.split() for prop in own}
        assert got == {prop: [value, "local"] for prop, value in own.items()}, got
        assert zget(kept, "canmount") == "noauto" and zget(kept, "mountpoint") != mp
        assert bedmod.sh(["zfs", "list", "-H", "-o", "name", "-r", kept]).stdout.split() == [kept]
        wait_for(lambda: files_in(m.dataset) == files_in(s.dataset), S(30), step=0.2)
        # the winner's host dies: the loser takes over, on its own path
        s.kill_all()
        wait_for(lambda: serving(p.d[m]), S(30), step=0.1)
        assert zget(m.dataset, "mountpoint") == mp and zget(kid, "mounted") == "yes"
        have = {k: v for k, v in bedmod.tree_digest(mp).items() if not k.startswith("kid/")}
        for name, digest in written[s].items():
            assert have.get(name) == digest, name
        assert not set(written[m]) & set(have)
        assert bedmod.tree_digest(os.path.join(mp, "kid")) == kid_files
        old = files_in(kept)
        assert all(old.get(n) == d for n, d in written[m].items())
        p.d[m].stop()           # (discard-preserved takes the state lock)
        r = m.flocker("discard-preserved", kept, "--yes", config=p.config[m])
        assert r.returncode == 0, r.stdout + r.stderr
        names = bedmod.sh(["zfs", "list", "-H", "-o", "name", "-r", m.pool.name]).stdout.split()
        assert kept not in names and m.dataset in names and kid in names
        bedmod.sh(["zfs", "mount", kid], check=False)
        assert bedmod.tree_digest(os.path.join(mp, "kid")) == kid_files
    finally:
        p.stop()


def test_drop_empty_divergence_counts_child_changes_with_recursive(pool):
    """Issue 13, item 4: with recursive = yes a change in a child dataset
    is a change of that side: the loser's snapshots after the common one
    are destroyed only when the stream of the dataset and of every child
    carries no change, and then in the children too (snapshot -r made
    them)."""
    ds = pool.name + "/d"
    kid = ds + "/kid"
    bedmod.sh(["zfs", "create", ds])
    bedmod.sh(["zfs", "create", kid])
    z = ff.Zfs()
    ctx = dataset_context(ds, z, recursive=True)
    x1, x2 = ff.snapshot_name(3, 1e9), ff.snapshot_name(3, 1e9 + 1)
    bedmod.sh(["zfs", "snapshot", "-r", ds + "@common"])
    common = z.listing(ds).snap("common")
    with open(os.path.join(zget(kid, "mountpoint"), "only-here.bin"), "wb") as f:
        f.write(os.urandom(30000))
    bedmod.sh(["zfs", "snapshot", "-r", "%s@%s" % (ds, x1)])
    try:
        ff._drop_empty_divergence(ctx, common)
        raise AssertionError("destroyed snapshots although a child changed")
    except ff.ActionError as e:
        assert "changed since common after all; nothing was destroyed" in e.message
    assert [s.name for s in z.listing(ds).snaps] == ["common", x1]
    assert [s.name for s in z.listing(kid).snaps] == ["common", x1]
    assert os.path.exists(os.path.join(zget(kid, "mountpoint"), "only-here.bin"))
    # the test's own clean-up: the child back at the common snapshot
    bedmod.sh(["zfs", "destroy", "-r", "%s@%s" % (ds, x1)])
    bedmod.sh(["zfs", "rollback", kid + "@common"])
    bedmod.sh(["zfs", "snapshot", "-r", "%s@%s" % (ds, x2)])     # nothing changed anywhere
    assert ff._drop_empty_divergence(ctx, common) == [x2]
    assert [s.name for s in z.listing(ds).snaps] == ["common"]
    assert [s.name for s in z.listing(kid).snaps] == ["common"]


def recursive_pair(bed):
    """Two daemons with recursive = yes; alpha's dataset has a child with
    a file, replicated to beta."""
    p = Pair(bed, "most-changes", cluster={"recursive": "yes"})
    m = bed.a
    kid = m.dataset + "/kid"
    bedmod.sh(["zfs", "create", kid])
    with open(os.path.join(zget(kid, "mountpoint"), "kid.bin"), "wb") as f:
        f.write(os.urandom(20000))
    since = time.time()
    wait_for(lambda: replicated(p.d[m], since), S(30), step=0.1)
    assert bedmod.sh(["zfs", "list", "-H", "-o", "name", bed.b.dataset + "/kid"]).returncode == 0
    return p


def write_in(dataset, size):
    """{file: sha256} of one new file of `size` random bytes in dataset."""
    name = "w-%d.bin" % time.time_ns()
    data = os.urandom(size)
    with open(os.path.join(zget(dataset, "mountpoint"), name), "wb") as f:
        f.write(data)
    return {name: hashlib.sha256(data).hexdigest()}


def refused_before_anything_stops(p, m, s, loser):
    """Both nodes leave the divergence to the operator, saying why. No
    data changes and the loser does not stop: the split brain's older
    master (alpha, epoch 2) stopped its user system when the two heard
    each other (split_brain_yields), the newer one (beta) still serves, so
    that exactly one writes while the operator is away; neither is
    demoted. No attempt follows the refusal at once (it waits for the
    operator)."""
    def done():
        return all(d.status()["divergence"]["unresolved"] for d in p.d.values())
    wait_for(done, S(60), step=0.1)
    said = [x for d in p.d.values() for x in d.log_text().splitlines()
            if "Verdict" in x or "ERROR" in x]
    assert [e[0] for e in svc_log(m)] == ["start", "stop"], (svc_log(m), said)
    assert [e[0] for e in svc_log(s)] == ["start"], (svc_log(s), said)
    for h, d in p.d.items():
        st = d.status()
        why = st["divergence"]["unresolved"]
        assert "recursive = yes" in why and "%s changed" % loser.name in why, why
        assert "no data was changed on either node" in why, why
        assert st["role"] == "master" and st["serving"] == (h is s), st
        r = h.flocker("check", config=p.config[h])
        assert r.returncode == 2 and "split brain unresolved" in r.stdout, r.stdout
    # it waits: one look every 60 s (UNRESOLVED_RETRY, not scaled), which
    # one side's look may make the other join; a retry with the backoff
    # of a failed action (1, 2, 4... s) would make several in 10 s
    attempts = {h: d.log_text().count("resolving a divergence") for h, d in p.d.items()}
    time.sleep(10)
    again = {h: d.log_text().count("resolving a divergence") - attempts[h]
             for h, d in p.d.items()}
    assert all(n <= 1 for n in again.values()), again


def test_recursive_child_only_changes_are_changes(bed):
    """Issue 13, item 4: with recursive = yes, a node that wrote only in a
    child dataset changed something: the verdict is no "only alpha
    changed; nothing is lost", and since keeping that side is not done for
    recursive datasets, both nodes leave it to the operator before
    anything stops; the README's way of keeping it by hand then works."""
    p = recursive_pair(bed)
    m, s = bed.a, bed.b
    try:
        bed.cut_link()
        wait_for(lambda: all(serving(d) for d in p.d.values()), S(15), step=0.05)
        top = write_in(m.dataset, 200000)
        kid = write_in(s.dataset + "/kid", 60000)        # beta writes in the child only
        p.heal()
        refused_before_anything_stops(p, m, s, loser=s)
        assert files_in(s.dataset + "/kid").get(list(kid)[0]) == list(kid.values())[0]
        assert files_in(m.dataset).get(list(top)[0]) == list(top.values())[0]

        # the operator keeps beta's side by hand (README, "Divergent data")
        p.d[s].stop()
        kept = s.dataset + "-kept"
        for pause in (0.2, 0.5, 1, 2, 4, None):    # (zfs-fuse: busy for a moment)
            for name in (s.dataset + "/kid", s.dataset):    # (zfs-fuse: unmounted first)
                bedmod.sh(["zfs", "unmount", name], check=False)
            r = bedmod.sh(["zfs", "rename", s.dataset, kept], check=False)
            if r.returncode == 0 or pause is None:
                break
            time.sleep(pause)
        assert r.returncode == 0, r.stderr
        bedmod.sh(["zfs", "set", "canmount=noauto", kept])
        r = s.flocker("init", "--role", "slave", "--force", config=p.config[s])
        assert r.returncode == 0, r.stdout + r.stderr
        p.start(s)
        assert wait_for(p.settled, S(60), step=0.1) is m
        # (the top first: mounting the child alone would leave its directory
        # in the top's unmounted mountpoint)
        assert files_in(s.dataset).get(list(top)[0]) == list(top.values())[0]
        assert files_in(s.dataset + "/kid") == files_in(m.dataset + "/kid")
        assert files_in(kept + "/kid").get(list(kid)[0]) == list(kid.values())[0]
    finally:
        p.stop()


def test_recursive_loser_is_refused_before_it_stops(bed):
    """Issue 13, item 4: with recursive = yes the loser's divergent data
    (of the dataset and its children) is not kept by the tool: the
    verdict is refused on both nodes before the loser stops its user
    system, with the reason in status and the log, and it waits for the
    operator (no attempt after attempt)."""
    p = recursive_pair(bed)
    m, s = bed.a, bed.b
    try:
        bed.cut_link()
        wait_for(lambda: all(serving(d) for d in p.d.values()), S(15), step=0.05)
        write_in(m.dataset, 200000)
        write_in(s.dataset, 60000)
        write_in(s.dataset + "/kid", 10000)
        p.heal()
        refused_before_anything_stops(p, m, s, loser=s)
        text = p.d[s].log_text()
        assert "not supported yet" not in text, text
    finally:
        p.stop()


def test_serving_as_an_attempt_began_is_kept_when_the_common_snapshot_read_moves(monkeypatch):
    """A winner killed after its verdict restarts while the loser keeps its
    data aside; reading the loser's replica half-way, it found an older
    common snapshot than the one it had published its facts for, and so
    measured anew as 'not serving' (it no longer served: it had stopped for
    the resolution) and lost to the loser it had beaten (seen in a full run,
    the diagnostic line: 'facts published before (attempt 15, ..., serving)
    are not of this attempt (15, flocker-2-...)').  What it was when the
    attempt began is the attempt's, whatever snapshot is read as common."""
    props = {}

    class Z:
        def get(self, ds, names):
            return {n: props.get(n) for n in names}

        def set_prop(self, ds, prop, value):
            props[prop] = value

    class Cfg:
        class local:
            dataset = "p/d"
    ctx = ff.Context(Cfg, None, Z())
    commons = [ff.Snap("flocker-12-20261130T054248.214Z", "12", 0, 12),
               ff.Snap("flocker-2-20261130T054146.681Z", "2", 0, 2)]
    monkeypatch.setattr(ff, "my_divergence_side", lambda ctx, remote, snapshot=True: (
        ff.Side("alpha", 14, "most-changes", 275328), commons.pop(0), 14))
    remote = ff.Listing("q/d", {ff.ROLE_PROPERTY: ff.role_marker("beta", ff.ROLE_MASTER, 15)},
                        ())
    me, common, attempt, _ = ff._publish_my_side(ctx, remote, None, True, False)
    assert (me.serving, common.guid, attempt) == (True, "12", 15)
    # restarted, not serving: the facts it published say it served
    me, common, attempt, facts = ff._publish_my_side(ctx, remote, None, False, False)
    assert (me.serving, common.guid, attempt) == (True, "2", 15)
    assert ff.parse_divergence(facts)["serving"]
    # a later attempt (a promotion came between) measures anew
    commons.append(ff.Snap("flocker-16-20261130T060000.000Z", "16", 0, 16))
    remote = ff.Listing("q/d", {ff.ROLE_PROPERTY: ff.role_marker("beta", ff.ROLE_MASTER, 17)},
                        ())
    me, common, attempt, _ = ff._publish_my_side(ctx, remote, None, False, False)
    assert (me.serving, attempt) == (False, 17)
