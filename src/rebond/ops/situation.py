"""The crisis cell's situation updates: what works, what does not, and what to do instead, per module and per site.

An update is a FHIR Communication of category `situation-update`. Being an ordinary resource, it follows the
change feed to every site node, so each hospital's status page carries it; written at a site node cut off from
the central site, it is kept there, shown there at once, and replayed on the central site like any other write.

    Communication.category   urn:rebond:communication-category|situation-update,
                             and the state it declares: urn:rebond:module-state|operational, degraded or down
    Communication.topic      the module it is about (urn:rebond:module), none for a general update
    Communication.recipient  the site it concerns, by identifier (urn:rebond:site|H1); none: the whole group
    Communication.payload    the text: what happens, what to do instead
    Communication.sent       when it was published
    Communication.sender     who published it (a Practitioner when the account stands for one)
    extension next-update    when the crisis cell says it will speak next
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rebond.clinical.conventions import COMMUNICATION_CATEGORY, HOSPITAL_TZ, LOCATION_SYSTEM, MODULE_STATE_SYSTEM, MODULE_SYSTEM, SITE_SYSTEM
from rebond.clinical.recording import InvalidForm
from rebond.clinical.records import Clinician, Entry, fhir_instant, find, identifier_value, instant
from rebond.clinical.wards import is_kind
from rebond.fhir import operations
from rebond.store.base import Session, Store, StoreError
from rebond.web.i18n import N_

log = logging.getLogger("rebond.situation")
SITUATION_UPDATE = "situation-update"
NEXT_UPDATE = "urn:rebond:extension:next-update"

#: what the crisis cell speaks about: Rebond's modules, and the means of work around them that fail with them
MODULES: dict[str, str] = {
    "records": N_("Patient records"),
    "admissions": N_("Admissions and beds"),
    "prescriptions": N_("Prescriptions and administrations"),
    "results": N_("Lab and imaging results"),
    "messaging": N_("Internal messaging"),
    "directory": N_("Staff directory and on-call rota"),
    "procedures": N_("Procedures binder"),
    "phones": N_("Telephones"),
}
#: the states an update may declare, best first
STATES = (N_("operational"), N_("degraded"), N_("down"))
#: the longest text an update may have (a situation update is read standing, on a ward PC)
MAX_TEXT = 2000
#: how far back the status page lists updates
SHOWN_DAYS = 7
SHOWN_MAX = 30


@dataclass(frozen=True)
class Update:
    id: str
    sent: dt.datetime
    text: str
    author: str
    module: str | None  # None: a general update
    state: str | None  # None: information only
    site: str | None  # None: the whole group
    next_update: dt.datetime | None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "sent": _instant_ms(self.sent), "text": self.text, "author": self.author, "module": self.module,
                "state": self.state, "site": self.site, "next_update": fhir_instant(self.next_update) if self.next_update else None}


def _instant_ms(moment: dt.datetime) -> str:
    """To the millisecond: two updates published in the same second (a correction at once) keep their order."""
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def communication(update: Update, author: Clinician) -> dict[str, Any]:
    """The update as the FHIR Communication it is kept as."""
    category = [{"coding": [{"system": COMMUNICATION_CATEGORY, "code": SITUATION_UPDATE, "display": "Situation update"}]}]
    if update.state is not None:
        category.append({"coding": [{"system": MODULE_STATE_SYSTEM, "code": update.state}]})
    resource: dict[str, Any] = {
        "resourceType": "Communication", "id": update.id, "status": "completed", "category": category,
        "priority": "urgent" if update.state == "down" else "routine",
        "sent": _instant_ms(update.sent), "sender": author.reference(),
        "payload": [{"contentString": update.text}],
    }
    if update.module is not None:
        resource["topic"] = {"coding": [{"system": MODULE_SYSTEM, "code": update.module, "display": MODULES[update.module]}]}
    if update.site is not None:
        resource["recipient"] = [{"identifier": {"system": SITE_SYSTEM, "value": update.site}, "display": update.site}]
    if update.next_update is not None:
        resource["extension"] = [{"url": NEXT_UPDATE, "valueDateTime": fhir_instant(update.next_update)}]
    return resource


def _code_in(concepts: list[Any], system: str) -> str | None:
    """The code of `system` among CodeableConcepts (what the store keeps passed validation: the shapes are FHIR's)."""
    return next((str(c["code"]) for concept in concepts for c in concept.get("coding", []) if c.get("system") == system and "code" in c), None)


def is_situation_update(resource: dict[str, Any] | None) -> bool:
    """A Communication of the situation-update category (whatever else it holds)."""
    return resource is not None and _code_in(resource.get("category") or [], COMMUNICATION_CATEGORY) == SITUATION_UPDATE


def from_resource(resource: dict[str, Any]) -> Update | None:
    """The update a Communication holds; None for one that is not a situation update or has no date."""
    categories = resource.get("category", [])
    sent = instant(resource.get("sent"))
    if not is_situation_update(resource) or sent is None:
        return None
    module = _code_in([resource.get("topic", {})], MODULE_SYSTEM)
    state = _code_in(categories, MODULE_STATE_SYSTEM)
    site = next((str(r["identifier"]["value"]) for r in resource.get("recipient", [])
                 if r.get("identifier", {}).get("system") == SITE_SYSTEM and r["identifier"].get("value")), None)
    later = next((instant(e.get("valueDateTime")) for e in resource.get("extension", []) if e.get("url") == NEXT_UPDATE), None)
    text = "\n".join(str(p["contentString"]) for p in resource.get("payload", []) if "contentString" in p)
    return Update(str(resource.get("id", "")), sent, text, str(resource.get("sender", {}).get("display", "")),
                  module if module in MODULES else None, state if state in STATES else None, site, later)


def read_form(form: dict[str, str], now: dt.datetime) -> Update:
    """An update from the web form's fields (text, module, state, site, next: HH:MM); InvalidForm says what is wrong.

    The next update's time is today's in the hospital's time zone, or tomorrow's when that hour has passed."""
    problems: dict[str, str] = {}
    text = form.get("text", "").strip()
    if not text:
        problems["text"] = "required"
    elif len(text) > MAX_TEXT:
        problems["text"] = f"too-long:{MAX_TEXT}"
    module = form.get("module", "") or None
    if module is not None and module not in MODULES:
        problems["module"] = "choose-one"
    state = form.get("state", "") or None
    if state is not None and state not in STATES:
        problems["state"] = "choose-one"
    if state is not None and module is None:
        problems["state"] = "state-needs-module"
    site = form.get("site", "").strip() or None
    if site is not None and (len(site) > 64 or not all(c.isalnum() or c in "-_." for c in site)):
        problems["site"] = "not-a-site"
    later = None
    if form.get("next", "").strip():
        try:
            at = dt.time.fromisoformat(form["next"].strip())
        except ValueError:
            problems["next"] = "not-a-time"
        else:
            local = now.astimezone(HOSPITAL_TZ)
            later = dt.datetime.combine(local.date(), at, HOSPITAL_TZ)
            if later <= local:
                later += dt.timedelta(days=1)
    if problems:
        raise InvalidForm(problems)
    return Update(Entry.of(form.get("entry")).id(), now, text, "", module, state, site, later)


def publish(store: Store, update: Update, author: Clinician) -> Update:
    """Keep the update (on a site node: journaled for the central site in the same commit)."""
    resource = communication(update, author)

    def keep(tx: Session) -> None:
        if tx.read("Communication", update.id) is None:  # the form sent twice: published once
            operations.create(tx, "Communication", resource, resource_id=update.id)

    store.write(keep)
    return Update(update.id, update.sent, update.text, author.display, update.module, update.state, update.site, update.next_update)


def known_sites(store: Store) -> list[tuple[str, str]]:
    """The group's hospital sites as (site id, name): the identifiers of their site Locations (H1, H2, …), which are
    also the `--site-id` of their site nodes."""
    out = []
    for site in find(store, "Location", ("partof:missing", "true")):
        code = identifier_value(site, LOCATION_SYSTEM)
        if is_kind(site, "si") and isinstance(code, str):
            out.append((code, str(site.get("name", code))))
    return sorted(out)


def recent(store: Store, now: dt.datetime, *, site: str | None) -> list[Update]:
    """The updates of the last days, newest first: all of them on the central site (`site` None), else the
    group's and this site's."""
    since = fhir_instant(now - dt.timedelta(days=SHOWN_DAYS))
    found = find(store, "Communication", ("category", f"{COMMUNICATION_CATEGORY}|{SITUATION_UPDATE}"), ("sent", f"ge{since}"),
                 ("_sort", "-sent"), limit=SHOWN_MAX * 4)
    updates = [u for u in map(from_resource, found) if u is not None and (site is None or u.site in (None, site))]
    return sorted(updates, key=lambda u: u.sent, reverse=True)[:SHOWN_MAX]


@dataclass(frozen=True)
class ModuleState:
    """Where a module stands: the newest update that declared its state, for the group and for each site."""

    module: str
    label: str
    state: str | None  # the worst in force; None: nothing declared
    declared: list[Update]  # newest first, one per scope (the group, each site)


def module_states(updates: list[Update]) -> list[ModuleState]:
    """Every module, in their order, with what the updates (newest first) declare of it."""
    out = []
    for module, label in MODULES.items():
        latest: dict[str | None, Update] = {}
        for update in updates:
            if update.module == module and update.state is not None:
                latest.setdefault(update.site, update)
        declared = sorted(latest.values(), key=lambda u: u.sent, reverse=True)
        if len(declared) > 1 and None in latest:
            # an update for the whole group speaks for every site: a site's older word is overtaken by it
            group = latest[None]
            declared = [u for u in declared if u.site is None or u.sent > group.sent]
        worst = max((STATES.index(u.state) for u in declared if u.state), default=None)
        out.append(ModuleState(module, label, None if worst is None else STATES[worst], declared))
    return out


#: seconds: the status page asked for fresh updates (after a publication) reads them at most this often
FRESH_AT_MOST_EVERY = 1.0
#: seconds the list of the group's sites is kept (they change when a hospital joins the group)
SITES_KEPT_SECONDS = 60.0


class Situation:
    """The updates this node shows, read again at most every `ttl` seconds (the status page and every staff page's
    banner read it; a crisis brings everyone to the status page at once) and at once after a publication here."""

    def __init__(self, store: Store, *, site: str | None, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.site = site
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._updates: list[Update] = []
        self._sites: list[tuple[str, str]] = []
        self._sites_read_at: float | None = None
        self.problem: str | None = None  # why the last reading failed: the updates shown are the last ones read

    def updates(self, *, fresh: bool = False) -> list[Update]:
        """The updates of the last days, newest first; the last ones read when the store does not answer.

        `fresh`: read now (the page that follows a publication, which another server process may have made), unless
        read in the last second: anyone may ask for the status page so, and it stays one search a second at most."""
        with self._lock:
            age = None if self._read_at is None else self.clock() - self._read_at
            if age is not None and age < (FRESH_AT_MOST_EVERY if fresh else self.ttl):
                return self._updates
        try:
            found = recent(self.store, dt.datetime.now(dt.UTC), site=self.site)
        except StoreError as err:
            with self._lock:
                if self.problem is None:
                    log.warning("the situation updates could not be read: %s", err)
                self.problem, self._read_at = str(err), self.clock()
                return self._updates
        with self._lock:
            self._updates, self._read_at, self.problem = found, self.clock(), None
        return found

    def sites(self) -> list[tuple[str, str]]:
        """The group's sites (`known_sites`), read at most once a minute; none while the store does not answer."""
        with self._lock:
            if self._sites_read_at is not None and self.clock() - self._sites_read_at < SITES_KEPT_SECONDS:
                return self._sites
        try:
            found = known_sites(self.store)
        except StoreError:
            return self._sites
        with self._lock:
            self._sites, self._sites_read_at = found, self.clock()
        return found

    def publish(self, update: Update, author: Clinician) -> Update:
        kept = publish(self.store, update, author)
        with self._lock:
            self._read_at = None
        return kept

    def status(self) -> dict[str, Any]:
        """The `situation` of `GET /status`: the modules' declared states and the updates."""
        updates = self.updates()
        modules = [{"module": m.module, "state": m.state,
                    "declared": [{"id": u.id, "site": u.site, "state": u.state, "sent": _instant_ms(u.sent)} for u in m.declared]}
                   for m in module_states(updates)]
        return {"modules": modules, "problem": self.problem,
                "updates": [u.to_json() for u in updates]}

    def headline(self) -> list[ModuleState]:
        """The modules declared degraded or down, the ones down first, for the banner of staff pages."""
        troubled = [m for m in module_states(self.updates()) if m.state in ("degraded", "down")]
        return sorted(troubled, key=lambda m: m.state != "down")
