"""All 122 Synthea bundles load into each engine, through the `rebond import` command, with nothing left unresolved."""
from __future__ import annotations

import bz2
import collections
import re
import subprocess
import sys

import orjson
import pytest

from rebond.store import open_store
from tests.conftest import SYNTHEA

pytestmark = pytest.mark.slow

_UNRESOLVED = re.compile(rb'"reference":"(urn:uuid:[^"]*|[A-Za-z]+\?[^"]*)"')


def expected_counts() -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for path in sorted(SYNTHEA.glob("*.json.bz2")):
        bundle = orjson.loads(bz2.decompress(path.read_bytes()))
        counts.update(e["resource"]["resourceType"] for e in bundle["entry"])
    return counts


def rebond(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rebond.cli", *args], capture_output=True, text=True, timeout=1200)


def test_synthea_loads_completely_and_reimports_without_duplicates(engine_url: str) -> None:
    assert len(list(SYNTHEA.glob("*.json.bz2"))) == 122
    expected = expected_counts()
    assert expected["Observation"] == 42929 and expected["Encounter"] == 4769 and expected["Patient"] == 120

    first = rebond("import", "--db", engine_url, str(SYNTHEA))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "92114 resources loaded, 0 failed" in first.stdout

    store = open_store(engine_url)
    try:
        assert store.counts() == dict(expected)
        # no urn:uuid or conditional reference survives in any stored resource
        cursor = None
        seen = 0
        while True:
            page = store.changes(cursor, count=1000)
            if not page.changes:
                break
            for change in page.changes:
                assert change.stored.body is not None
                found = _UNRESOLVED.search(change.stored.body)
                assert found is None, f"{change.stored.resource_type}/{change.stored.id}: {found.group(1)!r}"
            seen += len(page.changes)
            cursor = page.next_cursor
        assert seen == 92114

        again = rebond("import", "--db", engine_url, str(SYNTHEA))
        assert again.returncode == 0
        assert store.counts() == dict(expected)
        _, versions = store.history(count=1)
        assert versions == 92114, "re-importing the same files made new versions"
    finally:
        store.close()
