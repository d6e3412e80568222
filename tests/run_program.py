"""Runs flocker_failover.py's main() as the imported module flocker_failover,
its bytecode cached in CACHE_DIR (see bed.py's "Running the program"):

  python3 tests/run_program.py CACHE_DIR ARGS...

does what "python3 flocker_failover.py ARGS..." does, with the same main()
and the same sys.argv[0], minus the compiling: a script run as __main__ is
compiled on every run (about 0.2 s of CPU for this file), a module imported
from a cache once.  (The daemon, run so, is already the module that
exec_daemon_as_module would make it.)
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(cache_dir):
    """The module flocker_failover of this checkout, imported with its (and
    the standard library's) bytecode read from and written to cache_dir,
    whatever PYTHONDONTWRITEBYTECODE says."""
    sys.pycache_prefix = cache_dir
    sys.dont_write_bytecode = False
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import flocker_failover
    return flocker_failover


if __name__ == "__main__":
    sys.path[0] = ROOT              # as for the script: its directory, not tests/
    ff = load(sys.argv.pop(1))
    sys.argv[0] = ff.__file__
    sys.exit(ff.main())
