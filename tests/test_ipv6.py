"""IPv6 everywhere it applies: heartbeats, replication over ssh (through
the gate) and the service address on IPv6 links (2001:db8::/32), in a
failover with two real daemons."""

import os

import pytest

import bed as bedmod
from conftest import beds, ff
from helpers import Running, S, replicated, serving, wait_for

ADDRESS = "2001:db8:0:ff::10"


@pytest.fixture
def bed6(zfs_ready):
    yield from beds(ipv6=True)


def test_a_failover_on_ipv6_links(bed6):
    bed = bed6
    a, b = bed.a, bed.b
    assert (a.address, b.address) == ("2001:db8::1", "2001:db8::2")
    w = bed.workdir
    bed.write_config(cluster={"replication_interval": "0.5"}, service={
        "start_command": "sh -c 'touch %s/running-$FLOCKER_NODE'" % w,
        "stop_command": "sh -c 'rm -f %s/running-$FLOCKER_NODE'" % w,
        "service_address": "%s/64 dev eth0" % ADDRESS})
    cfg = ff.load_config(bed.config_path, "alpha")
    assert cfg.peer.addresses == (b.address,) and cfg.peer.ssh == "root@" + b.address
    for h, role in ((a, "master"), (b, "slave")):
        r = h.flocker("init", "--role", role)
        assert r.returncode == 0, r.stderr
    with open(os.path.join(a.pool.mountpoint, "shop", "data.bin"), "wb") as f:
        f.write(os.urandom(300000))
    da, db = Running(a).wait_ready(), Running(b).wait_ready()
    try:
        # heartbeats on the IPv6 link, replication over ssh to an IPv6 address
        assert wait_for(lambda: serving(da) and replicated(da), S(60), step=0.1), da.log_text()
        link = da.status()["links"][0]
        assert (link["local"], link["peer"], link["state"]) == (a.address, b.address, "up")
        assert "%s/64" % ADDRESS in a.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
        a.kill_all()
        assert wait_for(lambda: serving(db), S(30), step=0.1), db.log_text()
        assert os.path.exists(os.path.join(w, "running-beta"))
        assert "%s/64" % ADDRESS in b.run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
        bedmod.sh(["zfs", "mount", b.dataset], check=False)
        assert bedmod.tree_digest(os.path.join(b.pool.mountpoint, "shop")).get("data.bin")
    finally:
        da.stop()
        db.stop()
