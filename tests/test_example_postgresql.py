"""contrib/examples/postgresql/flocker-postgresql for real: PostgreSQL
(Debian's) on the replicated dataset, both daemons running, a client in
the LAN that inserts rows through the service address and records each
insert PostgreSQL acknowledged.  Through a failover (kill -9 of every
process of the master host: the replica is a crash image that holds the
master's postmaster.pid), the old master's return and a planned switchover
(`promote` on the slave): an acknowledged row is missing only when it came
after the newest snapshot the slave held at the failover, and a switchover
loses none."""

import glob
import json
import os
import shutil
import subprocess
import threading
import time

import pytest

import bed as bedmod
from conftest import ff, need
from helpers import Running, S, init, replicated, serving, start_pair, wait_for

SCRIPT = os.path.join(bedmod.ROOT, "contrib", "examples", "postgresql", "flocker-postgresql")
PGBIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def psql(bed, sql, timeout=10):
    """sql through the service address, from the LAN: (ok, output)."""
    try:
        proc = bed.lan_run(["env", "PGCONNECT_TIMEOUT=1", "psql", "-h", bed.SERVICE_ADDRESS,
                            "-U", "postgres", "-d", "postgres", "-XAtq", "-v",
                            "ON_ERROR_STOP=1", "-c", sql], check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, ""
    return proc.returncode == 0, proc.stdout


class Client(threading.Thread):
    """Inserts rows 1, 2, 3 ... without pause; acked[id] = time of the ack."""

    def __init__(self, bed):
        super().__init__(daemon=True)
        self.bed, self.acked, self.stop = bed, {}, threading.Event()

    def run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            ok, _ = psql(self.bed, "INSERT INTO acks (id) VALUES (%d)" % n, timeout=5)
            if ok:
                self.acked[n] = time.monotonic()
            else:
                time.sleep(0.05)

    def end(self):
        self.stop.set()
        self.join(timeout=30)


def rows(bed):
    ok, out = psql(bed, "SELECT id FROM acks")
    assert ok, out
    return {int(x) for x in out.split()}


def answers(bed):
    return psql(bed, "SELECT 1", timeout=5)[0]


def ipc_segments():
    out = bedmod.sh(["ipcs", "-m"], check=False).stdout
    return {line.split()[1] for line in out.splitlines()[3:] if len(line.split()) > 2
            and line.split()[2] == "postgres"}


def inspect(bed, host, kept):
    """The ids in a preserved dataset, read by a second PostgreSQL on a
    copy-preserved copy (README's recipe), which is then removed."""
    target = os.path.join(bed.workdir, "inspect")
    sock = os.path.join(bed.workdir, "inspect-sock")
    os.mkdir(sock)
    shutil.chown(sock, "postgres", "postgres")
    proc = host.flocker("copy-preserved", kept, "--mountpoint", target)
    assert proc.returncode == 0, proc.stderr
    pgdata = os.path.join(target, "pgdata")
    ctl = ["runuser", "-u", "postgres", "--", PGBIN[-1] + "/pg_ctl", "-D", pgdata, "-w"]
    try:
        os.unlink(os.path.join(pgdata, "postmaster.pid"))
    except FileNotFoundError:
        pass
    host.run(ctl + ["-l", os.path.join(sock, "log"), "start", "-o",
                    "-p 5499 -c listen_addresses='' -c unix_socket_directories=%s" % sock],
             timeout=120)
    try:
        out = host.run(["psql", "-h", sock, "-p", "5499", "-U", "postgres", "-d", "postgres",
                        "-XAtq", "-c", "SELECT id FROM acks"]).stdout
    finally:
        host.run(ctl + ["-m", "fast", "stop"], timeout=120)
        zfs = ff.Zfs()     # zfs-fuse calls a just-stopped server's file system busy a while
        zfs.run(["unmount", kept + "-copy"], retry_busy=True)
        zfs.run(["destroy", kept + "-copy"], retry_busy=True)
    return [int(x) for x in out.split()]


@pytest.fixture
def pg(lanbed):
    need(PGBIN and os.path.exists(PGBIN[-1] + "/pg_ctl") and shutil.which("psql"),
         "PostgreSQL is not installed (apt-get install postgresql)")
    shm, segments = set(os.listdir("/dev/shm")), ipc_segments()
    yield lanbed
    for h in lanbed.hosts:      # a killed postgres leaves its shared memory behind
        bedmod._kill_namespace(h.ns)
    for name in set(os.listdir("/dev/shm")) - shm:
        if name.startswith("PostgreSQL."):
            os.unlink(os.path.join("/dev/shm", name))
    for seg in ipc_segments() - segments:
        bedmod.sh(["ipcrm", "-m", seg], check=False)


def test_postgresql_through_a_failover_a_return_and_a_switchover(pg):
    bed = pg
    a, b = bed.a, bed.b
    env = "env PGHOST=%s %s " % (bed.SERVICE_ADDRESS, SCRIPT)
    bed.write_config(cluster={"replication_interval": "0.5"},
                     service={"start_command": env + "start", "stop_command": env + "stop",
                              "check_command": env + "check",
                              "service_address": "%s/28 dev lan0" % bed.SERVICE_ADDRESS,
                              "command_timeout": "90"})
    init(bed)
    # the user system onto the master's dataset, as README says: initdb there
    mnt = bedmod.sh(["zfs", "get", "-H", "-o", "value", "mountpoint", a.dataset]).stdout.strip()
    data = os.path.join(mnt, "pgdata")
    os.mkdir(data, 0o700)
    shutil.chown(data, "postgres", "postgres")
    bedmod.sh(["runuser", "-u", "postgres", "--", PGBIN[-1] + "/initdb", "-D", data,
               "-U", "postgres", "-A", "trust", "--no-sync"], timeout=180)
    with open(os.path.join(data, "postgresql.conf"), "a") as f:
        f.write("listen_addresses = '%s'\nport = 5432\nunix_socket_directories = ''\n"
                "shared_buffers = 16MB\nmax_connections = 20\n" % bed.SERVICE_ADDRESS)
    with open(os.path.join(data, "pg_hba.conf"), "a") as f:
        f.write("host all all 192.0.2.144/28 trust\n")

    da, db = start_pair(bed)
    assert wait_for(lambda: serving(da) and answers(bed), S(90), step=0.2), da.log_text()
    assert psql(bed, "CREATE TABLE acks (id integer PRIMARY KEY)")[0]
    since = time.time()
    assert wait_for(lambda: replicated(da, since), S(60), step=0.2)

    client = Client(bed)
    client.start()
    try:
        # 1. failover: every process of alpha dies, postgres with it
        assert wait_for(lambda: len(client.acked) >= 20, S(30), step=0.1)
        time.sleep(1)
        killed_at = time.monotonic()
        a.kill_all()
        # an answer alpha sent before it died may be taken after killed_at:
        # until dead_at a row may be alpha's (then kept there), after it, beta's
        dead_at = time.monotonic()
        assert wait_for(lambda: serving(db) and answers(bed), S(60), step=0.1), db.log_text()
        outage = time.monotonic() - killed_at
        assert wait_for(lambda: any(t > killed_at + outage for t in client.acked.values()),
                        S(20), step=0.1)
        present = rows(bed)
        lost = {i for i, t in client.acked.items() if t < dead_at and i not in present}
        # only what came after beta's newest snapshot: the last moments before the kill
        assert all(client.acked[i] > killed_at - S(5) for i in lost), sorted(lost)
        print("failover: outage %.2f s (kill -9 of alpha to the first answer from beta), "
              "%d acknowledged rows not on beta (alpha keeps them)" % (outage, len(lost)))

        # 2. alpha returns: slave again (its tail kept aside), beta's data flows to it
        a.start_sshd()          # the host boots: its sshd, then the daemon
        da = Running(a, tag="-2").wait_ready()
        since = time.time()
        assert wait_for(lambda: da.status()["role"] == "slave"
                        and replicated(db, since), S(90), step=0.2), da.log_text()

        # what alpha kept of its own: a second instance on a writable copy, as
        # README's "Divergent data" says, holds every row beta lacks
        kept = [p["dataset"] for p in json.loads(
            a.flocker("status", "--json", check=True).stdout)["preserved"]]
        assert kept or not lost, "rows lost and nothing kept on alpha"
        if kept:
            in_kept = set(inspect(bed, a, kept[-1]))
            assert lost <= in_kept, sorted(lost - in_kept)
            print("alpha kept all %d of them (a second instance on copy-preserved's copy)"
                  % len(lost))

        # 3. planned switchover back to alpha: nothing acknowledged is lost
        before = set(client.acked)
        began = time.monotonic()
        proc = a.flocker("promote", timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert wait_for(lambda: serving(da) and answers(bed), S(60), step=0.1), da.log_text()
        switch = time.monotonic() - began
        assert wait_for(lambda: any(t > began + switch for t in client.acked.values()),
                        S(20), step=0.1)
    finally:
        client.end()
    present = rows(bed)
    after_failover = {i for i, t in client.acked.items() if t > dead_at}
    assert after_failover - present == set(), sorted(after_failover - present)
    assert before - lost <= present
    print("switchover: %.2f s from 'promote' to the first answer from alpha, 0 of %d "
          "acknowledged rows lost" % (switch, len(client.acked)))
