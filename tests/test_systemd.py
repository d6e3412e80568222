"""systemd's Type=notify protocol, spoken to a real datagram socket that
stands in for systemd's, by a real daemon in a namespace."""

import os
import shutil
import socket
import subprocess
import time

import pytest

import bed as bedmod
from conftest import HEARTBEAT_TIMING, ff
from helpers import Running, S, init


def receive_all(sock, until, timeout):
    """Datagrams until one contains `until` (or the timeout); each a dict
    of its KEY=VALUE lines, with its arrival time."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except socket.timeout:
            break
        fields = dict(line.split("=", 1) for line in data.splitlines())
        got.append((time.monotonic(), fields))
        if until in fields:
            break
    return got


@HEARTBEAT_TIMING      # the gaps between watchdog pings are measured
def test_ready_status_watchdog_stopping(bed):
    dump = os.path.join(bed.workdir, "check-env")
    # written aside then renamed: the test never reads a half-written file
    bed.write_config(service={"check_command": "sh -c 'env > %s.new && mv %s.new %s'"
                                               % (dump, dump, dump),
                              "check_interval": "0.2"})
    init(bed)
    path = os.path.join(bed.workdir, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sysd:
        sysd.bind(path)
        d = Running(bed.a, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "600000"})
        first = receive_all(sysd, "READY", 15)
        assert first and first[-1][1]["READY"] == "1", first
        assert first[-1][1]["STATUS"] == "master, epoch 2; peer beta unknown"
        assert first[-1][1]["WATCHDOG"] == "1"
        # watchdog pings come from the loop, twice per WatchdogSec (0.6 s)
        pings = receive_all(sysd, "STOPPING", 1.6)
        times = [t for t, f in pings if f.get("WATCHDOG") == "1"]
        assert len(times) >= 5, pings
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert max(gaps) < 0.6 and min(gaps) > 0.15, gaps
        # the variables are not passed on to the commands the daemon starts
        deadline = time.monotonic() + S(10)
        while not os.path.exists(dump) and time.monotonic() < deadline:
            time.sleep(0.05)
        env = open(dump).read()
        assert "PATH=" in env and "NOTIFY_SOCKET" not in env and "WATCHDOG_" not in env
        d.proc.send_signal(15)
        last = receive_all(sysd, "STOPPING", 15)
        assert any(f.get("STOPPING") == "1" for _, f in last), last
        assert d.proc.wait(timeout=30) == 0


def test_notifier_abstract_socket_and_environment():
    name = "flocker-test-%d" % os.getpid()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sysd:
        sysd.bind("\0" + name)
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "10000000",
               "WATCHDOG_PID": str(os.getpid()), "OTHER": "x"}
        n = ff.SystemdNotifier(env)
        assert env == {"OTHER": "x"}   # taken out: children cannot speak for us
        assert n.watchdog == 5.0
        assert n.notify("READY=1", "STATUS=hello")
        assert sysd.recv(100) == b"READY=1\nSTATUS=hello"
        n.close()
    # another process's watchdog, no socket, or a socket that is gone
    assert ff.SystemdNotifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog is None
    assert ff.SystemdNotifier({}).notify("READY=1") is False
    gone = ff.SystemdNotifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert gone.notify("READY=1") is False and gone.notify("READY=1") is False   # warns once


def test_unit_file_verifies():
    unit = os.path.join(bedmod.ROOT, "contrib", "systemd", "flocker-failover.service")
    text = open(unit).read()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "WatchdogSec="):
        assert line in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("optional: systemd-analyze is not installed here")
    proc = subprocess.run(["systemd-analyze", "verify", unit], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    problems = [l for l in proc.stdout.splitlines()
                if "flocker-failover.service" in l and "not executable" not in l]
    assert not problems, proc.stdout
