"""Several services on one pair of hosts: a configuration each (its own
dataset, heartbeat port, state file, service and, for the ssh gate, its own
replication key whose forced command names that configuration), a daemon
each, side by side.  A failover of one leaves the other where it is."""

import os

import bed as bedmod
from helpers import Running, S, serving, wait_for

MARK = "sh -c '%s %s/running-{svc}-$FLOCKER_NODE'"


def second_key(bed, config):
    """A replication key of its own for the second service, accepted by
    both hosts only behind the gate of that service's configuration (as
    README's "Several services" says)."""
    key = os.path.join(bed.workdir, "ssh", "client-web")
    bedmod.sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "flocker-web", "-f", key])
    with open(key + ".pub") as f:
        pub = f.read().strip()
    options = bed.gate_options.replace("--config %s" % bed.config_path, "--config %s" % config)
    assert options != bed.gate_options
    with open(bed.authorized_keys, "a") as f:
        f.write("%s %s\n" % (options, pub))
    return key


def test_two_services_side_by_side_and_one_fails_over_alone(lanbed):
    bed = lanbed
    a, b = bed.a, bed.b
    w = bed.workdir
    web_conf = os.path.join(w, "web.conf")
    configs = {}
    for svc, conf, port, address in (("shop", bed.config_path, 7788, "192.0.2.150"),
                                     ("web", web_conf, 7790, "192.0.2.151")):
        cluster = {"name": svc, "heartbeat_port": str(port), "replication_interval": "0.5"}
        if svc == "web":
            cluster["ssh_identity"] = second_key(bed, web_conf)
        nodes = {h.name: {"dataset": "%s/%s" % (h.pool.name, svc),
                          "state_db": os.path.join(w, h.name, "%s.db" % svc)} for h in (a, b)}
        bed.write_config(path=conf, cluster=cluster, nodes=nodes, service={
            "start_command": MARK.format(svc=svc) % ("touch", w),
            "stop_command": MARK.format(svc=svc) % ("rm -f", w),
            "service_address": "%s/28 dev lan0" % address})
        configs[svc] = conf
        for h, role in ((a, "master"), (b, "slave")):
            r = h.flocker("init", "--role", role, config=conf)
            assert r.returncode == 0, r.stderr
    daemons = {}
    for svc, conf in configs.items():
        for h in (a, b):
            daemons[svc, h.name] = Running(h, config=conf, tag="-" + svc, state_db=os.path.join(
                w, h.name, "%s.db" % svc)).wait_ready()

    def running(svc, host):
        return os.path.exists(os.path.join(w, "running-%s-%s" % (svc, host.name)))
    try:
        for svc in configs:
            assert wait_for(lambda: serving(daemons[svc, "alpha"]), S(30), step=0.1), svc
            # each replicates its own dataset, through its own gate
            assert wait_for(lambda: bedmod.sh(
                ["zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-r",
                 "%s/%s" % (b.pool.name, svc)], check=False).stdout.strip(), S(30),
                step=0.2), svc
        # the shop's side of alpha dies (kill -9 of its daemon; its user
        # system and address go with it, as in a crash): beta takes the
        # shop over, the web stays on alpha
        daemons["shop", "alpha"].proc.kill()
        daemons["shop", "alpha"].proc.wait()
        os.unlink(os.path.join(w, "running-shop-alpha"))
        a.run(["ip", "addr", "del", "192.0.2.150/28", "dev", "lan0"])
        assert wait_for(lambda: serving(daemons["shop", "beta"]), S(30), step=0.1)
        assert running("shop", b) and running("web", a) and not running("web", b)
        st = daemons["web", "alpha"].status()
        assert st["role"] == "master" and st["serving"] and st["peer"]["dead_verdicts"] == 0
        assert daemons["web", "beta"].status()["role"] == "slave"
        # the addresses: the shop's on beta, the web's on alpha
        have = {h.name: h.run(["ip", "-o", "addr", "show", "dev", "lan0"]).stdout for h in (a, b)}
        assert "192.0.2.150/" in have["beta"] and "192.0.2.150/" not in have["alpha"]
        assert "192.0.2.151/" in have["alpha"] and "192.0.2.151/" not in have["beta"]
    finally:
        for d in daemons.values():
            d.stop()
