"""Fixtures for the real test bed (see bed.py) and the CI rule:
when CI is set, a skipped test is a failed test, except tests marked as
belonging to another ZFS implementation (reason "not on this ZFS: ...") or
checks that depend on an optional interpreter (reason "optional: ...").

contrib/test.sh runs the suite in parallel (pytest-xdist, --dist loadgroup):
each worker has its own test beds (bed.py names them after its pid), and
the longest tests start first (tests/data/durations.txt)."""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import bed as bedmod  # noqa: E402

ALLOWED_SKIPS = ("not on this ZFS:", "optional:")

# contrib/test.sh's bytecode cache: the test modules (their asserts
# rewritten by pytest) and the program compiled once for all the workers of
# a run, not by each (PYTHONDONTWRITEBYTECODE or not)
if os.environ.get("FLOCKER_TEST_PYCACHE"):
    sys.pycache_prefix = os.environ["FLOCKER_TEST_PYCACHE"]
    sys.dont_write_bytecode = False


def _load_program():
    spec = importlib.util.spec_from_file_location("flocker_failover", bedmod.PROGRAM)
    module = importlib.util.module_from_spec(spec)
    sys.modules["flocker_failover"] = module
    spec.loader.exec_module(module)
    return module


ff = _load_program()


@pytest.fixture
def ffmod():
    return ff


def need(condition, reason):
    """Skip with a reason when the machine lacks something; under CI, fail."""
    if not condition:
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not os.environ.get("CI") or not rep.skipped or hasattr(rep, "wasxfail"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if any(allowed in reason for allowed in ALLOWED_SKIPS):
        return
    rep.outcome = "failed"
    rep.longrepr = "CI is set, so this skip is a failure: %s" % reason


_stale_removed = []


@pytest.fixture
def zfs_ready():
    """Real ZFS for this test: on zfs-fuse a daemon of its own, new (see
    bed.py's ensure_zfs).  The first test of each worker of a parallel run
    also removes, under the machine's lock, the pools, namespaces and work
    directories that dead runs left."""
    try:
        bedmod.ensure_zfs(fresh=True)
        if not _stale_removed:
            with bedmod.machine_lock():
                bedmod.cleanup_stale()
            _stale_removed.append(True)
        kind = bedmod.zfs_kind()
    except bedmod.BedUnavailable as e:
        need(False, "real ZFS test bed unavailable: %s" % e)
    return kind


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


@pytest.fixture
def pool(zfs_ready):
    """A fresh pool on a sparse file, destroyed afterwards."""
    d = os.path.join(bedmod.WORK_BASE, bedmod.unique("pool"))
    os.makedirs(d)
    pools = []

    def make(tag="p", size_mb=128):
        p = bedmod.Pool(d, tag, size_mb=size_mb)
        pools.append(p)
        return p

    first = make()
    first.make = make
    try:
        yield first
    finally:
        for p in pools:
            p.destroy()
        bedmod._remove_workdir(d)


def beds(**kw):
    """A test bed built with kw (see bed.Bed), closed afterwards: the body
    of a bed fixture (a bed that cannot be built is a skip, and a failure
    when CI is set)."""
    try:
        b = bedmod.Bed(**kw)
    except bedmod.BedUnavailable as e:
        need(False, "two-host test bed unavailable: %s" % e)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def bed(zfs_ready):
    """Two hosts (alpha, beta) in namespaces with sshd, pools and a config."""
    yield from beds()


@pytest.fixture
def lanbed(zfs_ready):
    """Two hosts and the LAN (bed.Bed(lan=True)); the end of each daemon's
    log is printed afterwards."""
    try:
        b = bedmod.Bed(lan=True)
    except bedmod.BedUnavailable as e:
        need(False, "two-host test bed unavailable: %s" % e)
    try:
        yield b
    finally:
        # shown when the test failed: the newest logs first (CI keeps only
        # the beginning of a long output)
        logs = [os.path.join(b.workdir, n) for n in os.listdir(b.workdir)
                if n.startswith("daemon-")]
        for path in sorted(logs, key=os.path.getmtime, reverse=True):
            with open(path, errors="replace") as f:
                print("==== %s\n%s" % (os.path.basename(path), "".join(f.readlines()[-40:])))
        b.close()


def dataset_context(ds, zfs, recursive=False):
    """An action Context for one local dataset, with no configuration or
    state file behind it: the events it records are kept in .store.events."""
    class Cfg:
        class local:
            dataset = ds
    Cfg.recursive = recursive
    Cfg.send_flags = ()

    class Store:
        def __init__(self):
            self.events = []

        def record_event(self, kind, message, level="info"):
            self.events.append(message)

    return ff.Context(Cfg, Store(), zfs)


def pytest_configure(config):
    # pytest-xdist's marker, declared here too for runs without xdist
    config.addinivalue_line("markers", "xdist_group(name): run in one xdist worker, "
                                       "one after the other (--dist loadgroup)")
    config.addinivalue_line("markers", "pacemaker: runs under a real Pacemaker + Corosync "
                                       "or ocf-tester; apart from the suite, by "
                                       "contrib/ocf/test")


def pytest_unconfigure(config):
    """pytest-benchmark, where it is installed (not Debian's python3-pytest
    that contrib/test.sh runs), leaves an empty .benchmarks directory in
    the checkout: remove it when it is still empty."""
    try:
        os.rmdir(os.path.join(str(config.rootpath), ".benchmarks"))
    except OSError:
        pass


# ---------------------------------------------------------------------------
# Parallel runs (pytest-xdist)
# ---------------------------------------------------------------------------

# The tests that measure heartbeat timing or assert that no dead verdict
# came, and the forged-packet flood (20000 packets a second for 10 s), run
# one after the other in a parallel run (--dist loadgroup): never two of
# them at once, so none has to keep its margins against another of them.
HEARTBEAT_TIMING = pytest.mark.xdist_group("heartbeat-timing")

DURATIONS = os.path.join(os.path.dirname(__file__), "data", "durations.txt")


def short_id(nodeid):
    """A test's id without its directory (the same from any rootdir) and
    without the "@group" that xdist appends to a grouped test's id."""
    path, sep, name = nodeid.partition("::")
    if name.rfind("@") > name.rfind("]"):
        name = name[:name.rfind("@")]
    return os.path.basename(path) + sep + name


def measured_durations():
    """{short_id: seconds} of the longest tests, as measured (see the file)."""
    out = {}
    with open(DURATIONS) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                seconds, nodeid = line.strip().split(None, 1)
                out[nodeid] = float(seconds)
    return out


def pytest_collection_modifyitems(config, items):
    """In a parallel run (each worker collects; all must get the same
    order): the longest tests first, so the run does not end with one of
    them still running alone.  --dist loadgroup hands the tests out in
    this order, a test or two ahead, to each worker as it finishes one
    (plain --dist load would give each worker a block of consecutive tests
    first: the longest all to one)."""
    if not hasattr(config, "workerinput"):
        return
    seconds = measured_durations()
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (-seconds.get(short_id(item.nodeid), 0.0), order[id(item)]))
