"""Replaying a site's journal on the central site, in journal order, through the central FHIR API (batch Bundles).

Creates are sent with their client-assigned ids and `If-None-Match: *` (PUT, only if the record does
not exist); updates and deletions carry `If-Match` on the version the site saw. A 412 is a conflict:
the site's version stays in its journal, the central one is fetched, and both wait in the
reconciliation view for a person. Later writes of the same record wait behind an unresolved conflict
(they were made on top of it). Nothing is overwritten silently; nothing is dropped.

A write whose answer was lost (the link died after the central site committed it) is sent again
when the link returns, and meets its own version: its precondition fails. Before calling it a
conflict, the replayer reads the version that write would have made (the one after the version the
site saw): if it holds the site's content (a deletion: is a deletion), the write is there once, and
is settled as replayed.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from starlette.concurrency import run_in_threadpool

from rebond.background import BackgroundLoop
from rebond.store.base import JournalEntry, Store
from rebond.store.draft import content_of
from rebond.web.i18n import N_

log = logging.getLogger("rebond.site")
FHIR = "application/fhir+json"
# reasons kept with a conflict, in English; the reconciliation page shows them translated
CHANGED_MEANWHILE = N_("changed on the central site meanwhile")
ON_TOP_OF_CONFLICT = N_("made on top of an unresolved conflict on the same record")


class Unreachable(Exception):
    """The central site did not answer: the replay stops here and resumes when it does."""


class Replayer(BackgroundLoop):
    def __init__(self, store: Store, upstream: str, token: str, site_id: str, *, reachable: Callable[[], bool],
                 interval: float = 0.5, timeout: float = 5.0) -> None:
        self.store = store
        self.upstream = upstream.rstrip("/")
        self.headers = {"Content-Type": FHIR, "Accept": FHIR, "X-Rebond-Site": site_id}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.reachable = reachable
        self.interval = interval
        self.timeout = timeout
        self.replayed = 0
        self.last_replay_rate: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def replay_pending(self, client: httpx.AsyncClient) -> int:
        """Replay every pending write, oldest first, in batches; returns how many were settled (replayed or in conflict)."""
        settled = 0
        started = time.monotonic()
        try:
            while True:
                entries = await run_in_threadpool(self.store.journal, "pending", limit=BATCH * 2)
                if not entries:
                    break
                settled += await self._replay_batch(client, _one_per_record(entries))
        finally:
            if settled:
                self.replayed += settled
                self.last_replay_rate = settled / max(time.monotonic() - started, 1e-6)
                log.info("journal replayed: %d writes (%.0f/s)", settled, self.last_replay_rate)
        return settled

    async def _replay_batch(self, client: httpx.AsyncClient, batch: list[JournalEntry]) -> int:
        """One FHIR batch Bundle: each entry stands on its own on the central site (a 412 fails only itself)."""
        conflicted = await run_in_threadpool(self._conflicted_records)
        outcomes: list[tuple[int, str, dict[str, Any]]] = []
        to_send = []
        for entry in batch:
            if (entry.resource_type, entry.resource_id) in conflicted:
                outcomes.append((entry.seq, "conflict", {"reason": ON_TOP_OF_CONFLICT}))
            else:
                to_send.append(entry)
        try:
            if to_send:
                answers = await self._send(client, to_send)
                for entry, answer in zip(to_send, answers, strict=True):
                    status = int(str(answer.get("response", {}).get("status", "500"))[:3])
                    if status >= 500:
                        raise Unreachable(f"central answered {status} for {entry.resource_type}/{entry.resource_id}")
                    if status < 300:
                        version = str(answer["response"].get("etag", "")).removeprefix('W/"').rstrip('"')
                        outcomes.append((entry.seq, "replayed", {"central_version": int(version) if version.isdigit() else None}))
                        continue
                    if status == 412 and await self._already_applied(client, entry):
                        log.info("%s/%s was already on the central site (its answer had been lost)", entry.resource_type,
                                 entry.resource_id)
                        outcomes.append((entry.seq, "replayed", {"central_version": entry.base_version + 1}))
                        continue
                    url = f"{self.upstream}/{entry.resource_type}/{entry.resource_id}"
                    reason = CHANGED_MEANWHILE if status == 412 else \
                        f"refused by the central site ({status}): {_outcome_text(answer.get('response', {}).get('outcome'))}"
                    outcomes.append((entry.seq, "conflict", {"reason": reason, "central": await self._central_copy(client, url)}))
                    log.warning("conflict on %s/%s: %s", entry.resource_type, entry.resource_id, reason)
        finally:
            if outcomes:
                await run_in_threadpool(self.store.write, lambda tx: [tx.settle_journal(seq, status, orjson.dumps(detail).decode())
                                                                      for seq, status, detail in outcomes])
        return len(outcomes)

    async def _send(self, client: httpx.AsyncClient, entries: list[JournalEntry]) -> list[dict[str, Any]]:
        bundle_entries = []
        for entry in entries:
            request: dict[str, Any] = {"method": "DELETE" if entry.method == "delete" else "PUT",
                                       "url": f"{entry.resource_type}/{entry.resource_id}"}
            if entry.base_version:
                request["ifMatch"] = f'W/"{entry.base_version}"'
            elif entry.method != "delete":
                request["ifNoneMatch"] = "*"  # a create: never applied over a version written since on the central site
            item: dict[str, Any] = {"request": request}
            if entry.method != "delete" and entry.body is not None:
                item["resource"] = orjson.Fragment(entry.body)
            bundle_entries.append(item)
        try:
            response = await client.post(self.upstream, content=orjson.dumps({"resourceType": "Bundle", "type": "batch",
                                                                              "entry": bundle_entries}),
                                         headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as err:
            raise Unreachable(str(err)) from err
        if response.status_code >= 500 or response.status_code in (401, 403):
            raise Unreachable(f"central answered {response.status_code}")
        if response.status_code >= 300:
            return [{"response": {"status": str(response.status_code), "outcome": response.json()}} for _ in entries]
        answers: list[dict[str, Any]] = response.json().get("entry", [])
        if len(answers) != len(entries):
            raise Unreachable("the central site's batch answer does not match the batch")
        return answers

    async def _already_applied(self, client: httpx.AsyncClient, entry: JournalEntry) -> bool:
        """Whether the version this write would have made on the central site is this write: its content, or a deletion."""
        url = f"{self.upstream}/{entry.resource_type}/{entry.resource_id}/_history/{entry.base_version + 1}"
        try:
            response = await client.get(url, headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as err:
            raise Unreachable(str(err)) from err
        if entry.method == "delete" or entry.body is None:
            return response.status_code == 410
        mine = content_of(orjson.loads(entry.body))
        if response.status_code == 200 and content_of(response.json()) == mine:
            return True
        if entry.base_version == 0:
            # a record made again after its deletion: its version number follows the deletion's, which the site's
            # journal does not know, so the current version is compared instead
            current = await self._central_copy(client, f"{self.upstream}/{entry.resource_type}/{entry.resource_id}")
            return current is not None and content_of(current) == mine
        return False

    async def _central_copy(self, client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
        try:
            response = await client.get(url, headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as err:
            raise Unreachable(str(err)) from err
        return dict(response.json()) if response.status_code == 200 else None

    def _conflicted_records(self) -> set[tuple[str, str]]:
        return {(c.resource_type, c.resource_id) for c in self.store.journal("conflict", limit=100_000)}

    def nudge(self) -> None:
        """Replay now rather than at the next tick (safe from any thread)."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    async def run(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        async with httpx.AsyncClient() as client:
            while True:
                if self.reachable():
                    try:
                        await self.replay_pending(client)
                    except Unreachable as err:
                        log.info("replay paused: %s", err)
                    except Exception:
                        log.exception("replaying the journal failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
                self._wake.clear()



BATCH = 100


def _one_per_record(entries: list[JournalEntry]) -> list[JournalEntry]:
    """The oldest entries up to the first one that touches a record already in the batch (order per record is kept)."""
    seen: set[tuple[str, str]] = set()
    batch = []
    for entry in entries[:BATCH]:
        key = (entry.resource_type, entry.resource_id)
        if key in seen:
            break
        seen.add(key)
        batch.append(entry)
    return batch


def _outcome_text(outcome: Any) -> str:
    if isinstance(outcome, dict):
        return "; ".join(str(i.get("diagnostics", "")) for i in outcome.get("issue", []) if isinstance(i, dict))
    return ""
