"""Critical results no one has taken in hand: passed on to the physician who can act on them.

The lab's call for a critical result (hl7/critical.py) waits in the ward's box. If no one there
answers it or says « Je m'en occupe » within ESCALATE_AFTER (15 minutes by default), the node
passes it on, in the same conversation, to a physician:

- the one on call for the ward now (the rota's Schedules, clinical/staff.py);
- else the one who ordered the result (the lab's order names them: ORC-12, OBR-16), if the store knows them;
- else the physician of the patient's stay (Encounter.participant).

The passing on is a reply from the same sender as the call, so that it does not count as the call
taken in hand; its recipients are the physician and the call's own, so the ward's thread shows it
and the physician's box lists the conversation, waiting, marked « Résultat critique ». It is
written once: its id derives from the call's, and its time is the call's plus the delay. So two
nodes that both pass it on (a site node cut off, and the central site for a call it had) write the
same resource, and the site's journal settles it as already there when the link returns.

The central site does it, in one process per store (a lease, as for the PACS's studies); a site node only while it
cannot reach the central site, standing in for it. It looks every CHECK_EVERY (or a fifth of the delay, for a
shorter one).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from rebond.background import BackgroundLoop
from rebond.clinical.conventions import COMMUNICATION_CATEGORY, ESCALATE_MINUTES
from rebond.clinical.messaging import CRITICAL_RESULT, Conversation, conversation, message
from rebond.clinical.records import Resource, fhir_instant, find, person_name, read, ref_id
from rebond.clinical.staff import shifts
from rebond.fhir import operations
from rebond.moments import utc_second
from rebond.store.base import Session, Store, StoreError

log = logging.getLogger("rebond.escalation")
ESCALATE_AFTER = dt.timedelta(minutes=ESCALATE_MINUTES)
#: calls older than this are no longer passed on (a call left a day is a matter for the ward's head, not the night's)
LOOK_BACK = dt.timedelta(hours=24)
CHECK_EVERY = 30.0
STATE = "escalation"
_NAMESPACE = uuid.UUID("0f3c2b4e-9a51-4d8e-b6a2-7c1e5d9f2a30")


@dataclass(frozen=True)
class Physician:
    reference: str
    name: str
    why: str  # « de garde », « médecin du séjour »


def escalate_delay(minutes: float | str | None) -> dt.timedelta | None:
    """`--escalate-after MINUTES` as a delay: None (never) for 0, the default for None; ValueError for a negative one."""
    if minutes is None or minutes == "":
        return ESCALATE_AFTER
    value = float(minutes)
    if value < 0:
        raise ValueError(f"--escalate-after takes minutes, 0 or more, not {minutes}")
    return dt.timedelta(minutes=value) if value else None


def _delay(after: dt.timedelta) -> str:
    """« 15 min »; « 6 s » for a delay under a minute (a drill's)."""
    seconds = after.total_seconds()
    return f"{round(seconds / 60)} min" if seconds >= 60 else f"{round(seconds)} s"


def escalation_id(call_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"critical-result-escalation|{call_id}"))


def overdue(store: Store, now: dt.datetime, after: dt.timedelta) -> list[tuple[Resource, Conversation]]:
    """The lab's calls for critical results sent between LOOK_BACK and `after` ago that no one has taken in hand and
    that were not passed on yet: each call, and its conversation."""
    calls = find(store, "Communication", ("category", f"{COMMUNICATION_CATEGORY}|{CRITICAL_RESULT}"),
                 ("sent", f"ge{fhir_instant(now - LOOK_BACK)}"), ("sent", f"le{fhir_instant(now - after)}"))
    out = []
    for call in calls:
        if call.get("inResponseTo") or store.read("Communication", escalation_id(str(call["id"]))) is not None:
            continue  # a reply; or passed on already (once: even if that was deleted since)
        talk = conversation(store, str(call["id"]))
        if talk.waiting:
            out.append((call, talk))
    return out


def _ward_of(store: Store, call: Conversation) -> str | None:
    for reference, _name in call.first.to:
        service_id = ref_id({"reference": reference}, "HealthcareService")
        service = read(store, "HealthcareService", service_id) if service_id else None
        for place in (service or {}).get("location") or ():
            ward = ref_id(place, "Location")
            if ward:
                return ward
    return None


def _prescriber(store: Store, call: Conversation) -> Physician | None:
    """The physician who ordered the result, when the lab's order names one the store knows (ORC-12, OBR-16)."""
    report = read(store, "DiagnosticReport", call.first.critical_report) if call.first.critical_report else None
    for based in (report or {}).get("basedOn") or ():
        order_id = ref_id(based, "ServiceRequest")
        requester = (read(store, "ServiceRequest", order_id) or {}).get("requester") if order_id else None
        who = ref_id(requester, "Practitioner")
        if who:
            name = person_name(read(store, "Practitioner", who)) or str((requester or {}).get("display", ""))
            return Physician(f"Practitioner/{who}", name, "prescripteur")
    return None


def physician_for(store: Store, call: Conversation, now: dt.datetime) -> Physician | None:
    """Who the call goes to now: the ward's physician on call, else the physician who ordered it, else the physician
    of the patient's stay."""
    ward = _ward_of(store, call)
    if ward is not None:
        for shift in shifts(store, now, now + dt.timedelta(minutes=1), ward_id=ward):
            if shift.practitioner_id:
                return Physician(f"Practitioner/{shift.practitioner_id}", shift.who, f"{shift.label.lower() or 'garde'}")
    prescriber = _prescriber(store, call)
    if prescriber is not None:
        return prescriber
    if call.first.patient_id:
        for stay in find(store, "Encounter", ("subject", f"Patient/{call.first.patient_id}"), ("status", "in-progress")):
            for participant in stay.get("participant") or ():
                who = ref_id(participant.get("individual"), "Practitioner")
                if who:
                    name = person_name(read(store, "Practitioner", who)) or str(participant["individual"].get("display", ""))
                    return Physician(f"Practitioner/{who}", name, "médecin du séjour")
    return None


def passed_on(call: Resource, physician: Physician, after: dt.timedelta) -> Resource:
    """The reply that passes a call on: from the call's sender, to the physician and the call's recipients."""
    first = message(call)
    text = (f"Sans prise en charge par le service après {_delay(after)}, transmis à {physician.name} ({physician.why}). "
            + first.text)
    sent = first.sent + after
    resource: Resource = {
        "resourceType": "Communication", "id": escalation_id(str(call["id"])), "status": "completed",
        "category": call["category"], "priority": "urgent", "sent": fhir_instant(sent), "sender": call["sender"],
        "recipient": [{"reference": physician.reference, "display": physician.name}, *call.get("recipient", [])],
        "inResponseTo": [{"reference": f"Communication/{call['id']}"}],
        "payload": [{"contentString": text}],
    }
    for key in ("subject", "about"):
        if key in call:
            resource[key] = call[key]
    return resource


def escalate(store: Store, now: dt.datetime, after: dt.timedelta = ESCALATE_AFTER, *,
             stranded: set[str] | None = None) -> list[str]:
    """Pass on every overdue call that has a physician to go to; the ids of the replies written. The calls with no one
    to go to are put in `stranded` (in place of those of the last round), and logged once each; they are tried again at each round (a
    rota may be filled in meanwhile)."""
    written = []
    known = set(stranded or ())
    if stranded is not None:
        stranded.clear()
    for call, talk in overdue(store, now, after):
        physician = physician_for(store, talk, now)
        if physician is None:
            if talk.first.id not in known:
                log.warning("a critical result's call has waited %s and has no physician to go to: no one on call for "
                            "the ward, no prescriber known, no physician on the stay (Communication/%s)", _delay(after), talk.first.id)
            if stranded is not None:
                stranded.add(talk.first.id)
            continue
        reply = passed_on(call, physician, after)

        def save(tx: Session, reply: Resource = reply) -> bool:
            if tx.read("Communication", reply["id"]) is not None:  # another process, or the other node's, is there
                return False
            operations.update(tx, "Communication", reply["id"], reply)
            return True

        if store.write(save):
            written.append(str(reply["id"]))
            log.info("a critical result's call waited %s: passed on to a physician (Communication/%s)", _delay(after), reply["id"])
    return written


class Escalation(BackgroundLoop):
    """The node's round of overdue calls, every CHECK_EVERY, in one process per store (a lease)."""

    def __init__(self, store: Store, after: dt.timedelta = ESCALATE_AFTER, *, active: Callable[[], bool] = lambda: True) -> None:
        self.store = store
        self.after = after
        self.active = active  # a site node makes the rounds only while it cannot reach the central site
        self.every = min(CHECK_EVERY, max(1.0, after.total_seconds() / 5))  # a short delay (a drill's): looked at 5 times over
        self.me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.holding = False
        self.passed_on = 0  # since the start, by this process
        self.last_at: float | None = None
        self.problem: str | None = None
        self.stranded: set[str] = set()  # calls overdue with no physician to go to, at the last round

    def round(self) -> None:
        if not self.active():
            self.holding = False
            return
        self.holding = self.store.write(lambda tx: tx.lease(STATE, "round", self.me, self.every * 3))
        if self.holding:
            self.passed_on += len(escalate(self.store, dt.datetime.now(dt.UTC), self.after, stranded=self.stranded))
        self.last_at, self.problem = time.time(), None

    async def run(self) -> None:
        while True:
            try:
                await run_in_threadpool(self.round)
            except StoreError as err:
                self.problem = str(err)
            except Exception:
                log.exception("passing on the critical results' calls failed")
                self.problem = "internal error (see the server's log)"
            await asyncio.sleep(self.every)

    def status(self) -> dict[str, Any]:
        return {"after_minutes": self.after.total_seconds() / 60, "passed_on": self.passed_on, "stranded": len(self.stranded),
                "this_process": self.holding,
                "last_at": utc_second(self.last_at), "problem": self.problem}

