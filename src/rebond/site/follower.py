"""Following the central change feed into the site's store, from a durable cursor, in order, idempotently.

Each page of changes is applied in one transaction together with the cursor that follows it:
after a crash the site resumes exactly where its last commit left it, and a page applied twice
changes nothing (a version the site already has is skipped).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from starlette.concurrency import run_in_threadpool

from rebond.background import BackgroundLoop
from rebond.store.base import Session, Store, Stored

log = logging.getLogger("rebond.site")
CURSOR_URL = "https://rebond.health/fhir/StructureDefinition/change-cursor"
SITE_URL = "https://rebond.health/fhir/StructureDefinition/change-site"
STATE = "site"  # node_state namespace: cursor and follower facts
FRESH_SECONDS = 5.0  # a copy complete as of this long ago or less is said to be up to date (« à jour ») at this instant
METHODS = {"POST": "create", "PUT": "update", "DELETE": "delete"}


def _extension(element: dict[str, Any], url: str) -> str:
    return next((str(e.get("valueString", "")) for e in element.get("extension", []) if e.get("url") == url), "")


def _epoch(instant: str) -> float:
    return dt.datetime.fromisoformat(instant.replace("Z", "+00:00")).timestamp()


def stored_from_entry(entry: dict[str, Any]) -> Stored:
    """A change-feed entry as the version it carries."""
    request, response = entry["request"], entry["response"]
    resource: dict[str, Any] | None = entry.get("resource")
    url = request["url"] if request["method"] != "POST" or resource is None else f"{request['url']}/{resource['id']}"
    resource_type, _, resource_id = url.partition("/")
    version = int(response["etag"].removeprefix('W/"').rstrip('"'))
    method = METHODS.get(request["method"], "update")
    last_updated = _epoch(resource["meta"]["lastUpdated"]) if resource else _epoch(response["lastModified"])
    return Stored(resource_type, resource_id, version, last_updated, resource is None,
                  orjson.dumps(resource) if resource is not None else None, 0, method, _extension(entry, SITE_URL) or "central")


@dataclass
class FeedState:
    """What the follower knows, for /status and the freshness banner (times are epoch seconds)."""

    upstream_reachable: bool = False
    last_contact: float | None = None  # the last answer from the central site
    unreachable_since: float | None = None
    caught_up_at: float | None = None  # the last time the feed said "nothing more": data complete as of then
    last_change_applied_at: float | None = None
    changes_applied: int = 0
    #: since when the feed has waited at one gap: a version numbered but not yet committed on the central site (a long
    #: transaction there). Meanwhile the copy is complete only up to the gap, and `caught_up_at` does not move
    waiting_since: float | None = None
    waiting_at: str | None = None  # the feed position of that gap

    def data_as_of(self, now: float) -> float | None:
        return now if self.upstream_reachable and self.caught_up_at is not None and now - self.caught_up_at < FRESH_SECONDS \
            else self.caught_up_at

    def lag_seconds(self, now: float) -> float | None:
        as_of = self.data_as_of(now)
        return None if as_of is None else max(0.0, now - as_of)


class Follower(BackgroundLoop):
    """Polls the central feed every `interval` seconds; a failed or slow answer marks the central site unreachable."""

    def __init__(self, store: Store, upstream: str, token: str, *, interval: float = 0.5, timeout: float = 2.0,
                 page_size: int = 500) -> None:
        self.store = store
        self.upstream = upstream.rstrip("/")
        # the central site lists its site nodes by the site each says it is (its status page: in contact or not)
        self.headers = {"X-Rebond-Site": store.site_id, **({"Authorization": f"Bearer {token}"} if token else {})}
        self.interval = interval
        self.timeout = timeout
        self.page_size = page_size
        self.state = FeedState()
        saved = store.get_state(STATE, "follower") or {}
        self.state.caught_up_at = saved.get("caught_up_at")
        self.state.last_change_applied_at = saved.get("last_change_applied_at")

    @property
    def cursor(self) -> str | None:
        value = self.store.get_state(STATE, "cursor")
        return str(value) if value is not None else None

    def apply_page(self, page: dict[str, Any]) -> int:
        """Apply a page of changes and move the cursor, in one transaction; returns how many versions were new."""
        copies = [stored_from_entry(e) for e in page.get("entry", [])]
        next_cursor = _extension(page, CURSOR_URL)
        now = time.time()

        def work(tx: Session) -> int:
            applied = sum(1 for copy in copies if tx.replicate(copy))
            tx.put_state(STATE, "cursor", next_cursor)
            return applied

        applied = self.store.write(work)
        if copies:
            self.state.last_change_applied_at = now
            self.state.changes_applied += applied
        return applied

    async def poll_once(self, client: httpx.AsyncClient) -> bool:
        """One page; True when the feed had nothing more (caught up)."""
        params = {"_count": str(self.page_size)}
        cursor = await run_in_threadpool(lambda: self.cursor)
        if cursor:
            params["after"] = cursor
        response = await client.get(f"{self.upstream}/$changes", params=params, headers=self.headers, timeout=self.timeout)
        response.raise_for_status()
        page = response.json()
        now = time.time()
        self._reachable(now)
        next_cursor = _extension(page, CURSOR_URL)
        if page.get("entry"):
            await run_in_threadpool(self.apply_page, page)
            if len(page["entry"]) >= self.page_size:
                return False  # more to read at once
        elif next_cursor and next_cursor != cursor:
            # no change, yet the cursor moved: the feed met a gap at once and took a horizon to wait for. Kept, it lets
            # the next read pass the gap once the horizon is passed; asked again from before the gap, the feed would
            # take a new horizon each time and never pass it (a number rolled back, or lost in a failover)
            await run_in_threadpool(self.store.put_state, STATE, "cursor", next_cursor)
        cursor = next_cursor
        if "~" in cursor:  # the feed stops at a gap: a transaction on the central site still holds the next number
            position = cursor.split("~")[0]
            if self.state.waiting_at != position:
                # while writes go on, most reads end at such a gap, and the next read is past it: the copy is complete
                # but for what commits this instant. A gap that stays means a transaction held open on the central site:
                # the copy is complete as of when the wait began, and says so once that is FRESH_SECONDS old
                self.state.waiting_at, self.state.waiting_since = position, now
                self.state.caught_up_at = now
            return True
        self.state.waiting_at = self.state.waiting_since = None
        self.state.caught_up_at = now
        return True

    def _reachable(self, now: float) -> None:
        if not self.state.upstream_reachable:
            log.info("central site reachable")
        self.state.upstream_reachable = True
        self.state.unreachable_since = None
        self.state.last_contact = now

    def _unreachable(self, now: float, why: str) -> None:
        if self.state.upstream_reachable or self.state.unreachable_since is None:
            log.warning("central site unreachable: %s", why)
            self.state.unreachable_since = now
        self.state.upstream_reachable = False

    async def run(self) -> None:
        saved_every = 5.0
        last_saved = 0.0
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    caught_up = await self.poll_once(client)
                except (httpx.HTTPError, ValueError) as err:
                    self._unreachable(time.time(), type(err).__name__)
                    caught_up = True
                except Exception:
                    log.exception("applying the central feed failed")
                    caught_up = True
                now = time.time()
                if now - last_saved > saved_every:
                    last_saved = now
                    facts = {"caught_up_at": self.state.caught_up_at, "last_change_applied_at": self.state.last_change_applied_at}
                    await run_in_threadpool(self.store.put_state, STATE, "follower", facts)
                if caught_up:
                    await asyncio.sleep(self.interval)
