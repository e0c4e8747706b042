"""A site node sends its audit trail on to the central site, so that the central trail holds every access.

The accesses made at a site node are on its own trail first (security/audit.py). Every few seconds, while the central
site answers, the site sends the lines it has not sent yet, oldest first, 500 at a time, to `POST
{upstream}/$audit-import` (its account has the role `site`), and remembers the last one the central site took. A line
sent twice is kept once there. Cut off, the site keeps its lines and sends them when the central site returns: an
inquiry on the central site then finds what was done at the site while it was alone.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from starlette.concurrency import run_in_threadpool

from rebond.background import BackgroundLoop
from rebond.moments import utc_second
from rebond.security.audit import access_to_json
from rebond.store.base import Access, Store

log = logging.getLogger("rebond.site")
STATE = "audit-sent"
PAGE = 500


class TrailSender(BackgroundLoop):
    def __init__(self, store: Store, upstream: str, token: str, *, reachable: Callable[[], bool], every: float = 5.0,
                 timeout: float = 10.0) -> None:
        self.store = store
        self.url = upstream.rstrip("/") + "/$audit-import"
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        self.reachable = reachable
        self.every = every
        self.timeout = timeout
        self.sent = 0
        self.last_sent_at: float | None = None
        self.problem: str | None = None

    async def send_once(self, client: httpx.AsyncClient) -> int:
        """Send every line not sent yet, in pages; returns how many the central site took."""
        sent = 0
        while True:
            lines = await run_in_threadpool(self._unsent)
            if not lines:
                break
            try:
                response = await client.post(self.url, content=orjson.dumps({"accesses": [access_to_json(a) for a in lines]}),
                                             headers=self.headers, timeout=self.timeout)
            except httpx.HTTPError as err:
                self._problem(f"central site unreachable ({type(err).__name__})")
                break
            if response.status_code != 200:
                self._problem(f"the central site refused the audit lines ({response.status_code}): {response.text[:200]}")
                break
            await run_in_threadpool(self.store.put_state, STATE, "last", lines[-1].id)
            sent += len(lines)
            self.problem = None
            if len(lines) < PAGE:
                break
        if sent:
            self.sent += sent
            self.last_sent_at = time.time()
            log.info("audit trail: %d lines sent to the central site", sent)
        return sent

    def _unsent(self) -> list[Access]:
        after = self.store.get_state(STATE, "last") or ""
        return self.store.accesses_after(str(after), node=self.store.site_id, limit=PAGE)

    def _problem(self, why: str) -> None:
        if why != self.problem:
            log.warning("the audit trail was not sent to the central site: %s", why)
        self.problem = why

    def status(self) -> dict[str, Any]:
        return {"sent": self.sent, "last_sent_at": utc_second(self.last_sent_at), "problem": self.problem}

    async def run(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                if self.reachable():
                    try:
                        await self.send_once(client)
                    except Exception:
                        log.exception("sending the audit trail failed")
                await asyncio.sleep(self.every)
