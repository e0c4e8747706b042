"""What the central site hears from its site nodes: each one polls the change feed every half second, so the
time of its last poll says whether that hospital is in contact, and whether it keeps up.

Kept in memory by each server process, from the polls it answers (with `--workers N` the site nodes' polls are
spread over all of them within seconds). A site that has not polled since this process started is listed from
the group's site Locations, as not heard from.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rebond.moments import utc_second

#: a site node that polled within this many seconds is in contact (it polls every 0.5 s, and retries every few)
IN_CONTACT_SECONDS = 10.0


@dataclass
class Contact:
    site: str
    account: str
    address: str
    first_at: float  # its first poll since this process started
    last_at: float
    polls: int = 0
    behind: bool = False  # its last page was full: more changes were waiting for it


class SiteContacts:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._contacts: dict[str, Contact] = {}

    def heard(self, site: str, account: str, address: str, *, behind: bool) -> None:
        """A site node's account read a page of the change feed."""
        now = self.clock()
        with self._lock:
            contact = self._contacts.get(site)
            if contact is None:
                contact = self._contacts[site] = Contact(site, account, address, now, now)
            contact.account, contact.address, contact.last_at, contact.behind = account, address, now, behind
            contact.polls += 1

    def status(self, known: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Every site heard from or known to the group's data (site code, name), with when it was last heard."""
        now = self.clock()
        names = dict(known)
        with self._lock:
            contacts = {site: Contact(**vars(c)) for site, c in self._contacts.items()}
        out: list[dict[str, Any]] = []
        for site in sorted(set(names) | set(contacts)):
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
