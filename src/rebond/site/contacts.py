"""What the central site hears from its site nodes: each one polls the change feed every half second, so the
time of its last poll says whether that hospital is in contact, and whether it keeps up.

A site node polls over one kept connection, so one server process answers all its polls: the one that
accepted the connection, among the processes of `--workers N`, or among the central servers behind
HAProxy. Each process keeps what it hears in memory and writes it down in the store every SHARE_EVERY
seconds (one small transaction for the sites heard since); the status, whichever process answers it,
is what all of them have heard, the latest for each site. A site that no process has heard from is
listed from the group's site Locations, as not heard from.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from rebond.background import BackgroundLoop
from rebond.moments import utc_second
from rebond.store.base import Store, StoreError

log = logging.getLogger("rebond.site")
#: a site node that polled within this many seconds is in contact (it polls every 0.5 s, and retries every few)
IN_CONTACT_SECONDS = 10.0
#: how often a process writes down what it has heard, for the others: well within IN_CONTACT_SECONDS
SHARE_EVERY = 2.0
#: a site heard from once but no longer among the group's sites is listed this long after its last poll
FORGET_AFTER = 7 * 24 * 3600.0
STATE = "site-contact"


@dataclass
class Contact:
    site: str
    account: str
    address: str
    first_at: float  # its first poll since this process started
    last_at: float
    polls: int = 0
    behind: bool = False  # its last page was full: more changes were waiting for it


class SiteContacts(BackgroundLoop):
    def __init__(self, store: Store | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store  # where the processes share what they hear; None: this process's own only
        self.clock = clock
        self._lock = threading.Lock()
        self._contacts: dict[str, Contact] = {}
        self._unshared: set[str] = set()  # sites heard since the last share
        self._failing = False

    def heard(self, site: str, account: str, address: str, *, behind: bool) -> None:
        """A site node's account read a page of the change feed."""
        now = self.clock()
        with self._lock:
            contact = self._contacts.get(site)
            if contact is None:
                contact = self._contacts[site] = Contact(site, account, address, now, now)
            contact.account, contact.address, contact.last_at, contact.behind = account, address, now, behind
            contact.polls += 1
            self._unshared.add(site)

    def share(self) -> int:
        """Write down the contacts heard since the last time, for the other processes; how many. A store that refuses
        writes (the database changing servers) only delays it: they are written at the next time."""
        with self._lock:
            fresh = [asdict(self._contacts[site]) for site in sorted(self._unshared)]
            self._unshared.clear()
        if not fresh or self.store is None:
            return 0
        try:
            self.store.write(lambda tx: [tx.put_state(STATE, contact["site"], contact) for contact in fresh])
        except StoreError as err:
            with self._lock:
                self._unshared.update(c["site"] for c in fresh)
            if not self._failing:
                log.warning("the site nodes' contacts cannot be shared with the other server processes now: %s", err)
            self._failing = True
            return 0
        self._failing = False
        return len(fresh)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SHARE_EVERY)
            try:
                await run_in_threadpool(self.share)
            except Exception:  # the next round tries again
                log.exception("sharing the site nodes' contacts failed")

    def _heard_by_all(self) -> dict[str, Contact]:
        """This process's contacts and those the others have written down, the latest for each site."""
        with self._lock:
            contacts = {site: Contact(**vars(c)) for site, c in self._contacts.items()}
        if self.store is not None:
            try:
                shared = self.store.list_state(STATE)
            except StoreError:
                shared = []
            for site, value in shared:
                try:
                    other = Contact(**value)
                except TypeError:  # written by another version of Rebond: left out
                    continue
                if site not in contacts or other.last_at > contacts[site].last_at:
                    contacts[site] = other
        return contacts

    def status(self, known: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Every site heard from (by any process) or known to the group's data (site code, name), with when it was last
        heard. Reads the store: call it off the event loop."""
        now = self.clock()
        names = dict(known)
        contacts = self._heard_by_all()
        out: list[dict[str, Any]] = []
        gone = {site for site, c in contacts.items() if site not in names and now - c.last_at > FORGET_AFTER}
        for site in sorted(set(names) | set(contacts) - gone):
            contact = contacts.get(site)
            if contact is None:
                out.append({"site": site, "name": names.get(site), "in_contact": False, "last_contact": None,
                            "seconds_since": None, "account": None, "address": None, "polls": 0, "behind": False})
                continue
            since = max(0.0, now - contact.last_at)
            out.append({"site": site, "name": names.get(site), "in_contact": since <= IN_CONTACT_SECONDS,
                        "last_contact": utc_second(contact.last_at), "seconds_since": round(since, 1),
                        "account": contact.account, "address": contact.address, "polls": contact.polls,
                        "behind": contact.behind})
        return out
