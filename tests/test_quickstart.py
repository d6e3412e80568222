"""README's "Quick start on two hosts", run as written.

The blocks of that section marked `<!-- quickstart: on HOST -->` are run
in order, each with bash on its host (alpha, beta, or both), from the
checkout's directory, with root's usual PATH.  `on beta, pasting what alpha
printed` gives the block alpha's last output as its input, as a person
pastes it.  The bed's hosts share this machine's file system, so each host
runs its blocks in a mount namespace of its own where the paths the quick
start writes to (/etc/flocker, /root/.ssh, /usr/local/sbin, /etc/init.d,
/var/lib/flocker, and /var/cache/flocker-failover, where the program run by
its path keeps its compiled code) are that host's own directories; its sshd (the machine's
sshd_config and host key) and its daemon run there too.  Substituted: the
datasets (the bed's pools for tank) and the user system's two commands;
the init script's pid and log files (through FLOCKER_DEFAULTS, as the two
hosts share /run and /var/log).  When README changes, this runs the new
text; when the text is wrong, this fails."""

import os
import re
import subprocess
import time

import pytest

import bed as bedmod

README = os.path.join(bedmod.ROOT, "README.md")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PRIVATE = ("/etc/flocker", "/root/.ssh", "/usr/local/sbin", "/etc/init.d", "/var/lib/flocker",
           "/var/cache/flocker-failover")   # (the code the program keeps, its gates under sshd)
MARK = re.compile(r"<!-- quickstart: on (alpha|beta|both)(?:, pasting what (alpha|beta) "
                  r"printed)? -->\n```sh\n(.*?)```", re.S)


def quickstart_blocks():
    """[(host, pasted-from host or None, script)] of README's quick start."""
    with open(README) as f:
        text = f.read()
    start = text.index("## Quick start on two hosts")
    section = text[start:text.index("\n## ", start + 1)]
    blocks = [m.groups() for m in MARK.finditer(section)]
    assert section.count("<!-- quickstart:") == len(blocks), \
        "a quickstart mark that this test cannot read"
    return blocks


@pytest.fixture
def hosts(bed):
    """Each host's private directories, and its sshd started as the machine's."""
    made = [d for d in PRIVATE if not os.path.isdir(d)]
    for d in made:
        os.makedirs(d, mode=0o700)
    bashrc = os.path.join(bed.workdir, "bashrc")
    open(bashrc, "w").close()
    for h in bed.hosts:
        h.kill_sshd()
        h.root = os.path.join(bed.workdir, "qs-" + h.name)
        binds = []
        for d in PRIVATE:
            own = os.path.join(h.root, d.strip("/").replace("/", "-"))
            os.makedirs(own, mode=0o700)
            binds.append("mount --bind %s %s" % (own, d))
        if os.path.exists("/root/.bashrc"):   # pyenv init would slow every ssh command
            binds.append("mount --bind %s /root/.bashrc" % bashrc)
        h.enter = os.path.join(h.root, "enter.sh")
        with open(h.enter, "w") as f:
            f.write("#!/bin/sh\nset -e\n%s\nexec \"$@\"\n" % "\n".join(binds))
        os.chmod(h.enter, 0o755)
        h.defaults = os.path.join(h.root, "default")
        with open(h.defaults, "w") as f:
            f.write("PIDFILE=%s/daemon.pid\nLOGFILE=%s/daemon.log\n" % (h.root, h.root))
        log = open(os.path.join(h.root, "sshd.log"), "ab")
        h.sshd = h.popen(private(h, ["/usr/sbin/sshd", "-D", "-e", "-o",
                                     "ListenAddress=" + h.address, "-o", "PidFile=none",
                                     "-o", "UsePAM=no", "-o", "LogLevel=ERROR"]),
                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
    yield bed
    for h in bed.hosts:
        bedmod._kill_namespace(h.ns)
    for d in made:
        try:
            os.rmdir(d)
        except OSError:
            pass


def private(host, argv):
    """argv in a new mount namespace with host's own directories."""
    return ["unshare", "--mount", "--propagation", "slave", host.enter] + list(argv)


def run_block(host, script, stdin=""):
    env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8",
           "FLOCKER_DEFAULTS": host.defaults}
    proc = host.run(private(host, ["bash", "-e", "-c", script]), check=False, timeout=120,
                    input=stdin, env=env, cwd=bedmod.ROOT)
    assert proc.returncode == 0, "on %s:\n%s\nexit %d\n%s%s" % (
        host.name, script, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def flocker(host, *args):
    return run_block(host, "flocker_failover.py " + " ".join(args))


def wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError("%s: not within %g s" % (what, timeout))


def test_the_quick_start_as_written(hosts):
    bed = hosts
    a, b = bed.a, bed.b
    assert (a.address, b.address) == ("192.0.2.1", "192.0.2.2"), "the quick start's addresses"
    marks = os.path.join(bed.workdir, "marks")
    os.makedirs(marks)
    service = {
        "start_command = systemctl start shop":
            "start_command = sh -c 'touch %s/running-$FLOCKER_NODE'" % marks,
        "stop_command = systemctl stop shop":
            "stop_command = sh -c 'rm -f %s/running-$FLOCKER_NODE'" % marks,
    }
    printed = {}
    for where, pasted_from, script in quickstart_blocks():
        if "[node alpha]" in script:       # the configuration: the bed's pools, our service
            for old, new in service.items():
                assert old in script, old
                script = script.replace(old, new)
            head, tail = script.split("[node beta]")
            assert head.count("dataset = tank/shop") == 1 and tail.count(
                "dataset = tank/shop") == 1, script
            script = (head.replace("dataset = tank/shop", "dataset = " + a.dataset)
                      + "[node beta]" + tail.replace("dataset = tank/shop",
                                                     "dataset = " + b.dataset))
        stdin = printed[pasted_from] if pasted_from else ""
        for h in ((a, b) if where == "both" else (a if where == "alpha" else b,)):
            printed[h.name] = run_block(h, script, stdin)

    # what the quick start says the first minute looks like
    def running(h):
        return os.path.exists(os.path.join(marks, "running-" + h.name))
    wait(lambda: running(a), 60, "alpha serving")
    wait(lambda: "replica     holds flocker-" in flocker(b, "status"), 60,
         "beta holding a replica")
    text = flocker(a, "status")
    assert "role        master" in text and "service     RUNNING here" in text, text
    assert re.search(r"peer        beta: last seen .*role slave", text), text
    text = flocker(b, "status")
    assert "role        slave" in text and "service     not running here" in text, text
    assert not running(b)
    addr = "192.0.2.10/24"
    assert addr in a.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout

    # one failover: every process of alpha killed (daemon, sshd, gate)
    bedmod._kill_namespace(a.ns)
    wait(lambda: running(b), 30, "beta serving after alpha died")
    # start_command runs while the promotion's last steps (the service
    # address, its announcement) are under way: the daemon says it serves
    # once the promotion has ended
    wait(lambda: "service     RUNNING here" in flocker(b, "status"), 30,
         "beta's status saying it serves")
    text = flocker(b, "status")
    assert "role        master" in text and "service     RUNNING here" in text, text
    assert addr in b.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
