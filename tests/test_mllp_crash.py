"""Failure drill: kill -9 the server in the middle of a stream of 2,000 results; every acknowledged one is there once."""
from __future__ import annotations

import time

import pytest

from rebond.hl7.intake import CHANNEL
from rebond.store import open_store
from tests.hl7_messages import Sender
from tests.pg_harness import free_port
from tests.server import RebondServer

pytestmark = pytest.mark.slow
SENDERS, PER_SENDER = 4, 500


def test_kill_9_in_the_middle_of_a_result_stream(demo_db: str) -> None:
    port = free_port()
    server = RebondServer(demo_db, "--mllp-port", str(port)).start()
    senders = [Sender(n, port, PER_SENDER) for n in range(SENDERS)]
    for s in senders:
        s.start()
    while sum(len(s.acked) for s in senders) < 700:
        time.sleep(0.01)
    server.kill()
    acked_before_kill = sum(len(s.acked) for s in senders)
    restarted = RebondServer(demo_db, "--mllp-port", str(port)).start()
    try:
        for s in senders:
            s.join(300)
        acked = [c for s in senders for c in s.acked]
        print(f"\nkilled after {acked_before_kill} acknowledgements; {sum(s.resends for s in senders)} re-sends; "
              f"{len(acked)} acknowledged in all")
        assert len(acked) == SENDERS * PER_SENDER, "every message was eventually acknowledged"
    finally:
        restarted.stop()
    store = open_store(demo_db)
    try:
        kept = {m.control_id: m for m in store.messages(CHANNEL, limit=100_000)}
        assert all(kept[c].status == "applied" for c in acked), "every acknowledged message was applied"
        assert len([c for c in kept if c.startswith("K")]) == SENDERS * PER_SENDER, "each kept once"
        from rebond.fhir.search import parse_search

        query = parse_search("DiagnosticReport", [("identifier", ",".join(f"FK{n}-{i}" for n in range(SENDERS) for i in range(0, PER_SENDER, 25)))])
        query.count = 1000
        reports = store.search(query).matches
        assert len(reports) == SENDERS * PER_SENDER // 25
        assert all(r.version == 1 for r in reports), "applied once: no second version"
        assert sum(store.counts().get(t, 0) for t in ("DiagnosticReport",)) >= SENDERS * PER_SENDER
    finally:
        store.close()
