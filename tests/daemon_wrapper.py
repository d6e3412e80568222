"""Runs flocker_failover.py's main() with test-only changes, inside a test
host's namespace ("daemon_wrapper.py CACHE_DIR ARGS...": the module
imported as run_program.py imports it, its bytecode cached in CACHE_DIR):

  FFT_WALL_OFFSET_FILE=path  the wall clock the program reads is the real
                             one plus the number of seconds in that file (the
                             test rewrites it to step the clock; the machine
                             clock is never changed)
  FFT_SLOW_JOB=json          plug a periodic job into the daemon through its
                             job-runner interface (Daemon.add_periodic, where
                             the replication cycle plugs in): a real
                             zfs send | ssh | zfs recv transfer, pumped through
                             the job thread at a throttled rate so that it
                             lasts `seconds`; its outcome goes to `report`.
  FFT_EXTRA_FLAGS_FILE=path  every heartbeat also carries the flag bits
                             written in that file, read each time (e.g. 16:
                             "resolving", which a peer joins)
  FFT_MEMTRACE=dir           every 30 s, append to dir/<pid>.mem the RSS, the
                             threads, what Python itself holds (tracemalloc)
                             and its 12 largest sites: whether a daemon's
                             growth is Python objects or the allocator's
"""

import hashlib
import json
import os
import subprocess
import sys
import time

import run_program

ff = run_program.load(sys.argv.pop(1))


def _stepped_clock(path):
    real = time.time
    cache = {"mtime": None, "offset": 0.0}

    def wall_clock():
        try:
            mtime = os.stat(path).st_mtime_ns
            if mtime != cache["mtime"]:
                with open(path) as f:
                    cache["offset"] = float(f.read().strip() or 0)
                cache["mtime"] = mtime
        except (OSError, ValueError):
            pass
        return real() + cache["offset"]
    return wall_clock


def _slow_transfer(spec, daemon):
    """fn(stop) for the job runner: one throttled real transfer, recorded in
    the replications table through the job's own state connection."""
    def job(stop):
        store = daemon.open_store()
        with store.transaction() as conn:
            row = conn.execute(
                "INSERT INTO replications (started, snapshot, result) "
                "VALUES (?, ?, 'running')", (ff.wall_clock(), spec["snapshot"])).lastrowid
        started = time.monotonic()
        send = subprocess.Popen(["zfs", "send", spec["snapshot"]], stdout=subprocess.PIPE)
        recv = subprocess.Popen(spec["recv_argv"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        total, digest = 0, hashlib.sha256()
        rate = spec["bytes"] / float(spec["seconds"])
        try:
            while not stop.is_set():
                chunk = send.stdout.read(16384)
                if not chunk:
                    break
                digest.update(chunk)
                recv.stdin.write(chunk)
                total += len(chunk)
                ahead = total / rate - (time.monotonic() - started)
                if ahead > 0:
                    stop.wait(ahead)
        finally:
            recv.stdin.close()
            send.stdout.close()
            send.wait()
            err = recv.stderr.read().decode()
            recv.wait()
        result = {"bytes": total, "seconds": time.monotonic() - started,
                  "send": send.returncode, "recv": recv.returncode, "stderr": err,
                  "stopped": stop.is_set(), "sha256": digest.hexdigest()}
        ok = result["send"] == 0 and result["recv"] == 0 and not result["stopped"]
        with store.transaction() as conn:
            conn.execute(
                "UPDATE replications SET finished = ?, bytes = ?, seconds = ?, result = ?, "
                "error = ? WHERE id = ?",
                (ff.wall_clock(), total, result["seconds"], "ok" if ok else "failed",
                 None if ok else ("stopped" if result["stopped"] else err.strip()), row))
        store.close()
        with open(spec["report"], "a") as f:
            f.write(json.dumps(result) + "\n")
        return result
    return job


if os.environ.get("FFT_WALL_OFFSET_FILE"):
    ff.wall_clock = _stepped_clock(os.environ["FFT_WALL_OFFSET_FILE"])

if os.environ.get("FFT_SLOW_JOB"):
    _spec = json.loads(os.environ["FFT_SLOW_JOB"])
    _install = ff.Daemon.install_jobs

    def install_jobs(self):
        _install(self)
        # the slow transfer stands in for the replication cycle (its pace set
        # by the test, not by the link, which heartbeats share): replace it
        self.periodic = [p for p in self.periodic if p[0] != "replicate"]
        self.add_periodic("slow-transfer", lambda cfg: _spec["every"],
                          _slow_transfer(_spec, self))
    ff.Daemon.install_jobs = install_jobs

if os.environ.get("FFT_EXTRA_FLAGS_FILE"):
    _flags = ff.RoleKeeper.flags
    _flags_path = os.environ["FFT_EXTRA_FLAGS_FILE"]

    def _extra_flags(self, now):
        try:
            with open(_flags_path) as f:
                extra = int(f.read().strip() or 0)
        except (OSError, ValueError):
            extra = 0
        return _flags(self, now) | extra
    ff.RoleKeeper.flags = _extra_flags

if os.environ.get("FFT_MEMTRACE"):
    import threading
    import tracemalloc
    tracemalloc.start(4)
    _mem_path = os.path.join(os.environ["FFT_MEMTRACE"], "%d.mem" % os.getpid())

    def _write_sites(head, stats, size_of):
        """head, then one line per tracemalloc statistic, to the .mem file."""
        lines = [head]
        for stat in stats:
            lines.append("  %s kB %d blocks: %s" % (
                size_of(stat), stat.count,
                " < ".join("%s:%d" % (os.path.basename(fr.filename), fr.lineno)
                           for fr in stat.traceback)))
        with open(_mem_path, "a") as f:
            f.write("\n".join(lines) + "\n")

    def _memtrace():
        """Every 30 s: RSS, threads, what Python holds, and what grew most."""
        first = None
        while True:
            time.sleep(30)
            snap = tracemalloc.take_snapshot()
            if first is None:
                first = snap
            with open("/proc/self/status") as f:
                status = dict(line.split(":", 1) for line in f)
            cur, peak = tracemalloc.get_traced_memory()
            _write_sites("%s rss %s threads %s traced %d kB peak %d kB argv %s" % (
                time.strftime("%H:%M:%S"), status["VmRSS"].strip(),
                status["Threads"].strip(), cur >> 10, peak >> 10, " ".join(sys.argv[1:4])),
                snap.compare_to(first, "traceback")[:12],
                lambda stat: "%+d" % (stat.size_diff >> 10))

    def _bigtrace():
        """Where Python holds more than 8 MB at once (what made the peak)."""
        last = 0.0
        while True:
            time.sleep(0.02)
            held = tracemalloc.get_traced_memory()[0]
            if held > 8 << 20 and time.time() - last > 10:
                last = time.time()
                _write_sites("%s big: traced %d kB" % (time.strftime("%H:%M:%S"), held >> 10),
                             tracemalloc.take_snapshot().statistics("traceback")[:4],
                             lambda stat: "%d" % (stat.size >> 10))
    threading.Thread(target=_memtrace, name="memtrace", daemon=True).start()
    threading.Thread(target=_bigtrace, name="bigtrace", daemon=True).start()

if __name__ == "__main__":
    sys.exit(ff.main(sys.argv[1:]))
