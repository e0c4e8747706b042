"""Replaying a site's journal on the central site, in journal order, through the central FHIR API.

Creates are sent with their client-assigned ids (PUT: idempotent); updates and deletions carry
`If-Match` on the version the site saw. A 412 is a conflict: the site's version stays in its
journal, the central one is fetched, and both wait in the reconciliation view for a person.
Later writes of the same record wait behind an unresolved conflict (they were made on top of it).
Nothing is overwritten silently; nothing is dropped.
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

from rebond.store.base import JournalEntry, Store

log = logging.getLogger("rebond.site")
FHIR = "application/fhir+json"


class Unreachable(Exception):
    """The central site did not answer: the replay stops here and resumes when it does."""


class Replayer:
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
        self._task: asyncio.Task[None] | None = None

    async def replay_pending(self, client: httpx.AsyncClient) -> int:
        """Replay every pending write, oldest first; returns how many were settled (replayed or in conflict)."""
        settled = 0
        started = time.monotonic()
        while True:
            entries = await run_in_threadpool(self.store.journal, "pending", limit=200)
            if not entries:
                break
            for entry in entries:
                await self.replay_one(client, entry)
                settled += 1
        if settled:
            self.replayed += settled
            self.last_replay_rate = settled / max(time.monotonic() - started, 1e-6)
            log.info("journal replayed: %d writes (%.0f/s)", settled, self.last_replay_rate)
        return settled

    async def replay_one(self, client: httpx.AsyncClient, entry: JournalEntry) -> None:
        blocked = await run_in_threadpool(self._blocked_by_conflict, entry)
        if blocked:
            await self._settle(entry, "conflict", {"reason": "made on top of an unresolved conflict on the same record"})
            return
        url = f"{self.upstream}/{entry.resource_type}/{entry.resource_id}"
        headers = dict(self.headers)
        if entry.base_version:
            headers["If-Match"] = f'W/"{entry.base_version}"'
        try:
            if entry.method == "delete":
                response = await client.delete(url, headers=headers, timeout=self.timeout)
            else:
                response = await client.put(url, content=entry.body or b"{}", headers=headers, timeout=self.timeout)
        except httpx.HTTPError as err:
            raise Unreachable(str(err)) from err
        if response.status_code >= 500:
            raise Unreachable(f"central answered {response.status_code}")
        if response.status_code < 300:
            version = response.headers.get("etag", "").removeprefix('W/"').rstrip('"')
            await self._settle(entry, "replayed", {"central_version": int(version) if version.isdigit() else None})
            return
        central = await self._central_copy(client, url)
        reason = "changed on the central site meanwhile" if response.status_code == 412 else \
            f"refused by the central site ({response.status_code}): {_diagnostics(response)}"
        await self._settle(entry, "conflict", {"reason": reason, "central": central})
        log.warning("conflict on %s/%s: %s", entry.resource_type, entry.resource_id, reason)

    async def _central_copy(self, client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
        try:
            response = await client.get(url, headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as err:
            raise Unreachable(str(err)) from err
        return dict(response.json()) if response.status_code == 200 else None

    def _blocked_by_conflict(self, entry: JournalEntry) -> bool:
        return any(c.resource_type == entry.resource_type and c.resource_id == entry.resource_id and c.seq < entry.seq
                   for c in self.store.journal("conflict", limit=100_000))

    async def _settle(self, entry: JournalEntry, status: str, detail: dict[str, Any]) -> None:
        text = orjson.dumps(detail).decode()
        await run_in_threadpool(self.store.write, lambda tx: tx.settle_journal(entry.seq, status, text))

    async def run(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                if self.reachable():
                    try:
                        await self.replay_pending(client)
                    except Unreachable as err:
                        log.info("replay paused: %s", err)
                    except Exception:
                        log.exception("replaying the journal failed")
                await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _diagnostics(response: httpx.Response) -> str:
    try:
        outcome = response.json()
        return "; ".join(str(i.get("diagnostics", "")) for i in outcome.get("issue", []))
    except ValueError:
        return response.text[:200]
