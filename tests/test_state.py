"""The sqlite state store: durable, migratable, never overwritten when
it cannot be used, and driven by one writer at a time."""

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ff, need
import bed as bedmod


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def new_store(path, role="master"):
    s = ff.StateStore.open(str(path), create=True, lock_for="test")
    s.initialise("alpha", role, ff.initial_epoch(role, 0))
    return s


def test_fresh_store_has_current_schema_wal_and_full_sync(tmp_path):
    db = tmp_path / "state.db"
    with new_store(db) as s:
        c = s.conn
        assert c.execute("PRAGMA user_version").fetchone()[0] == ff.SCHEMA_VERSION
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL
        st = s.node_state()
        assert (st.node, st.role, st.epoch, st.generation, st.outdated) == ("alpha", "master", 2, 0, False)
        assert s.next_generation() == 1 and s.next_generation() == 2
        assert [e["kind"] for e in s.events()] == ["init"]
        assert not s.has_history()


def test_event_log_is_append_only(tmp_path):
    with new_store(tmp_path / "s.db") as s:
        s.record_event("test", "hello")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            s.conn.execute("UPDATE events SET message = 'rewritten'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            s.conn.execute("DELETE FROM events")
        assert [e["message"] for e in s.events()][-1] == "hello"


def fill_events(db, n, first_ts, step):
    """n events straight into the file (as years of a daemon's life would)."""
    c = sqlite3.connect(str(db))
    with c:
        c.executemany("INSERT INTO events (ts, level, kind, message) VALUES (?, 'info', "
                      "'liveness', ?)", ((first_ts + i * step, "event %d" % i)
                                         for i in range(n)))
    c.close()


def test_event_log_is_bounded_by_rows_and_age_and_trimming_is_recorded(tmp_path):
    db = tmp_path / "s.db"
    now = time.time()
    new_store(db).close()
    fill_events(db, 3000, now - 3000 * 3600.0, 3600.0)     # one an hour, 125 days
    with ff.StateStore.open(str(db), lock_for="test") as s:
        assert s.trim_events(keep_rows=1000, keep_days=365, now=now) == 3001 - 999
        left = s.events(limit=10 ** 6)
        assert len(left) == 1000
        assert left[-1]["kind"] == "trim" and left[-1]["level"] == "info"
        assert "removed 2002 event(s) (keep at most 1000, none older than 365 days)" in \
            left[-1]["message"]
        assert s.trim_events(keep_rows=1000, keep_days=365, now=now) == 0   # nothing more
        # by age: 30 days keep 720 of the hourly ones
        removed = s.trim_events(keep_rows=100000, keep_days=30, now=now)
        assert removed > 0
        assert min(e["ts"] for e in s.events(limit=10 ** 6)) >= now - 30 * 86400
        # anything else still cannot delete or rewrite the log
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            s.conn.execute("DELETE FROM events")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            s.conn.execute("UPDATE events SET message = 'rewritten'")
        assert [t["removed"] for t in s.event_trims()] == [2002, removed]


def test_open_runs_the_full_check_only_where_it_matters(tmp_path, monkeypatch):
    """PRAGMA quick_check reads the whole file: at the daemon's start-up,
    init and 'check --deep', not at every open (a replication cycle, the
    gate's status, a cron check)."""
    db = tmp_path / "s.db"
    new_store(db).close()
    seen = []
    real = ff.StateStore._connect

    def traced(path, exists, readonly=False):
        conn = real(path, exists, readonly)
        conn.set_trace_callback(seen.append)
        return conn
    monkeypatch.setattr(ff.StateStore, "_connect", staticmethod(traced))
    for kw in ({}, {"lock_for": "test"}, {"readonly": True}):
        ff.StateStore.open(str(db), **kw).close()
    assert not [q for q in seen if "quick_check" in q], seen
    ff.StateStore.open(str(db), deep_check=True).close()
    assert [q for q in seen if "quick_check" in q]


def test_epoch_never_goes_back(tmp_path):
    with new_store(tmp_path / "s.db") as s:
        s.set_role("slave", 3, "test")
        with pytest.raises(ff.StateError, match="epoch would go back from 3 to 2"):
            s.set_role("master", 2, "test")
        assert s.node_state().epoch == 3


def test_committed_role_change_survives_kill_9(tmp_path):
    """A role change reported as done is on disk even if the process is
    killed the next instant (no clean close, no checkpoint)."""
    db = tmp_path / "state.db"
    new_store(db).close()
    child = textwrap.dedent("""
        import sys, time, importlib.util
        spec = importlib.util.spec_from_file_location("ff", %r)
        ff = importlib.util.module_from_spec(spec); spec.loader.exec_module(ff)
        s = ff.StateStore.open(%r, lock_for="test")
        for epoch in range(2, 40):
            s.set_role("master" if epoch %% 2 else "slave", epoch, "flip %%d" %% epoch)
            print(epoch, flush=True)
        time.sleep(60)
    """ % (bedmod.PROGRAM, str(db)))
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,
                            universal_newlines=True)
    last = None
    for line in proc.stdout:
        last = int(line)
        if last == 39:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.getsize(str(db) + "-wal") > 0   # the changes are still in the WAL
    with ff.StateStore.open(str(db), lock_for="test") as s:   # the lock died with the process
        st = s.node_state()
        assert (st.epoch, st.role) == (39, "master")
        assert s.events()[-1]["message"] == "slave -> master, epoch 38 -> 39: flip 39"


def test_a_reader_open_while_a_backup_is_restored_changes_nothing(tmp_path):
    """Found by the fault campaign (seed 1505, old_state): the daemon is
    killed (its last writes still in the WAL), the operator puts a backup
    in place of the state file (and removes -wal and -shm), while the ssh
    gate, serving the peer's replication, has the file open to read this
    node's role.  When the gate's connection closed, sqlite, taking it for
    the last one, checkpointed the old WAL into the restored file: "database
    disk image is malformed", and the daemon would not start.  Readers
    (the gate, status, history) open the file read-only: they never write
    it, not even a checkpoint."""
    db = str(tmp_path / "state.db")
    new_store(db).close()
    backup = str(tmp_path / "backup.db")
    with sqlite3.connect(db) as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    src.close(), dst.close()
    child = textwrap.dedent("""
        import sys, time, importlib.util
        spec = importlib.util.spec_from_file_location("ff", %r)
        ff = importlib.util.module_from_spec(spec); spec.loader.exec_module(ff)
        s = ff.StateStore.open(%r, lock_for="test")
        for epoch in range(2, 60):
            s.set_role("master" if epoch %% 2 else "slave", epoch, "x" * 3000)
        print("done", flush=True)
        time.sleep(60)
    """ % (bedmod.PROGRAM, db))
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,
                            universal_newlines=True)
    try:
        assert proc.stdout.readline().strip() == "done"
        reader = ff.StateStore.open(db, readonly=True)      # as the gate and status do
        assert reader.node_state().epoch == 59
        os.kill(proc.pid, signal.SIGKILL)                   # the daemon dies
    finally:
        proc.kill()
        proc.wait()
    assert os.path.getsize(db + "-wal") > 0
    for suffix in ("-wal", "-shm"):                         # the operator's restore
        os.unlink(db + suffix)
    with open(backup, "rb") as f, open(db, "wb") as g:
        g.write(f.read())
    restored = digest(db)
    reader.close()
    assert digest(db) == restored
    with ff.StateStore.open(db, lock_for="test", deep_check=True) as s:
        assert s.node_state().epoch == ff.initial_epoch("master", 0)


def test_migration_from_schema_1_keeps_everything(tmp_path):
    db = str(tmp_path / "old.db")
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.executescript(ff.MIGRATIONS[0])
    c.execute("PRAGMA application_id = %d" % ff.STATE_APPLICATION_ID)
    c.execute("PRAGMA user_version = 1")
    c.execute("INSERT INTO node_state (id, node, role, epoch, generation, created) "
              "VALUES (1, 'beta', 'slave', 4, 17, 1.0)")
    c.execute("INSERT INTO events (ts, level, kind, message) VALUES (1.0, 'info', 'role', 'old')")
    c.close()
    # a reader without the lock does not upgrade, and says so
    with pytest.raises(ff.StateError) as e:
        ff.StateStore.open(db)
    assert e.value.message == (
        "the state file %s has schema version 1; this program uses version %d and will "
        "upgrade it the next time a command that changes state runs (init, or the daemon)"
        % (db, ff.SCHEMA_VERSION))
    with ff.StateStore.open(db, lock_for="test") as s:
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == ff.SCHEMA_VERSION
        st = s.node_state()
        assert (st.node, st.role, st.epoch, st.generation, st.outdated) == ("beta", "slave", 4, 17, False)
        assert s.events()[0]["message"] == "old"
        assert s.last_replication() is None and s.preserved() == [] and s.peer("alpha") is None
        assert s.has_history()


def test_newer_schema_refused_and_untouched(tmp_path):
    db = str(tmp_path / "new.db")
    new_store(db).close()
    c = sqlite3.connect(db)
    c.execute("PRAGMA user_version = 99")
    c.close()
    before = digest(db)
    for kw in ({}, {"lock_for": "test"}):
        with pytest.raises(ff.StateError) as e:
            ff.StateStore.open(db, **kw)
        assert e.value.message == (
            "the state file %s has schema version 99, written by a newer flocker-failover; "
            "this program (%s) knows version %d at most. The file was left untouched: run "
            "the newer program, or restore a backup made for this version"
            % (db, ff.VERSION, ff.SCHEMA_VERSION))
    assert digest(db) == before


@pytest.mark.parametrize("content,detail", [
    (b"this is not a database at all, just some text\n" * 100, "file is not a database"),
    (b"SQLite format 3\x00" + os.urandom(4000), None),
], ids=["text", "sqlite-header-then-random"])   # stable: a parallel run's workers compare them
def test_corrupt_file_refused_and_untouched(tmp_path, content, detail):
    db = str(tmp_path / "bad.db")
    with open(db, "wb") as f:
        f.write(content)
    before = digest(db)
    with pytest.raises(ff.StateError) as e:
        ff.StateStore.open(db, lock_for="test")
    assert e.value.message.startswith("the state file %s cannot be used (" % db)
    assert e.value.message.endswith(
        "). It was left untouched. Restore it from a backup, or move it aside and run "
        "'flocker_failover.py init --force --role ...' after checking on both nodes which one "
        "holds the newest data")
    if detail:
        assert detail in e.value.message
    assert digest(db) == before
    assert sorted(os.listdir(str(tmp_path))) == ["bad.db", "bad.db.lock"]


def test_foreign_sqlite_file_refused(tmp_path):
    db = str(tmp_path / "other.db")
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE customers (id INTEGER)")
    c.commit()
    c.close()
    before = digest(db)
    with pytest.raises(ff.StateError, match="it is an sqlite database, but not a flocker-failover state file"):
        ff.StateStore.open(db, lock_for="test")
    assert digest(db) == before


def test_single_writer_lock(tmp_path):
    db = str(tmp_path / "state.db")
    first = new_store(db)
    try:
        with pytest.raises(ff.LockBusy) as e:
            ff.StateStore.open(db, lock_for="daemon")
        assert e.value.exit_code == ff.EXIT_BUSY
        assert e.value.message == (
            "the state file %s is in use by another flocker-failover process (pid %d, test); "
            "only one may drive it at a time: stop that one first, or talk to the running "
            "daemon" % (db, os.getpid()))
        # readers need no lock: status works while a daemon drives the file
        with ff.StateStore.open(db) as reader:
            assert reader.node_state().role == "master"
            with pytest.raises(ff.StateError, match="without holding its lock"):
                reader.record_event("x", "y")
    finally:
        first.close()
    ff.StateStore.open(db, lock_for="daemon").close()


def test_lock_held_by_another_process(tmp_path):
    db = str(tmp_path / "state.db")
    new_store(db).close()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("ff", %r)
        ff = importlib.util.module_from_spec(spec); spec.loader.exec_module(ff)
        s = ff.StateStore.open(%r, lock_for="daemon")
        print("locked", flush=True); time.sleep(60)
    """ % (bedmod.PROGRAM, db))], stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ff.LockBusy, match=r"\(pid %d, daemon\)" % holder.pid):
            ff.StateStore.open(db, lock_for="init")
    finally:
        holder.kill()
        holder.wait()
    ff.StateStore.open(db, lock_for="init").close()   # released by the kernel at death


def test_unwritable_directory(tmp_path):
    need(os.geteuid() == 0, "needs root to mount a read-only file system")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        with pytest.raises(ff.StateError) as e:
            ff.StateStore.open(str(ro / "state.db"), create=True, lock_for="init")
        assert e.value.message == (
            "cannot write the state directory %s: Read-only file system; make it writable "
            "for this user or set state_db in the configuration to a path that is" % ro)
        with pytest.raises(ff.StateError) as e:
            ff.StateStore.open(str(ro / "sub" / "state.db"), create=True, lock_for="init")
        assert e.value.message.startswith("cannot write the state directory %s/sub: " % ro)
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_missing_state_file_says_run_init(tmp_path):
    db = str(tmp_path / "none.db")
    with pytest.raises(ff.StateError) as e:
        ff.StateStore.open(db)
    assert e.value.message == (
        "no state file at %s: this node was not initialised; run 'flocker_failover.py init "
        "--role master' on the node that runs the service now and '... init --role slave' on "
        "the other" % db)
    assert not os.path.exists(db)


def test_relaxed_writes_are_synced_by_the_next_one(tmp_path):
    """An intent's step (and the events a role job writes before its
    action) is not synced on its own: the connection is back to FULL
    after it, so the next write syncs it with its own (WAL)."""
    with new_store(tmp_path / "state.db") as s:
        iid = s.begin_intent("promote", {"epoch": 3, "reason": "test"})
        s.intent_step(iid, "role")
        assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL again
        with s.relaxed():
            assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 1   # NORMAL
            s.record_event("liveness", "peer beta is dead")
        assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert s.unfinished_intent()["step"] == "role"


def test_a_role_job_writes_what_the_state_writer_has_queued_first(tmp_path):
    """StoreWriter.write_pending: what the loop queued (the events that led
    to a role change) is written, in order, on the role job's own
    connection before the job's own writes, without waiting for the
    writer's thread; then the writer goes on with what comes later."""
    db = tmp_path / "state.db"
    new_store(db).close()
    lock = ff.StateLock(str(db))
    lock.acquire("test")
    w = ff.StoreWriter(str(db), lock)     # not started: its thread never runs here
    for i in range(3):
        w.submit(lambda store, i=i: store.record_event("liveness", "queued %d" % i))
    with ff.StateStore.open(str(db), lock=ff._BorrowedLock(lock)) as job:
        assert w.write_pending(job, timeout=1.0)
        job.record_event("promote", "promote begins")
        w.submit(lambda store: store.record_event("liveness", "later"))
        w.start()
        assert w.close(timeout=10)
        assert [e["message"] for e in job.events(10)][-5:] == [
            "queued 0", "queued 1", "queued 2", "promote begins", "later"]
    lock.release()
