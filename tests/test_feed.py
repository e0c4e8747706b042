"""The change feed under concurrency: a follower sees every committed change exactly once, in seq order,
even when transactions commit out of order and some roll back (leaving gaps in the sequence)."""
from __future__ import annotations

import random
import threading
import time

from rebond.store.base import Store


def test_concurrent_writers_and_a_follower_see_every_change_once(store: Store) -> None:
    writers, per_writer = 4, 100
    committed: set[tuple[str, int]] = set()
    lock = threading.Lock()
    done = threading.Event()
    seen: list[tuple[str, int]] = []
    seqs: list[int] = []

    def write(worker: int) -> None:
        rng = random.Random(worker)
        for i in range(per_writer):
            try:
                with store.transaction() as tx:
                    stored = tx.create({"resourceType": "Observation", "status": "final",
                                        "code": {"text": f"w{worker}-{i}"}}).stored
                    # hold some transactions open so that later sequence numbers commit first
                    time.sleep(rng.choice([0, 0, 0.001, 0.005, 0.02]))
                    if rng.random() < 0.1:
                        raise RuntimeError("rolled back on purpose")
            except RuntimeError:
                continue
            with lock:
                committed.add((stored.id, stored.version))

    def follow() -> None:
        cursor = None
        idle_after_done = 0
        while idle_after_done < 3:
            page = store.changes(cursor, count=25)
            for change in page.changes:
                seen.append((change.stored.id, change.stored.version))
                seqs.append(change.seq)
            cursor = page.next_cursor
            if not page.changes:
                if done.is_set():
                    idle_after_done += 1
                time.sleep(0.01)

    follower = threading.Thread(target=follow)
    follower.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    follower.join(timeout=120)
    assert not follower.is_alive()
    assert len(seen) == len(set(seen)), "a change was delivered twice"
    assert set(seen) == committed, f"missing: {len(committed - set(seen))}, unexpected: {len(set(seen) - committed)}"
    assert seqs == sorted(seqs)
    assert len(committed) > writers * per_writer * 0.7
