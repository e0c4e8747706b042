"""A site node's copy of the central site's accounts of people, so that its staff sign in when it is cut off.

Every minute (and at start) the site asks the central site for its directory (`GET
{upstream}/$site-accounts`, with the site's API token, whose account has the role `site`) and
makes its copies match it in one commit (`Accounts.adopt`). When the central site does not
answer, the copies stay as they are: that is when they are needed. An account made on the site
itself (`rebond accounts add --db` there) is never overwritten; a name both have is reported.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool

from rebond.background import BackgroundLoop
from rebond.security.accounts import AccountError, Accounts
from rebond.store.base import Store

log = logging.getLogger("rebond.site")
#: seconds between two copies of the central accounts: a new nurse signs in at her site within a minute
EVERY = 60.0


@dataclass
class DirectoryState:
    copied_at: float | None = None  # the last copy that answered
    copies: int | None = None
    kept_here: tuple[str, ...] = ()
    problem: str | None = None  # why the last attempt failed; None when it worked


class DirectoryCopier(BackgroundLoop):
    def __init__(self, store: Store, upstream: str, token: str, *, every: float = EVERY, timeout: float = 10.0) -> None:
        self.accounts = Accounts(store)
        self.url = upstream.rstrip("/") + "/$site-accounts"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.every = every
        self.timeout = timeout
        self.state = DirectoryState()

    async def copy_once(self, client: httpx.AsyncClient) -> None:
        try:
            response = await client.get(self.url, headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as err:  # the central site is gone: the copies stay, they are what lets people sign in now
            self._problem(f"central site unreachable ({type(err).__name__})")
            return
        if response.status_code != 200:
            self._problem(f"the central site refused ({response.status_code}): {_diagnostics(response)}")
            return
        try:
            directory = response.json()["accounts"]
            adopted = await run_in_threadpool(self.accounts.adopt, directory)
        except (ValueError, KeyError, TypeError, AccountError) as err:
            self._problem(f"the central directory could not be read: {err}")
            return
        if adopted.added or adopted.updated or adopted.removed:
            log.info("central accounts copied: %d new, %d changed, %d removed", adopted.added, adopted.updated, adopted.removed)
        if adopted.kept_here and adopted.kept_here != self.state.kept_here:
            log.warning("accounts made on this site kept over the central site's of the same name: %s", ", ".join(adopted.kept_here))
        self.state = DirectoryState(time.time(), adopted.copies, adopted.kept_here, None)

    def _problem(self, why: str) -> None:
        if why != self.state.problem:
            log.warning("the central accounts were not copied: %s", why)
        self.state.problem = why

    def status(self) -> dict[str, Any]:
        state = self.state
        return {"from_central": state.copies, "kept_here": list(state.kept_here), "problem": state.problem}

    async def run(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    await self.copy_once(client)
                except Exception:
                    log.exception("copying the central accounts failed")
                await asyncio.sleep(self.every)


def _diagnostics(response: httpx.Response) -> str:
    """The first issue's diagnostics of an OperationOutcome, else the start of the body."""
    try:
        return str(response.json()["issue"][0]["diagnostics"])
    except (ValueError, KeyError, IndexError, TypeError):
        return response.text[:200]
