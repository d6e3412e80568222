"""Logging (issue 7): stderr with levels by default; --syslog sends the log
to a syslog datagram socket (a stand-in for /dev/log, named with
--syslog-socket), and falls back to stderr with a warning without one."""

import os
import signal
import subprocess
import sys

import bed as bedmod
from conftest import ff
from helpers import init

DAEMON = 3 * 8          # syslog facility daemon
ERR, WARNING, INFO = 3, 4, 6


def test_daemon_and_errors_go_to_syslog_with_levels(bed):
    init(bed)
    sink = bedmod.SyslogSink(os.path.join(bed.workdir, "log.sock"))
    try:
        argv = [sys.executable, bedmod.PROGRAM, "--config", bed.config_path,
                "--node", "alpha", "--syslog", "--syslog-socket", sink.path, "daemon"]
        proc = bed.a.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True)
        try:
            prio, text = sink.wait_for("daemon of node alpha started", timeout=20)
            assert prio == DAEMON + INFO
            # tagged with program and pid; the level in the text; no time stamp
            # (syslog adds its own)
            assert text.startswith("flocker-failover[%d]: INFO: daemon of node alpha"
                                   % proc.pid), text
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        sink.wait_for("stopped by signal %d" % signal.SIGTERM)
        assert err == "" and out == ""            # nothing logged on stderr

        # a command's error: on stderr for the person, and in syslog
        p = bed.b.run([sys.executable, bedmod.PROGRAM, "--config", bed.config_path,
                       "--node", "beta", "--syslog", "--syslog-socket", sink.path, "sync"],
                      check=False)
        assert p.returncode == ff.EXIT_REPLICATION
        assert p.stderr.startswith("flocker-failover: error: this node (beta) is slave")
        prio, text = sink.wait_for("sync: this node (beta) is slave")
        assert prio == DAEMON + ERR and "ERROR: " in text
    finally:
        sink.close()


def test_without_a_syslog_socket_the_log_stays_on_stderr(bed):
    missing = os.path.join(bed.workdir, "no-such-log.sock")
    p = bed.a.run([sys.executable, bedmod.PROGRAM, "--config", bed.config_path,
                   "--node", "alpha", "--syslog", "--syslog-socket", missing,
                   "config-check"], check=False)
    assert p.returncode == 0, p.stderr
    assert ("flocker-failover: WARNING: --syslog: no syslog socket at %s" % missing
            in p.stderr), p.stderr
    assert "logging to stderr" in p.stderr
    # and without --syslog nothing is said about it
    p = bed.a.run([sys.executable, bedmod.PROGRAM, "--config", bed.config_path,
                   "--node", "alpha", "config-check"], check=False)
    assert p.returncode == 0 and "syslog" not in p.stderr


def test_help_names_the_logging_options():
    p = subprocess.run([sys.executable, bedmod.PROGRAM, "--help"], stdout=subprocess.PIPE,
                       universal_newlines=True)
    assert "--syslog " in p.stdout and "--syslog-socket PATH" in p.stdout
    assert "/dev/log" in p.stdout
