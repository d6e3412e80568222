"""Rules of the house a machine can check: Python 3.8, standard library only."""

import ast
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

import bed as bedmod

SRC = open(bedmod.PROGRAM, encoding="utf-8").read()


def test_parses_as_python_3_8():
    ast.parse(SRC, feature_version=(3, 8))


def test_imports_only_the_standard_library():
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is None:   # Python < 3.10 running the suite
        pytest.skip("optional: sys.stdlib_module_names needs Python 3.10")
    for node in ast.walk(ast.parse(SRC)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        for n in names:
            assert n.split(".")[0] in stdlib, "line %d imports %s" % (node.lineno, n)


@pytest.mark.parametrize("api", [".removeprefix(", ".removesuffix(", "functools.cache(",
                                 "zoneinfo", "math.lcm(", "str | None", "int | None"])
def test_no_python_3_9_only_api(api):
    assert api not in SRC


def _python38():
    found = sorted(glob.glob("/root/.pyenv/versions/3.8*/bin/python3")) + \
        [p for p in ("/usr/bin/python3.8",) if os.path.exists(p)]
    return found[0] if found else None


def test_runs_under_python_3_8_when_installed():
    py = _python38()
    if py is None:
        pytest.skip("optional: no Python 3.8 interpreter on this machine")
    proc = subprocess.run([py, bedmod.PROGRAM, "--version"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([py, bedmod.PROGRAM, "genkey"], stdout=subprocess.PIPE,
                          universal_newlines=True)
    assert proc.returncode == 0 and len(proc.stdout.strip()) == 64


def test_ci_turns_a_skip_into_a_failure(tmp_path):
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n"
        "def test_needs_zfs():\n    pytest.skip('no zfs here')\n"
        "def test_other_zfs():\n    pytest.skip('not on this ZFS: resume tokens')\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))

    def outcome(ci, args=()):
        env.pop("CI", None)
        if ci:
            env["CI"] = "true"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest",
                               "-p", "no:cacheprovider", str(tmp_path)] + list(args),
                              cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                              universal_newlines=True)
        return proc.returncode, proc.stdout.strip().splitlines()[-1]

    code, last = outcome(ci=False)
    assert code == 0 and last.startswith("2 skipped"), last
    code, last = outcome(ci=True)
    assert code == 1 and last.startswith("1 failed, 1 skipped"), last
    # the same in a parallel run, as contrib/test.sh makes it: the workers
    # judge, the controller reports and fails
    if importlib.util.find_spec("xdist") is None:
        pytest.skip("optional: pytest-xdist is not installed (contrib/test.sh installs it)")
    code, last = outcome(ci=True, args=("-n", "2", "--dist", "loadgroup"))
    assert code == 1 and last.startswith("1 failed, 1 skipped"), last


def test_every_test_named_in_the_durations_file_exists():
    """tests/data/durations.txt orders a parallel run (the longest tests
    first): a renamed or removed test there would silently fall back to the
    end of the run."""
    import conftest
    here = os.path.dirname(__file__)
    names = conftest.measured_durations()
    assert len(names) >= 20
    for test_id in names:
        path, _, name = test_id.partition("::")
        with open(os.path.join(here, path)) as f:
            assert "\ndef %s(" % name.split("[")[0] in f.read(), test_id


def test_test_modules_import_no_other_test_module():
    """Shared test helpers live in helpers.py (fixtures in conftest.py,
    the bed in bed.py): a test module that imports another runs that
    module's import-time code and drags its fixtures and names along, and
    moving one test breaks the other."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = []
    for path in sorted(glob.glob(os.path.join(here, "*.py"))):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            found += ["%s:%d imports %s" % (os.path.basename(path), node.lineno, m)
                      for m in modules if m.split(".")[0].startswith("test_")]
    assert not found, found
