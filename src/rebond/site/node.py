"""A node's situation — central or site, how fresh its data is, whether the central site answers — for
`GET /status`, the banner on every page and the headers on every response."""
from __future__ import annotations

import datetime as dt
import time
from typing import Any

from rebond.clinical.conventions import HOSPITAL_TZ
from rebond.moments import utc_second
from rebond.site.directory import DirectoryCopier
from rebond.site.follower import Follower
from rebond.site.replay import Replayer
from rebond.site.trail import TrailSender
from rebond.store.base import Store
from rebond.web.i18n import Translator


class Node:
    """The central server: it is the source, always fresh."""

    role = "central"

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def site_id(self) -> str:
        return self.store.site_id

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {"role": self.role, "site_id": self.site_id, "upstream": None, "upstream_reachable": None,
                "unreachable_since": None, "last_change_applied_at": None, "data_as_of": utc_second(now), "lag_seconds": 0.0,
                "journal_pending": 0, "conflicts_open": 0, "writes": "accepted"}

    def headers(self, now: float | None = None) -> dict[str, str]:
        return {"X-Rebond-Node": f"{self.role}; site={self.site_id}"}

    def banner(self, t: Translator) -> str | None:
        return None

    def upstream_access(self) -> tuple[str, str] | None:
        """The central site's FHIR base and API token, for a site node; None on the central site."""
        return None

    def makes_rounds(self) -> bool:
        """Whether this node makes the group's rounds now (the critical results' calls passed on to a physician): the
        central site always; a site node while it cannot reach the central site, standing in for it."""
        return True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class SiteNode(Node):
    """A site: a live copy of the central store, following its change feed."""

    role = "site"

    def __init__(self, store: Store, upstream: str, token: str, *, interval: float = 0.5, timeout: float = 2.0) -> None:
        super().__init__(store)
        self.upstream = upstream
        self.token = token
        self.follower = Follower(store, upstream, token, interval=interval, timeout=timeout)
        # every write made here is applied at once and journaled in the same commit, then replayed on the central site
        store.journal_writes = True
        # the journal is looked at ten times a second: while the central site answers, a write made here reaches it
        # about 0.1 s after it was made here (an indexed read of an empty journal costs microseconds)
        self.replayer = Replayer(store, upstream, token, store.site_id, reachable=lambda: self.follower.state.upstream_reachable,
                                 interval=min(interval, 0.1))
        store.after_journal = self.wait_for_central
        # the central accounts of people, copied every minute: the staff sign in here with their usual password when cut off
        self.directory = DirectoryCopier(store, upstream, token)
        # the accesses made here, sent on to the central site's trail every few seconds while it answers
        self.trail_sender = TrailSender(store, upstream, token, reachable=lambda: self.follower.state.upstream_reachable)

    #: how long a write waits for the central site before it is answered anyway (it is durable here already)
    FORWARD_WAIT = 3.0

    def wait_for_central(self, seqs: list[int]) -> None:
        """While the central site answers, a write made here is answered once the central site has it (or refused it:
        then it waits in the reconciliation view). Cut off, it is answered at once: kept here, sent later."""
        if not self.follower.state.upstream_reachable or not seqs:
            return
        wanted = set(seqs)
        self.replayer.nudge()
        deadline = time.monotonic() + self.FORWARD_WAIT
        while time.monotonic() < deadline and self.follower.state.upstream_reachable:
            if not wanted & {e.seq for e in self.store.journal("pending", limit=len(seqs) + 1000, after=min(seqs) - 1)}:
                return
            time.sleep(0.005)

    def upstream_access(self) -> tuple[str, str] | None:
        return self.upstream, self.token

    def makes_rounds(self) -> bool:
        feed = self.follower.state
        return not feed.upstream_reachable and feed.unreachable_since is not None  # known cut off, not merely starting

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        feed = self.follower.state
        lag = feed.lag_seconds(now)
        return {"role": self.role, "site_id": self.site_id, "upstream": self.upstream,
                "upstream_reachable": feed.upstream_reachable, "unreachable_since": utc_second(feed.unreachable_since),
                "last_change_applied_at": utc_second(feed.last_change_applied_at), "data_as_of": utc_second(feed.data_as_of(now)),
                "lag_seconds": None if lag is None else round(lag, 3), "feed_waiting_since": utc_second(feed.waiting_since),
                "journal_pending": self.store.journal_count("pending"),
                "conflicts_open": self.store.journal_count("conflict"), "replayed": self.replayer.replayed,
                "last_replay_rate": self.replayer.last_replay_rate,
                "writes": "accepted: applied here at once, replayed on the central site in order",
                "accounts": {"copied_at": utc_second(self.directory.state.copied_at), **self.directory.status()},
                "audit_sent": self.trail_sender.status()}

    def headers(self, now: float | None = None) -> dict[str, str]:
        now = time.time() if now is None else now
        feed = self.follower.state
        out = {"X-Rebond-Node": f"site; site={self.site_id}"}
        as_of = utc_second(feed.data_as_of(now))
        out["X-Rebond-Data-As-Of"] = as_of or "never"
        out["X-Rebond-Upstream"] = "reachable" if feed.upstream_reachable else f"unreachable; since={utc_second(feed.unreachable_since) or 'start'}"
        return out

    def banner(self, t: Translator) -> str | None:
        now = time.time()
        feed = self.follower.state
        as_of = feed.data_as_of(now)
        if as_of is None:
            return t.gettext("Site node %(site)s: no copy of the central data yet — the central site has not answered.", site=self.site_id)
        moment = dt.datetime.fromtimestamp(as_of, HOSPITAL_TZ)
        if feed.upstream_reachable:
            return t.gettext("Site node %(site)s: data up to date (%(time)s), following the central site.",
                             site=self.site_id, time=t.time(moment))
        cut = t.since(dt.datetime.fromtimestamp(feed.unreachable_since or now, dt.UTC), dt.datetime.now(dt.UTC))
        kept = self.store.journal_count("pending")
        return t.gettext("Data up to date at %(time)s — central site unreachable for %(since)s. Writes are kept here "
                         "(%(kept)s waiting) and will be sent when it returns.", time=t.time(moment), since=cut, kept=kept)

    async def start(self) -> None:
        self.follower.start()
        self.replayer.start()
        self.directory.start()
        self.trail_sender.start()

    async def stop(self) -> None:
        await self.trail_sender.stop()
        await self.directory.stop()
        await self.replayer.stop()
        await self.follower.stop()
