"""Everything about the package is in pyproject.toml; this file only adds the one C part, the SQLite VFS
that writes a commit's WAL frames in one call (src/rebond/store/_walvfs.c). It is optional: without a C
compiler or SQLite's headers (Debian: libsqlite3-dev) Rebond installs and runs on SQLite's own VFS, slower."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("rebond.store._walvfs", ["src/rebond/store/_walvfs.c"], libraries=["sqlite3"], optional=True)])
