"""The layer map of flocker_failover.py, checked: the file reads top to
bottom in numbered sections ("# N. Title" between two rules of '='), the
module docstring lists them, a section whose title says "(pure functions)"
does no I/O, a section uses only what it or a section above it defines
(layers call only downward), and no function is longer than 80 lines.

Read with ast, never imported: the checks are about the text."""

import ast
import re

import bed as bedmod

SRC = open(bedmod.PROGRAM, encoding="utf-8").read()
TREE = ast.parse(SRC)
LINES = SRC.splitlines()

_RULE = "# " + "=" * 75
_HEADER = re.compile(r"# (\d+)\. (.+)$")


def sections():
    """[(number, title, first line, last line)], lines counted from 1."""
    found = []
    for i, line in enumerate(LINES):
        m = _HEADER.match(line)
        if m and i > 0 and LINES[i - 1] == _RULE and LINES[i + 1] == _RULE:
            found.append((int(m.group(1)), m.group(2), i + 1))
    return [(n, title, first, found[k + 1][2] - 1 if k + 1 < len(found) else len(LINES))
            for k, (n, title, first) in enumerate(found)]


SECTIONS = sections()


def section_of(lineno):
    for n, _title, first, last in SECTIONS:
        if first <= lineno <= last:
            return n
    return 0      # the module docstring and the imports, above section 1


def top_level_names(node):
    """The module-level names a top-level statement defines."""
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    targets = []
    if isinstance(node, ast.Assign):
        targets = node.targets
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
        targets = [node.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def test_sections_are_numbered_in_book_order():
    assert [n for n, *_ in SECTIONS] == list(range(1, len(SECTIONS) + 1)), SECTIONS
    assert len(SECTIONS) >= 9


def test_the_module_docstring_map_matches_the_headers():
    """Each numbered line of the docstring's map is a header's title, in
    the same order; a parenthesised note may follow after two spaces."""
    doc = ast.get_docstring(TREE)
    listed = []
    for line in doc.splitlines():
        m = re.match(r"\s+(\d+)\. (.+?)(?:\s{2,}\(.*)?$", line)
        if m:
            listed.append((int(m.group(1)), m.group(2).strip()))
    assert listed == [(n, title) for n, title, *_ in SECTIONS]


# What a pure section must not touch: processes, sockets, signals, files
# and clocks (its callers pass the facts and the time in).
_IMPURE_MODULES = {"subprocess", "socket", "selectors", "signal", "sqlite3"}
_IMPURE_ATTRIBUTES = {("os", "kill"), ("os", "killpg"), ("os", "system"), ("os", "popen"),
                      ("os", "open"), ("os", "read"), ("os", "write"), ("os", "listdir"),
                      ("os", "rename"), ("os", "unlink"),
                      ("time", "time"), ("time", "monotonic"), ("time", "sleep")}
_IMPURE_NAMES = {"open", "wall_clock", "print", "input"}


def impure_uses(node):
    """[(line, what)] of the I/O in an ast node."""
    uses = []
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            uses += [(n.lineno, "import " + a.name) for a in n.names
                     if a.name.split(".")[0] in _IMPURE_MODULES]
        elif isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] in _IMPURE_MODULES:
            uses.append((n.lineno, "from %s import" % n.module))
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            if n.value.id in _IMPURE_MODULES or (n.value.id, n.attr) in _IMPURE_ATTRIBUTES:
                uses.append((n.lineno, "%s.%s" % (n.value.id, n.attr)))
        elif isinstance(n, ast.Name) and n.id in _IMPURE_NAMES:
            uses.append((n.lineno, n.id))
    return uses


def test_the_pure_sections_do_no_io():
    pure = [n for n, title, *_ in SECTIONS if "(pure functions)" in title]
    assert pure, "no section is declared pure"
    found = [(line, what) for node in TREE.body if section_of(node.lineno) in pure
             for line, what in impure_uses(node)]
    assert found == []


def test_the_pure_sections_call_nothing_that_does_io():
    """Nor through a helper: a name a pure section uses must not lead, by
    the names it uses in turn, to I/O (a class counts with all its
    methods, so only data classes and pure helpers pass)."""
    defs, uses = {}, {}
    for node in TREE.body:
        for name in top_level_names(node):
            defs.setdefault(name, node)
    for name, node in defs.items():
        uses[name] = {n.id for n in ast.walk(node)
                      if isinstance(n, ast.Name) and n.id in defs and n.id != name}
    direct = {name for name, node in defs.items() if impure_uses(node)}

    def path_to_io(name, seen):
        if name in direct:
            return [name]
        for used in sorted(uses[name]):
            if used not in seen:
                seen.add(used)
                rest = path_to_io(used, seen)
                if rest:
                    return [name] + rest
        return None

    pure = [n for n, title, *_ in SECTIONS if "(pure functions)" in title]
    found = []
    for name, node in defs.items():
        if section_of(node.lineno) in pure:
            chain = path_to_io(name, {name})
            if chain:
                found.append(" -> ".join(chain))
    assert found == []


def test_layers_call_only_downward():
    """A name defined at module level in section N is used only in
    sections N and below (higher numbers)."""
    defined = {}
    for node in TREE.body:
        for name in top_level_names(node):
            defined.setdefault(name, section_of(node.lineno))
    upward = []
    for node in TREE.body:
        here = section_of(node.lineno)
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and defined.get(n.id, 0) > here:
                upward.append("line %d (section %d) uses %s (section %d)"
                              % (n.lineno, here, n.id, defined[n.id]))
    assert upward == []



def test_no_function_is_longer_than_80_lines():
    """Long functions are cut along their steps, each a named function
    with a docstring (methods included)."""
    long = ["%s (line %d): %d lines" % (n.name, n.lineno, n.end_lineno - n.lineno + 1)
            for n in ast.walk(TREE)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 80]
    assert long == []


def _class(name):
    return next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == name)


def test_the_daemon_is_a_thin_loop():
    """Issue 20: Daemon is the loop (sockets, timers, signals, the job
    runner) over the role keeper, the heartbeat link and the control
    server; what a node is and does lives in the keeper."""
    daemon = _class("Daemon")
    assert daemon.end_lineno - daemon.lineno + 1 < 400


def test_the_role_keeper_has_no_io_and_no_clock():
    """Like PeerTracker: the loop passes `now`, and what is to be logged or
    written leaves as a Note (so tests drive it with invented facts)."""
    for name in ("PeerTracker", "RoleKeeper", "WitnessWatch", "WitnessView"):
        node = _class(name)
        found = impure_uses(node) + [(n.lineno, n.id) for n in ast.walk(node)
                                     if isinstance(n, ast.Name) and n.id == "log"]
        assert found == [], (name, found)


def test_no_job_thread_function_assigns_loop_state():
    """What runs on a job's thread (DaemonJobs' methods, and every function
    named job) assigns no attribute of anything: it hands its result back
    (section 9's rule).  Locals only."""
    on_job_thread = [m for m in _class("DaemonJobs").body
                     if isinstance(m, ast.FunctionDef) and m.name != "__init__"]
    on_job_thread += [n for n in ast.walk(TREE)
                      if isinstance(n, ast.FunctionDef) and n.name == "job"]
    assert len(on_job_thread) >= 10
    assigned = []
    for fn in on_job_thread:
        for n in ast.walk(fn):
            targets = (n.targets if isinstance(n, ast.Assign) else
                       [n.target] if isinstance(n, (ast.AugAssign, ast.AnnAssign)) else [])
            assigned += ["%s (line %d): %s" % (fn.name, n.lineno, ast.unparse(t)
                                              if hasattr(ast, "unparse") else "an attribute")
                         for t in targets for a in ast.walk(t) if isinstance(a, ast.Attribute)]
    assert assigned == []
