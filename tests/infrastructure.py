"""Real infrastructure for the tests (PostgreSQL, Patroni, Orthanc…): in CI it must start, since `make test` installs
it; on a developer's machine without it, the tests that need it are skipped, saying why."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def started(start: Callable[[], T], what: str) -> T:
    try:
        return start()
    except Exception as err:  # noqa: BLE001 - whatever stops it from starting is said, then raised in CI
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{what} unavailable here: {err}")
