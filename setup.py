"""Everything about the package is in pyproject.toml; this file only adds the C parts, both optional:

- the SQLite VFS that writes a commit's WAL frames in one call (src/rebond/store/_walvfs.c);
- the hot pure-Python modules compiled to C with mypyc (the compiler of mypy, from their type hints):
  search-index rows, FHIR validation and paths, search parsing and its SQL, HL7 v2 parsing, mapping
  and intake, drafts. They are what every write and every interface message spends its CPU on;
  compiled, a lab result's draft takes about 40 % less CPU (docs/benchmarks.md, seventh HL7 run).

Without a C compiler, Python's or SQLite's headers (Debian: gcc python3-dev libsqlite3-dev), or with
REBOND_PURE_PYTHON=1, Rebond installs and runs the same code as plain Python, slower.
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import Extension, setup

#: compiled with mypyc: what a write and an interface message spend their CPU on. Kept free of monkeypatching and of
#: subclassing from interpreted code (mypyc's rules); the Makefile reads this list to rebuild them when they change
COMPILED = [
    "src/rebond/fhir/model.py", "src/rebond/fhir/paths.py", "src/rebond/fhir/search.py",
    "src/rebond/hl7/intake.py", "src/rebond/hl7/mapping.py", "src/rebond/hl7/message.py",
    "src/rebond/store/draft.py", "src/rebond/store/indexing.py", "src/rebond/store/query.py",
]
#: the build environment has mypy but not Rebond's dependencies (their types are Any there); `make lint` checks the
#: types strictly, with them installed
MYPY_FLAGS = ["--config-file=", "--ignore-missing-imports", "--follow-imports=silent", "--python-version=3.11"]


def drop_stale_builds(keep: list[str]) -> None:
    """A compiled module shadows its source: one no longer built (or built no more at all) must go."""
    for built in glob.glob("src/rebond/**/*.cpython-*.so", recursive=True):
        source = built.split(".", 1)[0] + ".py"
        if os.path.exists(source) and source not in keep:
            os.remove(built)


def compiled_modules() -> list[Extension]:
    why = ""
    if os.environ.get("REBOND_PURE_PYTHON"):
        why = "REBOND_PURE_PYTHON is set"
    elif not shutil.which("gcc") and not shutil.which("cc"):
        why = "no C compiler"
    elif not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        why = "no Python headers"
    else:
        try:
            from mypyc.build import mypycify

            drop_stale_builds(keep=COMPILED)
            return list(mypycify([*MYPY_FLAGS, *COMPILED], group_name="rebond._compiled", opt_level="3"))
        except (Exception, SystemExit) as err:  # mypy exits on a type error
            why = f"mypyc: {err}"
    print(f"rebond: the hot modules run as plain Python ({why})", file=sys.stderr)
    drop_stale_builds(keep=[])
    for built in glob.glob("src/rebond/_compiled__mypyc.*.so"):
        os.remove(built)
    return []


setup(ext_modules=[
    Extension("rebond.store._walvfs", ["src/rebond/store/_walvfs.c"], libraries=["sqlite3"], optional=True),
    *compiled_modules(),
])
