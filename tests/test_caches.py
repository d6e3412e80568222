"""What a new process no longer repeats, and when it does again: each
cache is ignored or refreshed when its key changes (issue 16 item 3).

- the zfs usage text (the features), beside the state file, keyed by the
  stat of the zfs program, of the libraries it loads and of ld.so.cache,
  and by the environment that changes what it prints;
- the program's code, run as a program: kept under the SHA-256 of the
  file and the interpreter, never read when others may write it."""

import json
import marshal
import os
import stat
import subprocess
import sys
import time

import pytest

import bed as bedmod
from conftest import ff

USAGE = """usage: zfs command args ...
\tsend [-DnPpRvLec] [-[i|I] snapshot] <snapshot>
\treceive [-vnsFu] <filesystem|volume|snapshot>
\tlist [-rH][-d max] [-o property[,...]] [-s property]...
"""
GET_USAGE = """\tPROPERTY       EDIT  INHERIT   VALUES
\tguid             NO       NO   <uint64>
\twritten          NO       NO   <size>
"""


@pytest.fixture
def fake_zfs(tmp_path, monkeypatch):
    """A zfs program of our own that logs each run; the usage cache in
    tmp_path; this process's memory of the text cleared (a new process)."""
    log = tmp_path / "ran"
    prog = tmp_path / "bin" / "zfs"
    prog.parent.mkdir()
    (tmp_path / "usage").write_text(USAGE)
    (tmp_path / "get-usage").write_text(GET_USAGE)
    prog.write_text("#!/bin/sh\necho \"run $*\" >> %s\n"
                    "if [ \"$1\" = get ]; then cat %s >&2; else cat %s >&2; fi\nexit 2\n"
                    % (log, tmp_path / "get-usage", tmp_path / "usage"))
    prog.chmod(0o755)
    monkeypatch.setattr(ff, "_ZFS_PROGRAMS", {"zfs": str(prog)})
    monkeypatch.setattr(ff, "_USAGE", {"file": None, "memo": None})
    lib = tmp_path / "libzfs.so.4"
    lib.write_text("a library")
    monkeypatch.setattr(ff, "loaded_libraries", lambda program: [str(lib)])
    ff.use_usage_cache(str(tmp_path / "state.db"))

    class Fake:
        path, library, cache = prog, lib, tmp_path / ff.USAGE_CACHE_NAME

        @staticmethod
        def runs():
            return log.read_text().splitlines() if log.exists() else []

        @staticmethod
        def new_process():
            ff._USAGE["memo"] = None

    return Fake


def test_the_usage_text_is_read_once_then_kept_beside_the_state_file(fake_zfs):
    text = ff.zfs_usage_text()
    assert "written" in text and "receive [-vnsFu]" in text
    assert fake_zfs.runs() == ["run ", "run get"]
    assert stat.S_IMODE(os.stat(fake_zfs.cache).st_mode) == 0o600
    assert ff.parse_zfs_features(text).written
    ff.Zfs().features()            # a new Zfs in this process (the daemon's cycle)
    fake_zfs.new_process()
    assert ff.zfs_usage_text() == text and ff.gate_features_text() == text.encode()
    assert ff.Zfs().features() == ff.parse_zfs_features(text)
    assert len(fake_zfs.runs()) == 2, "the kept text was not used"


def test_another_zfs_program_is_read_again_whatever_its_mtime(fake_zfs):
    ff.zfs_usage_text()
    st = os.stat(fake_zfs.path)
    # a copy with the same size and mtime: only the ctime (and inode) tell
    new = fake_zfs.path.read_text().replace("/usage >", "/usag2 >")
    assert len(new) == len(fake_zfs.path.read_text())
    tmp = str(fake_zfs.path) + ".new"
    with open(tmp, "w") as f:
        f.write(new)
    os.chmod(tmp, 0o755)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    (fake_zfs.path.parent.parent / "usag2").write_text(USAGE.replace("[-vnsFu]", "[-vnFu]"))
    os.replace(tmp, fake_zfs.path)
    fake_zfs.new_process()
    text = ff.zfs_usage_text()
    assert "receive [-vnFu]" in text and len(fake_zfs.runs()) == 4
    fake_zfs.new_process()
    assert ff.zfs_usage_text() == text and len(fake_zfs.runs()) == 4


def test_a_changed_library_or_ld_cache_reads_it_again(fake_zfs):
    ff.zfs_usage_text()
    fake_zfs.library.write_text("a library, upgraded")
    fake_zfs.new_process()
    ff.zfs_usage_text()
    assert len(fake_zfs.runs()) == 4
    entry = json.loads(fake_zfs.cache.read_text())[0]
    files = [s[0] for s in entry["key"]["stamps"]]
    assert files == [str(fake_zfs.path), str(fake_zfs.library), "/etc/ld.so.cache"]
    # in this very process too (a running daemon sees an upgrade)
    os.utime(fake_zfs.library, ns=(1, 1))
    ff.zfs_usage_text()
    assert len(fake_zfs.runs()) == 6


def test_the_environment_is_part_of_the_key(fake_zfs, monkeypatch):
    ff.zfs_usage_text()
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/other-zfs/lib")
    fake_zfs.new_process()
    ff.zfs_usage_text()
    assert len(fake_zfs.runs()) == 4
    assert len(json.loads(fake_zfs.cache.read_text())) == 2    # both kept
    monkeypatch.delenv("LD_LIBRARY_PATH")
    fake_zfs.new_process()
    ff.zfs_usage_text()
    assert len(fake_zfs.runs()) == 4


def test_a_cache_file_others_may_write_is_never_read(fake_zfs):
    ff.zfs_usage_text()
    entries = json.loads(fake_zfs.cache.read_text())
    entries[0]["text"] = entries[0]["text"].replace("written", "planted")
    fake_zfs.cache.write_text(json.dumps(entries))
    os.chmod(fake_zfs.cache, 0o666)
    fake_zfs.new_process()
    assert "planted" not in ff.zfs_usage_text() and len(fake_zfs.runs()) == 4
    fake_zfs.cache.write_text("not json")
    fake_zfs.new_process()
    ff.zfs_usage_text()
    assert len(fake_zfs.runs()) == 6


def test_a_text_read_while_zfs_changed_is_not_kept(fake_zfs):
    # the program replaces itself while it runs (an upgrade in the middle)
    prog = fake_zfs.path
    prog.write_text(prog.read_text().replace(
        "exit 2\n", "cp %s %s.x && mv %s.x %s\nexit 2\n" % (prog, prog, prog, prog)))
    ff.zfs_usage_text()
    assert not fake_zfs.cache.exists()
    ff.zfs_usage_text()              # nor remembered in this process
    assert len(fake_zfs.runs()) == 4


def test_the_loaded_libraries_of_the_real_zfs():
    try:
        program = ff.zfs_program()
    except ff.ZfsError:
        pytest.skip("not on this ZFS: no zfs program")
    libs = ff.loaded_libraries(program)
    assert all(os.path.isabs(f) and os.path.isfile(f) for f in libs)
    assert any("libc" in os.path.basename(f) for f in libs), libs


# ---------------------------------------------------------------------------
# run as a program: the code compiled once
# ---------------------------------------------------------------------------

@pytest.fixture
def program(tmp_path):
    """A copy of the program, executable, and a run of it as a program (by
    its path: sh reads its first lines) with its code cache in tmp_path."""
    path = tmp_path / "flocker_failover.py"
    path.write_bytes(open(bedmod.PROGRAM, "rb").read())
    path.chmod(0o755)
    cache = tmp_path / "cache"
    env = dict(os.environ, FLOCKER_CODE_CACHE=str(cache),
               PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin")

    class Program:
        def __init__(self):
            self.path, self.cache = path, cache

        def run(self, *args, **kw):
            return subprocess.run([str(path)] + list(args), env=dict(env, **kw),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  universal_newlines=True)

        def entries(self):
            return sorted(cache.glob("*.code")) if cache.is_dir() else []

        def plant(self, text):
            """Replace the kept code by code of our own (printing text)."""
            entry, = self.entries()
            entry.write_bytes(marshal.dumps(compile(
                "def main():\n    print(%r)\n    return 0\n" % text, "planted", "exec")))
            return entry

    return Program()


def test_run_as_a_program_it_runs_its_code_compiled_once(program):
    p = program.run("--version")
    assert p.returncode == 0 and p.stdout.strip() == "flocker-failover %s" % ff.VERSION
    entry, = program.entries()
    assert stat.S_IMODE(os.stat(program.cache).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(entry).st_mode) == 0o600
    program.plant("from the cache")
    assert program.run("--version").stdout == "from the cache\n"
    # the arguments and the program's path come through as for the script
    p = program.run("--config", "/nonexistent.conf", "status")
    assert p.returncode == ff.EXIT_OK or "from the cache" in p.stdout


def test_a_changed_file_is_compiled_again_whatever_its_size_and_mtime(program):
    program.run("--version")
    program.plant("stale")
    st = os.stat(program.path)
    text = program.path.read_text()
    other = ff.VERSION[:-1] + chr(ord(ff.VERSION[-1]) ^ 1)       # 0.1.0 -> 0.1.1
    changed = text.replace('VERSION = "%s"' % ff.VERSION, 'VERSION = "%s"' % other, 1)
    assert len(changed) == len(text) and changed != text
    program.path.write_text(changed)
    os.utime(program.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    p = program.run("--version")
    assert p.returncode == 0 and p.stdout == "flocker-failover %s\n" % other
    assert len(program.entries()) == 2


def test_kept_code_others_may_write_is_never_run(program):
    program.run("--version")
    program.plant("planted").chmod(0o666)
    assert program.run("--version").stdout.startswith("flocker-failover ")
    program.plant("planted")
    program.cache.chmod(0o777)
    assert program.run("--version").stdout.startswith("flocker-failover ")
    program.cache.chmod(0o700)
    assert program.run("--version").stdout == "planted\n"      # (the control)
    program.entries()[0].write_bytes(b"\xe3 not marshal data")
    assert program.run("--version").stdout.startswith("flocker-failover ")


def test_without_a_usable_cache_it_runs_compiled_as_the_script(program, tmp_path):
    for where in ("", "/proc/no-such-dir", str(tmp_path / "file")):
        (tmp_path / "file").write_text("not a directory")
        p = program.run("--version", FLOCKER_CODE_CACHE=where)
        assert p.returncode == 0 and p.stdout.startswith("flocker-failover "), p.stderr
    assert not program.entries()
    # the script itself keeps nothing anywhere
    p = subprocess.run([sys.executable, str(program.path), "--version"],
                       env=dict(os.environ, FLOCKER_CODE_CACHE=str(program.cache)),
                       stdout=subprocess.PIPE, universal_newlines=True)
    assert p.returncode == 0 and not program.entries()


def test_only_the_three_newest_are_kept(program):
    for i in range(5):
        program.path.write_text(program.path.read_text() + "\n# %d\n" % i)
        assert program.run("--version").returncode == 0
        time.sleep(0.01)
    assert len(program.entries()) == 3
