"""The audit trail: every access to the data through the FHIR API and the web app, with whose data it touched.

Each answered request of a signed-in account (or an API token) under /fhir and on the web app's pages leaves one
`Access`: who (account and role), from where (the client's address), when, what (the interaction or the page),
the request (method, path and query), the status answered, and the patients whose data the answer held. The
patients are found in what was sent back: the Patient ids of `"reference":"Patient/…"` and of Patient resources in
FHIR JSON (`Patient/ID"`: a reference or a Bundle's fullUrl), of `/patients/…` links in a page, and the Patient of the
path itself.

The request finds its patients as it is answered (a few microseconds: a literal-led regular expression over the
answer) and hands the line over; a thread beside writes the lines, in one transaction every quarter of a second. An
access is on the trail within a second of its answer, and a server killed in that moment loses its lines (the data
written are never at stake: their own commit came first). What it costs: docs/benchmarks.md. While the store
refuses writes, the accesses wait in memory, up to MAX_PENDING; beyond, the oldest are counted as lost and the log
and `/status` say so.

The trail is each node's own and never enters the change feed; a site node sends its lines on to the central
site's trail (site/trail.py).
Reading it is an access too. `GET /fhir/$audit` serves it as FHIR AuditEvents; `rebond audit` on the command line.
"""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rebond.moments import utc_second
from rebond.store.base import Access, Store, StoreError
from rebond.store.indexing import date_range
from rebond.web.i18n import N_

log = logging.getLogger("rebond.audit")

#: the most patients one access lists (a search over a whole ward lists them all; a bulk read counts the rest)
AUDIT_PATIENTS = 1000
#: accesses kept in memory while the store does not take them
MAX_PENDING = 200_000
#: the most bytes of an answer read for patients (a larger answer: its first bytes, and the count says "at least")
SCANNED_BYTES = 32 * 1024 * 1024

_ID = rb"([A-Za-z0-9\-.]{1,64})"
# "Patient/ID" closing a string: a reference (relative or absolute), or the fullUrl of a Patient in a Bundle; a literal
# start lets the regular expression engine skip ahead (4.5 times faster than matching each "reference" first)
_JSON_PATIENTS = re.compile(rb'Patient/' + _ID + rb'"')
_PATIENT_RESOURCES = re.compile(rb'"resourceType":"Patient","id":"' + _ID + rb'"')  # a Patient without its URL (a create)
_PAGE_PATIENTS = re.compile(rb'href="/patients/' + _ID + rb'[/"?#]')
_SEQUENCE = itertools.count()
#: what the command line's reading and pruning of the trail are recorded as (rebond audit list, rebond audit prune)
READ_TRAIL, PRUNE_TRAIL = N_("audit trail"), N_("audit prune")

#: the web app's pages that show or change patient data, by route: (what, action)
WEB_PAGES: dict[str, tuple[str, str]] = {
    "/wards/{ward_id}": (N_("census"), "R"),
    "/wards/{ward_id}/admit": (N_("emergency admission"), "C"),
    "/patients": (N_("patient search"), "E"),
    "/patients/{patient_id}": (N_("chart"), "R"),
    "/patients/{patient_id}/imaging/{study_id}": (N_("images"), "R"),
    "/patients/{patient_id}/vitals": (N_("vital signs"), "C"),
    "/patients/{patient_id}/administrations/{request_id}": (N_("administration"), "C"),
    "/patients/{patient_id}/notes": (N_("note"), "C"),
    "/patients/{patient_id}/prescriptions/new": (N_("prescription"), "C"),
    "/patients/{patient_id}/prescriptions/{request_id}/stop": (N_("prescription stop"), "U"),
    "/patients/{patient_id}/prescriptions/{request_id}/acknowledge": (N_("prescription read"), "C"),
    "/pharmacy": (N_("prescriptions to validate"), "R"),
    "/pharmacy/validate": (N_("prescription validation"), "C"),
    "/pharmacy/interventions/new": (N_("pharmaceutical intervention"), "C"),
    "/patients/{patient_id}/interventions/{issue_id}": (N_("intervention answer"), "U"),
    "/messages": (N_("messages"), "R"),
    "/messages/new": (N_("message"), "C"),
    "/messages/{message_id}": (N_("message"), "R"),
    "/results": (N_("results"), "R"),
    "/results/{report_id}/acknowledge": (N_("result acknowledgement"), "C"),
    "/critical-results": (N_("critical results register"), "R"),
    "/critical-results.csv": (N_("critical results register"), "R"),
    "/reconciliation": (N_("reconciliation"), "R"),
    "/reconciliation/{seq:int}": (N_("reconciliation"), "U"),
    "/downtime": (N_("downtime packs"), "R"),
    "/downtime/wards/{ward_id}.pdf": (N_("downtime pack"), "R"),
    "/downtime/files/{ward_id}/{name}.pdf": (N_("downtime pack"), "R"),
    "/admin/hl7": (N_("hl7 dead letters"), "R"),
    "/admin/hl7/{message_id:int}/replay": (N_("hl7 replay"), "U"),
    "/admin/audit": (N_("audit trail"), "R"),
}
#: the FHIR routes, by (route, method): (interaction, action); $changes is the site nodes' copy of everything
FHIR_ROUTES: dict[tuple[str, str], tuple[str, str]] = {
    ("/fhir/{type}/{id}", "GET"): (N_("read"), "R"),
    ("/fhir/{type}/{id}", "PUT"): (N_("update"), "U"),
    ("/fhir/{type}/{id}", "PATCH"): (N_("patch"), "U"),
    ("/fhir/{type}/{id}", "DELETE"): (N_("delete"), "D"),
    ("/fhir/{type}", "GET"): (N_("search-type"), "E"),
    ("/fhir/{type}", "POST"): (N_("create"), "C"),
    ("/fhir/{type}", "PUT"): (N_("update"), "U"),
    ("/fhir/{type}", "DELETE"): (N_("delete"), "D"),
    ("/fhir/{type}/_search", "POST"): (N_("search-type"), "E"),
    ("/fhir/{type}/{id}/_history/{vid}", "GET"): (N_("vread"), "R"),
    ("/fhir/{type}/{id}/_history", "GET"): (N_("history-instance"), "R"),
    ("/fhir/{type}/_history", "GET"): (N_("history-type"), "R"),
    ("/fhir/_history", "GET"): (N_("history-system"), "R"),
    ("/fhir", "POST"): (N_("batch"), "E"),
    ("/fhir/", "POST"): (N_("batch"), "E"),
    ("/fhir/$changes", "GET"): (N_("feed"), "R"),
    ("/fhir/$audit", "GET"): (N_("audit trail"), "R"),
}


def patients_in(body: bytes, *, html: bool) -> set[str]:
    """The Patient ids an answer holds (FHIR JSON, or a page's links to charts)."""
    if html:
        return {m.decode() for m in _PAGE_PATIENTS.findall(body[:SCANNED_BYTES])}
    scanned = body[:SCANNED_BYTES]
    found = set(_JSON_PATIENTS.findall(scanned))  # a Bundle names its patients many times: decoded once each
    if b'"resourceType":"Patient"' in scanned:
        found.update(_PATIENT_RESOURCES.findall(scanned))
    return {m.decode() for m in found}


def time_ordered_id(recorded: float) -> str:
    """32 hex digits (a UUID's shape) that sort by time: each line appends at the right edge of the trail's index
    instead of landing on a random page; the process id and a counter keep two processes' lines apart."""
    return f"{int(recorded * 1_000_000):014x}{os.getpid() % 0x1000000:06x}{next(_SEQUENCE) % 0x1000000000000:012x}"


@dataclass(slots=True)
class _Answered:
    """An access as the request path hands it over: the patients are found later, beside."""

    recorded: float
    agent: str
    role: str
    source: str
    channel: str
    action: str
    what: str
    entity: str
    outcome: int
    body: list[bytes] = field(default_factory=list)
    html: bool = False
    scan: bool = True  # False: the answer is not read for patients (the feed carries everyone's data to a site node)
    known: tuple[str, ...] = ()  # patients the request names itself (its path)

    @property
    def idle(self) -> bool:
        """A poll of the change feed that found nothing new (a site node asks twice a second): not worth a line."""
        return self.what == "feed" and bool(self.body) and self.body[-1].endswith(b'"entry":[]}')

    def access(self, node: str) -> Access:
        found = set(self.known)
        if self.scan and self.body:
            found |= patients_in(b"".join(self.body), html=self.html)
        listed = tuple(sorted(found)[:AUDIT_PATIENTS])
        return Access(time_ordered_id(self.recorded), self.recorded, node, self.agent, self.role, self.source, self.channel, self.action, self.what,
                      self.entity, self.outcome, len(found), listed)


class AuditTrail:
    """Accesses handed over by the requests, written in one transaction every `interval` seconds by a thread (a quarter of
    a second: a busier second would hold the interpreter's lock longer at once, and the slowest answers wait for it)."""

    def __init__(self, store: Store, *, interval: float = 0.25, max_pending: int = MAX_PENDING) -> None:
        self.store = store
        self.interval = interval
        self._pending: deque[Access] = deque()
        self._max_pending = max_pending
        self._lock = threading.Lock()  # the pending accesses
        self._flushing = threading.Lock()  # one writer of the trail at a time
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.written = 0
        self.lost = 0
        self.last_written_at: float | None = None
        self.problem: str | None = None

    def hand_over(self, answered: _Answered) -> None:
        """Take an answered request: its patients are found here, in the request's thread (microseconds for a page or
        a Bundle), so that the writing thread only writes; the answer's bytes are not kept waiting for it."""
        if answered.idle:
            return
        access = answered.access(self.store.site_id)
        with self._lock:
            self._pending.append(access)
            if len(self._pending) > self._max_pending:
                self._pending.popleft()
                self.lost += 1
                if self.lost == 1 or self.lost % 10_000 == 0:
                    log.error("audit trail: %d accesses lost so far: more than %d waited for the store", self.lost, self._max_pending)

    def record(self, *, agent: str, role: str, source: str, channel: str, action: str, what: str, entity: str, outcome: int = 200,
               patients: tuple[str, ...] = ()) -> None:
        """An access made elsewhere than the API and the pages (the command line), with the patients it touched."""
        self.hand_over(_Answered(time.time(), agent, role, source, channel, action, what, entity, outcome, known=patients))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> int:
        """Write the accesses handed over so far, in one transaction; returns how many (0 if the store refused them)."""
        with self._flushing:
            with self._lock:
                batch = list(self._pending)
                self._pending.clear()
            if not batch:
                return 0
            accesses = batch
            try:
                self.store.write(lambda tx: tx.record_accesses(accesses))
            except StoreError as err:
                with self._lock:
                    self._pending.extendleft(reversed(batch))  # kept, in their order, for the next try
                    while len(self._pending) > self._max_pending:
                        self._pending.popleft()
                        self.lost += 1
                if self.problem is None:
                    log.warning("audit trail: %d accesses wait, the store does not take them: %s", len(batch), err)
                self.problem = str(err)
                return 0
            if self.problem is not None:
                log.info("audit trail: written again after '%s'", self.problem)
            self.problem = None
            self.written += len(accesses)
            self.last_written_at = time.time()
            return len(accesses)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # never let the trail's thread die: the next second tries again
                log.exception("audit trail: writing failed")

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="rebond-audit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and write what is left."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join(timeout=10)
            self._thread = None
        self.flush()

    def status(self) -> dict[str, Any]:
        return {"written": self.written, "pending": self.pending, "lost": self.lost,
                "last_written_at": utc_second(self.last_written_at), "problem": self.problem}


class AuditMiddleware:
    """Hands every answered request of a known account under /fhir and on the patient pages to the audit trail."""

    def __init__(self, app: ASGIApp, trail: AuditTrail, clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.trail = trail
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered: list[_Answered] = []

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                access = self._access(scope, message)
                if access is not None:
                    answered.append(access)
            elif message["type"] == "http.response.body" and answered and (answered[0].scan or answered[0].what == "feed"):
                answered[0].body.append(bytes(message.get("body", b"")))
            await send(message)

        await self.app(scope, receive, watch)
        if answered:
            self.trail.hand_over(answered[0])

    def _access(self, scope: Scope, start: Message) -> _Answered | None:
        account = (scope.get("state") or {}).get("account")
        route = getattr(scope.get("route"), "path", None)
        if account is None or route is None:  # not signed in (nothing was shown), or no such page
            return None
        method = scope["method"]
        if route.startswith("/fhir"):
            known = FHIR_ROUTES.get((route, method))
            if known is None:  # the CapabilityStatement, the accounts copied to the site nodes: no patient data
                return None
            channel, (what, action) = "fhir", known
        elif route in WEB_PAGES:
            channel, (what, action) = "web", WEB_PAGES[route]
        elif route.startswith("/dicom-web/"):  # images from the PACS: their patient is the study's, found by the endpoint
            channel, what, action = "dicomweb", N_("images"), "R"
        else:
            return None
        params = scope.get("path_params") or {}
        state = scope.get("state") or {}
        named = params.get("patient_id") or (params.get("id") if params.get("type") == "Patient" else None) \
            or state.get("audit_patient")
        # an answer that is neither a page nor FHIR JSON (a CSV) names its patients itself
        known = (str(named),) if named else tuple(sorted(state.get("audit_patients") or ()))
        query = scope.get("query_string", b"").decode("latin-1")
        kind = next((value for name, value in start.get("headers") or () if name == b"content-type"), b"")
        client = scope.get("client")
        # an answer is read for patients when it is FHIR JSON or a page; not the feed, which carries everyone's data to a
        # site node, nor a PDF (a downtime pack: its ward's census, named by the path)
        return _Answered(self.clock(), account.username, account.role, client[0] if client else "", channel, action, what,
                         f"{method} {scope['path']}" + (f"?{query}" if query else ""), int(start["status"]),
                         html=kind.startswith(b"text/html"),
                         scan=channel != "dicomweb" and what != "feed" and (b"json" in kind or kind.startswith(b"text/html")),
                         known=known)


_REST = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"}
_PATIENT_RECORD = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110", "display": "Patient Record"}
_INTERACTIONS = {"read", "vread", "update", "patch", "delete", "history-instance", "history-type", "history-system", "create",
                 "search-type", "batch"}


def _instant(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def access_to_json(access: Access) -> list[Any]:
    """An access as a site node sends it to the central site: its fields in order, the patients a list."""
    return [*access[:12], list(access.patients)]


def access_from_json(line: Any) -> Access:
    """An access a site node sent; ValueError when it is not one."""
    if not isinstance(line, list) or len(line) != 13:
        raise ValueError("a line is a list of 13 fields: " + ", ".join(Access._fields))
    aid, recorded, node, agent, role, source, channel, action, what, entity, outcome, count, patients = line
    if (not all(isinstance(text, str) for text in (aid, node, agent, role, source, channel, action, what, entity))
            or isinstance(recorded, bool) or not isinstance(recorded, int | float)
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in (outcome, count))
            or not isinstance(patients, list) or not all(isinstance(p, str) for p in patients)):
        raise ValueError("a line's fields are: " + ", ".join(Access._fields))
    if len(aid) != 32 or any(c not in "0123456789abcdef" for c in aid):
        raise ValueError(f"'{aid[:40]}' is not an id of the trail (32 hex digits)")
    return Access(aid, float(recorded), node, agent, role, source, channel, action, what, entity, outcome, count, tuple(patients))


def audit_event(access: Access) -> dict[str, Any]:
    """An access as the FHIR AuditEvent it stands for (made when asked: the trail is kept in its own table)."""
    rest = access.channel == "fhir" and access.what in _INTERACTIONS
    subtype = ({"system": "http://hl7.org/fhir/restful-interaction", "code": access.what} if rest
               else {"system": "urn:rebond:audit", "code": access.what.replace(" ", "-"), "display": access.what})
    entities: list[dict[str, Any]] = [
        {"what": {"reference": f"Patient/{patient}"},
         "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
         "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"}}
        for patient in access.patients]
    request: dict[str, Any] = {"type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                                        "display": "System Object"}, "description": access.entity}
    if access.patient_count > len(access.patients):
        request["detail"] = [{"type": "patients", "valueString": f"{access.patient_count} patients, {len(access.patients)} listed"}]
    entities.append(request)
    return {
        "resourceType": "AuditEvent", "id": access.id, "type": _REST if access.channel == "fhir" else _PATIENT_RECORD,
        "subtype": [subtype], "action": access.action, "recorded": _instant(access.recorded),
        "outcome": "0" if access.outcome < 400 else "4" if access.outcome < 500 else "8", "outcomeDesc": f"HTTP {access.outcome}",
        "agent": [{"who": {"identifier": {"system": "urn:rebond:account", "value": access.agent}, "display": access.agent},
                   "role": [{"coding": [{"system": "urn:rebond:role", "code": access.role}]}], "requestor": True,
                   **({"network": {"address": access.source, "type": "2"}} if access.source else {})}],
        "source": {"site": access.node, "observer": {"display": f"Rebond {access.node} ({access.channel})"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "3", "display": "Web Server"}]},
        "entity": entities,
    }


class AuditQueryError(ValueError):
    """A search of the audit trail that cannot be understood."""


def audit_query(params: list[tuple[str, str]]) -> dict[str, Any]:
    """`GET /fhir/$audit` parameters as `Store.accesses` arguments: patient (Patient/ID or ID), agent (an account), date
    (ge, gt, le, lt, or a day), _count (at most 1,000)."""
    found: dict[str, Any] = {"limit": 100}
    for name, value in params:
        if name == "patient":
            found["patient"] = value.removeprefix("Patient/")
        elif name == "agent":
            found["agent"] = value
        elif name == "date":  # a FHIR date's prefix and precision, read as the search index reads them
            prefix = value[:2] if value[:2] in ("ge", "gt", "le", "lt", "eq") else ""
            span = date_range(value[len(prefix):])
            if span is None:
                raise AuditQueryError(f"date: '{value}' is not a date (ge2026-12-01, lt2026-12-02T10:00:00Z)")
            lo, hi = span
            if prefix in ("", "eq", "ge"):
                found["since"] = lo
            if prefix == "gt":
                found["since"] = hi
            if prefix == "lt":
                found["until"] = lo
            if prefix in ("", "eq", "le"):
                found["until"] = hi
        elif name == "_count":
            if not value.isdigit() or not 1 <= int(value) <= 1000:
                raise AuditQueryError("_count: a number from 1 to 1000")
            found["limit"] = int(value)
        else:
            raise AuditQueryError(f"unknown parameter '{name}': patient, agent, date, _count")
    return found
