"""Worker processes that work out MLLP messages' FHIR writes, so that HL7 intake uses every core.

Turning a lab result into FHIR (decoding, mapping, validation, index rows) is Python, and one
interpreter runs Python on one core at a time. With `rebond serve --mllp-workers N`, the
server process keeps the connections and the one writer; each message's writes are worked
out as a draft (store/draft.py) by one of N worker processes, each reading the same store:

    connection ──bytes──▶ server ──bytes──▶ worker: decode, map, validate, index rows on the last commit
                                 ◀─draft──
                         server: one group commit (inbox + the draft's writes, checked) ──▶ AA

The writer stays alone in the server process on purpose: SQLite drops a connection's page
cache whenever another process has written, so writers in several processes spend their turn
re-reading the pages they need. A worker only reads. A message is acknowledged only after the
server's commit; a worker that fails or dies costs nothing but time — the message is worked
out again in the server, under the write lock, as it is without workers.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import multiprocessing
import signal
from typing import Any

from rebond.hl7.intake import Prepared, prepare
from rebond.store import open_store
from rebond.store.base import Store

log = logging.getLogger("rebond.hl7")
_PR_SET_PDEATHSIG = 1
_store: Store | None = None


def _start_worker(db_url: str, site_id: str) -> None:
    """In each worker: die with the server (Linux), and open the store once."""
    global _store
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops its workers
    _store = open_store(db_url, site_id=site_id)


def _prepare_here(raw: bytes) -> Prepared | None:
    assert _store is not None
    return prepare(_store, raw)


class DraftWorkers:
    """A pool of worker processes making drafts; replaced as a whole if one of them dies."""

    def __init__(self, db_url: str, site_id: str, count: int) -> None:
        self.db_url = db_url
        self.site_id = site_id
        self.count = count
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.drafted = 0
        self.failed = 0
        self.redone = 0  # drafts found stale under the lock (another write changed what they read): worked out again
        self.restarts = 0

    def start(self) -> None:
        # spawned, not forked: the server's threads, sockets and SQLite connections stay out of the workers
        self._pool = concurrent.futures.ProcessPoolExecutor(
            self.count, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(self.db_url, self.site_id))

    async def prepare(self, raw: bytes) -> Prepared | None:
        """The message's draft from a worker; None (the server works it out itself) if the workers cannot."""
        pool = self._pool
        if pool is None:
            return None
        try:
            prepared = await asyncio.get_running_loop().run_in_executor(pool, _prepare_here, raw)
        except concurrent.futures.BrokenExecutor:
            self._restart(pool)
            return None
        except Exception as err:  # a draft is an optimisation: whatever went wrong, the server decides
            self.failed += 1
            log.warning("an MLLP worker could not draft a message: %s", type(err).__name__)
            return None
        self.drafted += 1
        return prepared

    def _restart(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        if self._pool is not broken:
            return
        log.warning("an MLLP worker process died: starting the workers again")
        self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)
        self.start()

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def status(self) -> dict[str, Any]:
        return {"processes": self.count, "drafted": self.drafted, "failed": self.failed, "redone": self.redone,
                "restarts": self.restarts}
