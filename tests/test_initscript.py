"""contrib/init.d/flocker-failover drives a real daemon in a namespace."""

import os
import sys

import bed as bedmod
from conftest import ff
from helpers import init

SCRIPT = os.path.join(bedmod.ROOT, "contrib", "init.d", "flocker-failover")


def test_start_status_reload_stop(bed):
    init(bed)
    a = bed.a
    defaults = os.path.join(bed.workdir, "default")
    pidfile = os.path.join(bed.workdir, "flocker.pid")
    with open(defaults, "w") as f:
        f.write('PYTHON=%s\nPROGRAM=%s\nCONFIG=%s\nEXTRA_ARGS="--node alpha"\n'
                'PIDFILE=%s\nLOGFILE=%s\n' % (sys.executable, bedmod.PROGRAM, bed.config_path,
                                              pidfile, os.path.join(bed.workdir, "init.log")))
    env = dict(os.environ, FLOCKER_DEFAULTS=defaults)

    def script(action):
        return bedmod.sh(a.argv(["sh", SCRIPT, action]), check=False, env=env, timeout=120)

    st = script("status")
    assert (st.returncode, st.stdout) == (3, "flocker-failover is not running\n")
    st = script("start")
    assert st.returncode == 0 and st.stdout.startswith("flocker-failover started (pid "), st
    pid = int(open(pidfile).read())
    assert ff.query_daemon(a.state_db, {"cmd": "ping"}, timeout=5)["ok"]
    assert script("start").stdout == "flocker-failover is already running (pid %d)\n" % pid
    assert script("status").returncode == 0
    assert script("reload").stdout == "flocker-failover reloading\n"
    st = script("stop")
    assert (st.returncode, st.stdout) == (0, "flocker-failover stopped\n")
    assert not bedmod._pid_alive(pid) and not os.path.exists(pidfile)
    assert script("status").returncode == 3
    # a broken configuration is refused before going to the background
    bed.write_config(cluster={"dead_time": "0.1"})
    st = script("start")
    assert st.returncode == 1 and "dead_time" in st.stderr and not os.path.exists(pidfile)
