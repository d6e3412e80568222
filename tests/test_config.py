"""Configuration: every broken file is refused with its own message,
naming file, section and option, what was expected and what was found."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ff
import bed as bedmod

GOOD = """\
[cluster]
name = shop
secret_file = {secret}
state_db = {dir}/state.db

[service]
start_command = systemctl start shop
stop_command = systemctl stop shop

[node alpha]
address = 192.0.2.1
dataset = tank/shop

[node beta]
address = 192.0.2.2
dataset = backup/replicas/shop
"""


@pytest.fixture
def env(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex() + "\n")
    secret.chmod(0o600)

    class Env:
        dir = str(tmp_path)
        secret_path = str(secret)
        path = str(tmp_path / "flocker.conf")

        def text(self, replace=None, append=""):
            t = GOOD.format(secret=self.secret_path, dir=self.dir)
            for old, new in (replace or {}).items():
                assert old in t, old
                t = t.replace(old, new)
            return t + append

        def parse(self, **kw):
            return ff.parse_config(self.text(**kw), self.path)

        def error(self, **kw):
            with pytest.raises(ff.ConfigError) as e:
                self.parse(**kw)
            assert e.value.exit_code == ff.EXIT_CONFIG
            return e.value.message
    return Env()


def test_good_config_parses_with_documented_defaults(env):
    cfg = env.parse()
    assert cfg.name == "shop"
    assert cfg.heartbeat_port == 7788
    assert cfg.heartbeat_interval == 1.0 and cfg.dead_time == 5.0
    assert cfg.wait_for_peer is True and cfg.snapshot_keep == 10
    assert cfg.service.start_command == ("systemctl", "start", "shop")
    assert cfg.service.check_command is None and cfg.service.service_address is None
    alpha, beta = cfg.nodes
    assert alpha.ssh == "root@192.0.2.1" and alpha.ssh_port == 22
    assert beta.dataset == "backup/replicas/shop"   # names may differ per node
    assert alpha.state_db == beta.state_db == env.dir + "/state.db"
    assert len(cfg.secret) == 64 and cfg.secret.decode() not in repr(cfg)


def test_service_section_is_optional_and_node_options_override(env):
    cfg = env.parse(replace={
        "[service]\nstart_command = systemctl start shop\nstop_command = systemctl stop shop\n": "",
        "dataset = tank/shop\n": "dataset = tank/shop\nssh = admin@alpha.example.net\n"
                                 "ssh_port = 2222\nstate_db = /srv/flocker/a.db\n",
    })
    a = cfg.node("alpha")
    assert (a.ssh, a.ssh_port, a.state_db) == ("admin@alpha.example.net", 2222, "/srv/flocker/a.db")
    assert cfg.service.start_command is None


def test_two_links_per_node(env):
    cfg = env.parse(replace={"address = 192.0.2.1": "address = 192.0.2.1, 198.51.100.1",
                             "address = 192.0.2.2": "address = 192.0.2.2,198.51.100.2"})
    assert cfg.node("beta").addresses == ("192.0.2.2", "198.51.100.2")


P = "{path}"   # placeholder for the config path in expected messages

BROKEN = [
    # (id, how to break the good file, the full expected message)
    ("missing cluster section",
     dict(replace={"[cluster]\nname = shop\n": "[clusterx]\nname = shop\n"}),
     "{path}: [clusterx]: unknown section; expected [cluster], [service] or [node NAME]"),
    ("no cluster section at all",
     dict(replace={"[cluster]\nname = shop\nsecret_file = {secret}\nstate_db = {dir}/state.db\n\n": ""}),
     "{path}: [cluster]: missing section; it must at least set name"),
    ("third node",
     dict(append="\n[node gamma]\naddress = 192.0.2.3\ndataset = tank/shop\n"),
     "{path}: expected exactly two [node NAME] sections, found 3 ([node alpha], [node beta], "
     "[node gamma]); flocker-failover runs on exactly two hosts"),
    ("only one node",
     dict(replace={"[node beta]\naddress = 192.0.2.2\ndataset = backup/replicas/shop\n": ""}),
     "{path}: expected exactly two [node NAME] sections, found 1 ([node alpha]); "
     "flocker-failover runs on exactly two hosts"),
    ("duplicate address across nodes",
     dict(replace={"address = 192.0.2.2": "address = 192.0.2.1"}),
     "{path}: [node alpha] address and [node beta] address: both nodes use 192.0.2.1; "
     "each node needs its own addresses"),
    ("duplicate address within a node",
     dict(replace={"address = 192.0.2.1": "address = 192.0.2.1, 192.0.2.1"}),
     "{path}: [node alpha] address: lists the same address twice: 192.0.2.1, 192.0.2.1"),
    ("host name instead of address",
     dict(replace={"address = 192.0.2.1": "address = alpha.example.net"}),
     "{path}: [node alpha] address: expected one or more IP addresses separated by commas "
     "(e.g. 192.0.2.1, 198.51.100.1); host names are not accepted, found 'alpha.example.net'"),
    ("unspecified address",
     dict(replace={"address = 192.0.2.1": "address = 0.0.0.0"}),
     "{path}: [node alpha] address: expected unicast IP addresses (not 0.0.0.0), found '0.0.0.0'"),
    ("links do not pair up",
     dict(replace={"address = 192.0.2.1": "address = 192.0.2.1, 198.51.100.1"}),
     "{path}: [node alpha] address: expected one address per link on each node "
     "(node beta has 1), found 2"),
    ("mixed IP versions on a link",
     dict(replace={"address = 192.0.2.1": "address = 2001:db8::1"}),
     "{path}: [node alpha] address: link 1 joins 2001:db8::1 and 192.0.2.2, which are not "
     "of the same IP version"),
    ("bad port",
     dict(append="", replace={"name = shop": "name = shop\nheartbeat_port = 70000"}),
     "{path}: [cluster] heartbeat_port: expected a UDP port number from 1 to 65535, found '70000'"),
    ("port not a number",
     dict(replace={"name = shop": "name = shop\nheartbeat_port = http"}),
     "{path}: [cluster] heartbeat_port: expected a UDP port number from 1 to 65535, found 'http'"),
    ("zero interval",
     dict(replace={"name = shop": "name = shop\nheartbeat_interval = 0"}),
     "{path}: [cluster] heartbeat_interval: expected a number of seconds greater than 0 "
     "(e.g. 1.5), found '0'"),
    ("negative dead time",
     dict(replace={"name = shop": "name = shop\ndead_time = -5"}),
     "{path}: [cluster] dead_time: expected a number of seconds greater than 0 (e.g. 1.5), "
     "found '-5'"),
    ("nan timing",
     dict(replace={"name = shop": "name = shop\nstartup_wait = nan"}),
     "{path}: [cluster] startup_wait: expected a number of seconds greater than 0 (e.g. 1.5), "
     "found 'nan'"),
    ("dead time not larger than the interval",
     dict(replace={"name = shop": "name = shop\nheartbeat_interval = 2\ndead_time = 2"}),
     "{path}: [cluster] dead_time: expected at least twice heartbeat_interval (2 s), so that "
     "one lost heartbeat cannot cause a failover, found 2"),
    ("bad dataset name",
     dict(replace={"dataset = tank/shop": "dataset = tank/my shop"}),
     "{path}: [node alpha] dataset: expected a ZFS dataset below a pool, such as tank/shop "
     "(letters, digits, '_', '-', '.', ':' separated by '/'), found 'tank/my shop'"),
    ("pool root as dataset",
     dict(replace={"dataset = tank/shop": "dataset = tank"}),
     "{path}: [node alpha] dataset: expected a ZFS dataset below a pool, such as tank/shop "
     "(letters, digits, '_', '-', '.', ':' separated by '/'), found 'tank'"),
    ("snapshot as dataset",
     dict(replace={"dataset = tank/shop": "dataset = tank/shop@now"}),
     "{path}: [node alpha] dataset: expected a ZFS dataset below a pool, such as tank/shop "
     "(letters, digits, '_', '-', '.', ':' separated by '/'), found 'tank/shop@now'"),
    ("missing dataset",
     dict(replace={"dataset = tank/shop\n": ""}),
     "{path}: [node alpha] dataset: missing; expected a ZFS dataset below a pool, such as "
     "tank/shop (letters, digits, '_', '-', '.', ':' separated by '/')"),
    ("missing cluster name",
     dict(replace={"name = shop\n": ""}),
     "{path}: [cluster] name: missing; expected a name of 1 to 32 letters, digits, '_', '.' "
     "or '-', starting with a letter or digit"),
    ("unknown option (typo)",
     dict(replace={"name = shop": "name = shop\ndead_tme = 3"}),
     "{path}: [cluster] dead_tme: unknown option; the options of this section are: "
     "arbitrator, arbitrator_command, arbitrator_timeout, dead_time, divergence_policy, "
     "event_log_keep_days, event_log_keep_rows, heartbeat_interval, heartbeat_port, "
     "metrics_file, name, realtime_priority, recursive, "
     "replication_bandwidth, replication_interval, "
     "secret_file, secret_file_previous, send_flags, snapshot_keep, ssh_alive_interval, "
     "ssh_connect_timeout, ssh_control_persist, ssh_identity, ssh_known_hosts, "
     "startup_wait, state_db, transfer_stall_timeout, wait_for_peer, witness, witness_lease, "
     "witness_timeout"),
    ("event log bound too small",
     dict(replace={"name = shop": "name = shop\nevent_log_keep_rows = 10"}),
     "{path}: [cluster] event_log_keep_rows: expected a whole number of at least 100, "
     "found '10'"),
    ("event log age negative",
     dict(replace={"name = shop": "name = shop\nevent_log_keep_days = -1"}),
     "{path}: [cluster] event_log_keep_days: expected a number of days, 0 or more (0: no "
     "age limit), found '-1'"),
    ("divergence policy unknown",
     dict(replace={"name = shop": "name = shop\ndivergence_policy = biggest"}),
     "{path}: [cluster] divergence_policy: expected one of most-changes, newest-master, "
     "oldest-master, zero-changes-only, manual or prefer-node:NAME, found 'biggest'"),
    ("divergence policy prefers a stranger",
     dict(replace={"name = shop": "name = shop\ndivergence_policy = prefer-node:gamma"}),
     "{path}: [cluster] divergence_policy: expected prefer-node:alpha or prefer-node:beta "
     "(a node of this cluster), found 'prefer-node:gamma'"),
    ("arbitrator not an address",
     dict(replace={"name = shop": "name = shop\narbitrator = gateway:22"}),
     "{path}: [cluster] arbitrator: expected HOST:PORT (IPv6: [ADDRESS]:PORT), e.g. "
     "192.0.2.254:22 (an IP address, not a name: no DNS lookup may stand between a node "
     "and its decision), found 'gateway:22'"),
    ("arbitrator and arbitrator_command",
     dict(replace={"name = shop": "name = shop\narbitrator = 192.0.2.9:22\n"
                                  "arbitrator_command = true"}),
     "{path}: [cluster] arbitrator_command: set together with arbitrator; expected one of "
     "the two (an address to reach, or a command)"),
    ("unknown section",
     dict(append="\n[services]\nstart_command = true\n"),
     "{path}: [services]: unknown section; expected [cluster], [service] or [node NAME]"),
    ("DEFAULT section is not silently applied",
     dict(append="\n[DEFAULT]\ndead_time = 3\n"),
     "{path}: [DEFAULT]: unknown section; expected [cluster], [service] or [node NAME]"),
    ("bad node name",
     dict(replace={"[node beta]": "[node be/ta]"}),
     "{path}: [node be/ta]: node name: expected a name of 1 to 32 letters, digits, '_', '.' "
     "or '-', starting with a letter or digit, found 'be/ta'"),
    ("duplicate option",
     dict(replace={"name = shop": "name = shop\nname = shop2"}),
     "{path}: line 3: [cluster] name appears twice in the section"),
    ("duplicate section",
     dict(append="\n[node beta]\naddress = 192.0.2.9\ndataset = tank/x\n"),
     "{path}: line 18: section [node beta] appears twice"),
    ("text before the first section",
     dict(replace={"[cluster]\n": "dead_time = 4\n[cluster]\n"}),
     "{path}: line 1: text before the first [section] header: 'dead_time = 4'"),
    ("start without stop",
     dict(replace={"stop_command = systemctl stop shop\n": ""}),
     "{path}: [service] stop_command: missing; expected a command because start_command is "
     "set (a master must be able to stop what it started)"),
    ("unbalanced quote in a command",
     dict(replace={"start_command = systemctl start shop": "start_command = sh -c 'start"}),
     "{path}: [service] start_command: expected a command line in shell quoting "
     "(No closing quotation), found \"sh -c 'start\""),
    ("bad service address",
     dict(append="service_address = 192.0.2.100\n",
          replace={"stop_command = systemctl stop shop\n":
                   "stop_command = systemctl stop shop\n"}),
     None),  # filled below: appended to the last section, so checked separately
    ("bad boolean",
     dict(replace={"name = shop": "name = shop\nwait_for_peer = maybe"}),
     "{path}: [cluster] wait_for_peer: expected yes or no, found 'maybe'"),
    ("relative state path",
     dict(replace={"state_db = {dir}/state.db": "state_db = state.db"}),
     "{path}: [cluster] state_db: expected an absolute path (starting with /), found 'state.db'"),
    ("zero snapshots kept",
     dict(replace={"name = shop": "name = shop\nsnapshot_keep = 0"}),
     "{path}: [cluster] snapshot_keep: expected a whole number of at least 1, found '0'"),
    ("ssh target with option injection",
     dict(replace={"dataset = tank/shop": "dataset = tank/shop\nssh = -oProxyCommand=x"}),
     "{path}: [node alpha] ssh: expected an ssh destination such as root@192.0.2.2 or "
     "backup.example.net, found '-oProxyCommand=x'"),
]


@pytest.mark.parametrize("how,expected", [(b[1], b[2]) for b in BROKEN if b[2]],
                         ids=[b[0] for b in BROKEN if b[2]])
def test_broken_config_rejected_with_its_own_message(env, how, expected):
    how = {k: ({kk.format(secret=env.secret_path, dir=env.dir):
                vv.format(secret=env.secret_path, dir=env.dir) for kk, vv in v.items()}
               if isinstance(v, dict) else v) for k, v in how.items()}
    assert env.error(**how) == expected.format(path=env.path)


def test_broken_messages_are_all_different():
    messages = [b[2] for b in BROKEN if b[2]]
    assert len(messages) >= 20 and len(set(messages)) == len(messages)


def test_bad_service_address(env):
    text = env.text(replace={"stop_command = systemctl stop shop":
                             "stop_command = systemctl stop shop\n"
                             "service_address = 192.0.2.100 eth0"})
    with pytest.raises(ff.ConfigError) as e:
        ff.parse_config(text, env.path)
    assert e.value.message == (
        "%s: [service] service_address: expected ADDRESS/PREFIX dev INTERFACE, e.g. "
        "192.0.2.100/24 dev eth0, found '192.0.2.100 eth0'" % env.path)
    ok = ff.parse_config(text.replace("192.0.2.100 eth0", "192.0.2.100/24 dev eth0"), env.path)
    assert str(ok.service.service_address) == "192.0.2.100/24 dev eth0"


# -- the secret file ------------------------------------------------------

def test_secret_missing(env):
    os.unlink(env.secret_path)
    assert env.error() == (
        "%s: [cluster] secret_file: cannot read the secret file %s: No such file or "
        "directory; create it on one node with 'flocker_failover.py genkey --output %s' "
        "and copy it to the other" % (env.path, env.secret_path, env.secret_path))


def test_secret_world_readable_says_the_chmod(env):
    os.chmod(env.secret_path, 0o644)
    assert env.error() == (
        "%s: [cluster] secret_file: the secret file %s is readable by group or others "
        "(mode 0644); run: chmod 600 %s" % (env.path, env.secret_path, env.secret_path))


def test_secret_group_readable(env):
    os.chmod(env.secret_path, 0o640)
    assert "(mode 0640); run: chmod 600" in env.error()


def test_secret_too_short(env):
    with open(env.secret_path, "w") as f:
        f.write("0123456789abcdefghij\n")
    assert env.error() == (
        "%s: [cluster] secret_file: the secret file %s holds 20 bytes; at least 32 random "
        "bytes are needed; make one with 'flocker_failover.py genkey --output FILE'"
        % (env.path, env.secret_path))


def test_secret_not_random(env):
    with open(env.secret_path, "w") as f:
        f.write("password" * 8)
    assert env.error() == (
        "%s: [cluster] secret_file: the secret in %s does not look random (only 7 different "
        "byte values); make one with 'flocker_failover.py genkey --output FILE'"
        % (env.path, env.secret_path))


def test_secret_other_owner(env):
    os.chown(env.secret_path, 12345, -1)
    assert env.error() == (
        "%s: [cluster] secret_file: the secret file %s belongs to uid 12345, not to the "
        "user running flocker-failover (uid 0); run: chown 0 %s"
        % (env.path, env.secret_path, env.secret_path))


def test_missing_config_file(tmp_path):
    with pytest.raises(ff.ConfigError) as e:
        ff.load_config(str(tmp_path / "nope.conf"))
    assert e.value.message == (
        "cannot read the configuration file %s: No such file or directory; copy "
        "flocker.conf.example there and edit it, or pass --config PATH" % (tmp_path / "nope.conf"))


# -- which node am I -------------------------------------------------------

def test_identify_by_address_hostname_and_override(env):
    cfg = env.parse()
    assert ff.identify_node(cfg, is_local=lambda a: a == "192.0.2.2") == "beta"
    assert ff.identify_node(cfg, is_local=lambda a: False, hostname="alpha.example.net") == "alpha"
    assert ff.identify_node(cfg, "beta", is_local=lambda a: a == "192.0.2.1") == "beta"
    with pytest.raises(ff.ConfigError) as e:
        ff.identify_node(cfg, "gamma")
    assert e.value.message == "--node gamma: expected one of the nodes in %s: alpha, beta" % env.path
    with pytest.raises(ff.ConfigError) as e:
        ff.identify_node(cfg, is_local=lambda a: False, hostname="web3")
    assert e.value.message == (
        "%s: this host has none of the heartbeat addresses of nodes alpha (192.0.2.1) or beta "
        "(192.0.2.2), and its host name 'web3' is not a node name; run with --node NAME" % env.path)
    with pytest.raises(ff.ConfigError) as e:
        ff.identify_node(cfg, is_local=lambda a: True)
    assert "owns heartbeat addresses of both nodes (alpha, beta)" in e.value.message


def test_identify_for_real_inside_namespaces(bed):
    """Each host of the bed finds itself from its own addresses."""
    for h in bed.hosts:
        proc = h.run([sys.executable, bedmod.PROGRAM, "--config", bed.config_path,
                      "config-check"], check=False)
        assert proc.returncode == 0, proc.stderr
        assert "# this host is node %s" % h.name in proc.stdout


# -- config-check and the example file ----------------------------------------

def run(*args):
    return subprocess.run([sys.executable, bedmod.PROGRAM] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)


def test_config_check_masks_secret_and_fails_before_touching_anything(env):
    with open(env.path, "w") as f:
        f.write(env.text())
    proc = run("--config", env.path, "--node", "alpha", "config-check")
    assert proc.returncode == 0, proc.stderr
    secret = open(env.secret_path).read().strip()
    assert secret not in proc.stdout and secret[:16] not in proc.stdout
    assert "key id %s" % ff.key_id(secret.encode()) in proc.stdout
    assert "[node alpha]  # this host" in proc.stdout
    # the printed effective configuration is itself a valid configuration
    with open(env.path, "w") as f:
        f.write(proc.stdout)
    assert run("--config", env.path, "--node", "alpha", "config-check").returncode == 0

    with open(env.path, "w") as f:
        f.write(env.text(replace={"name = shop": "name = shop\ndead_time = 0.1"}))
    proc = run("--config", env.path, "--node", "alpha", "init", "--role", "master")
    assert proc.returncode == ff.EXIT_CONFIG
    assert proc.stderr.startswith("flocker-failover: error: %s: [cluster] dead_time:" % env.path)
    assert not os.path.exists(os.path.join(env.dir, "state.db"))


def _example():
    with open(os.path.join(bedmod.ROOT, "flocker.conf.example")) as f:
        return f.read()


def test_example_documents_every_option_with_default_and_unit():
    text = _example()
    tables = (("cluster", ff.CLUSTER_OPTIONS), ("service", ff.SERVICE_OPTIONS),
              ("node alpha", ff.NODE_OPTIONS))
    for section, options in tables:
        assert "[%s]" % section in text
        for o in options:
            m = re.search(r"^#? ?%s = .*$" % re.escape(o.name), text, re.M)
            assert m, "option %s is not in flocker.conf.example" % o.name
            block = text[:m.start()].rsplit("\n\n", 1)[-1]
            assert "Default:" in block and ("Unit:" in block or "unit" in block.lower()), o.name
            if o.default:
                assert o.default in block, (o.name, o.default)


def test_example_is_a_valid_config(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    text = _example().replace("# secret_file = /etc/flocker/secret",
                              "secret_file = %s" % secret)
    cfg = ff.parse_config(text, "flocker.conf.example")
    assert len(cfg.nodes) == 2


def test_ssh_failures_are_explained_with_what_to_do(env):
    """Each kind of ssh failure (exit 255) gets a message naming the peer
    and what to do, also when ssh said nothing at all."""
    cfg = env.parse()
    ssh = ff.Ssh(cfg, cfg.nodes[1], env.dir)
    where = "node beta (root@192.0.2.2 port 22)"
    said = ssh.explain("ssh: connect to host 192.0.2.2 port 22: Connection refused\n")
    assert said.startswith("cannot reach %s over ssh (ssh: ssh: connect to host " % where)
    assert "check the link between the nodes and that sshd runs there" in said
    assert "refused our key" in ssh.explain("root@192.0.2.2: Permission denied (publickey).")
    assert "do not proceed" in ssh.explain("Host key verification failed.")
    assert ssh.explain("") == ssh.explain("\n") == (
        "the ssh connection to %s ended without a word from ssh (the peer's sshd, or "
        "the peer itself, may have stopped); it is tried again" % where)
    assert ssh.explain("kex_exchange_identification: odd") == (
        "ssh to %s failed (ssh: kex_exchange_identification: odd)" % where)


@pytest.mark.parametrize("interval,dead,want", [
    # heartbeat_interval, dead_time -> arbitrator_timeout, witness_lease, witness_timeout
    ("1.0", "5.0", (1.0, 10.0, 0.5)),       # the defaults
    ("0.2", "1.0", (0.4, 10.0, 0.2)),       # the demo's timings
    ("0.01", "0.03", (0.02, 10.0, 0.01)),
    ("3.0", "20.0", (1.0, 20.0, 0.5)),      # a slow link: the lease outlasts dead_time
])
def test_timeouts_left_unset_follow_the_heartbeat_timings(env, interval, dead, want):
    """A user who changes heartbeat_interval (the demo's 0.2 s) or dead_time
    need not learn the rules of the timeouts that depend on them: left
    unset, arbitrator_timeout, witness_lease and witness_timeout are derived
    from them, and the configuration is valid as it stands."""
    cfg = env.parse(append="", replace={
        "state_db = ": "heartbeat_interval = %s\ndead_time = %s\narbitrator = 192.0.2.254:22\n"
                       "witness = 192.0.2.253:7789\nstate_db = " % (interval, dead)})
    assert (cfg.arbitrator_timeout, cfg.witness_lease, cfg.witness_timeout) == want
    described = ff.describe_config(cfg)
    assert "arbitrator_timeout = %g" % want[0] in described
    # a value set by hand is still held to the rule, with its reason
    if float(interval) < 0.5:
        msg = env.error(replace={"state_db = ": "heartbeat_interval = %s\ndead_time = %s\n"
                                 "arbitrator = 192.0.2.254:22\narbitrator_timeout = 1.0\n"
                                 "state_db = " % (interval, dead)})
        assert "arbitrator_timeout: expected at most twice heartbeat_interval" in msg
