"""Shared fixtures: a store on each engine (a real PostgreSQL started here), and a running API."""
from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rebond.store import open_store
from rebond.store.base import Store
from tests.infrastructure import started
from tests.pg_harness import PostgresServer
from tests.server import RebondServer

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea"
_db_names = itertools.count()


def pytest_sessionstart(session: pytest.Session) -> None:
    """A module compiled with mypyc (setup.py) older than its source would test old code: stop and say so."""
    import rebond

    for built in Path(rebond.__file__).parent.rglob("*.cpython-*.so"):
        source = built.with_name(built.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
            pytest.exit(f"{built.name} is older than {source.name}: rebuild it (make .venv/bin/rebond, or pip install -e .)", 2)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = started(lambda: PostgresServer().start(), "PostgreSQL")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def engine_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/rebond.db"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"t{os.getpid()}_{next(_db_names)}")


@pytest.fixture
def store(engine_url: str) -> Iterator[Store]:
    s = open_store(engine_url)
    yield s
    s.close()


DEMO_SIZE = (1, 2, 8)  # hospitals, wards per hospital, beds per ward: small enough to seed in a second


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo hospital group with its demo accounts, seeded once; tests copy it."""
    from rebond.security.accounts import Accounts
    from rebond.seed.demo import DemoSize, demo_accounts, seed_demo

    path = tmp_path_factory.mktemp("demo") / "demo.db"
    store = open_store(f"sqlite:///{path}")
    report = seed_demo(store, seed=4, size=DemoSize(*DEMO_SIZE))
    demo_accounts(Accounts(store), report)
    store.close()
    return path


@pytest.fixture
def demo_db(demo_template: Path, tmp_path: Path) -> str:
    """A fresh copy of the demo group for one test."""
    import shutil

    target = tmp_path / "demo.db"
    shutil.copyfile(demo_template, target)
    return f"sqlite:///{target}"


@pytest.fixture(scope="module")
def web(demo_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RebondServer]:
    """`rebond serve` on a copy of the demo group, shared by the tests of one module."""
    import shutil

    path = tmp_path_factory.mktemp("web") / "demo.db"
    shutil.copyfile(demo_template, path)
    server = RebondServer(f"sqlite:///{path}").start()
    yield server
    server.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """A real small disk (a tmpfs of the size asked, e.g. "1M"), unmounted after the test: mounting needs root, as
    `make test` runs in CI."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small disk needs root (CI runs as root)")
        disk = tmp_path / f"disk-{len(mounted)}"
        disk.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
        mounted.append(disk)
        return disk

    yield mount
    for disk in mounted:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
