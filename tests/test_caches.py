"""What a new process no longer repeats, and when it does again: each
cache is ignored or refreshed when its key changes (issue 16 item 3).

- the zfs usage text (the features), beside the state file, keyed by the
  stat of the zfs program, of the libraries it loads and of ld.so.cache,
  and by the environment that changes what it prints."""

import json
import os
import stat

import pytest

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
