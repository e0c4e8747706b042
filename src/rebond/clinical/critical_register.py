"""The register of the lab's calls for critical results: whom each was told to, when, and who took it in hand.

A medical lab must be able to show, for every critical result, whom it told, when, and when
someone who could act on it had it (NF EN ISO 15189). On paper that is the register by the lab's
telephone, and the ward's « je note » scribbled on the request slip. In Rebond the call is written
with the result (hl7/critical.py); the ward's answer or « Je m'en occupe » is a message of the
messaging (clinical/messaging.py); the passing on to a physician after the delay is a reply from the
lab (clinical/escalation.py). The register reads them back for a period, one line per call:

- the call: when it was sent, by which lab, to which ward (or to the lab's own box, to ring the
  prescriber of a patient in no ward), about whom, and its text;
- who took it in hand first, when, and the delay since the call; by an answer, or « Je m'en occupe »;
- whether it was passed on to a physician, to whom and when;
- its state now: taken in hand (in time, or late), or still waiting.

And the figures a quality review asks for: how many calls, how many taken in hand within the
delay, the median delay, how many passed on, how many wait now.

Its answers are found by the patient the call is about: every answer Rebond writes names the
patient of the conversation. The web app shows it (« Résultats critiques ») and gives it as CSV.
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rebond.clinical.conventions import COMMUNICATION_CATEGORY, HOSPITAL_TZ
from rebond.clinical.escalation import ESCALATE_AFTER, escalation_id
from rebond.clinical.messaging import ANSWER_SKEW, CATEGORIES, CRITICAL_RESULT, Conversation, Message, is_hospital_service, message
from rebond.clinical.records import Resource, any_of, fhir_instant, find, ref_id
from rebond.hl7.critical import called, is_correction
from rebond.store.base import Store, StoreError

#: the longest period one register reads (a quarter: a quality review's)
MAX_DAYS = 92
#: how many patients one search for the answers names
_PATIENTS_PER_SEARCH = 500


@dataclass(frozen=True)
class Call:
    """One call for a critical result, as it stands."""

    conversation: Conversation
    to_ward: bool  # False: the call went to the lab's own box (a patient in no ward: ring the prescriber)
    passed_on: Message | None  # the lab's reply that passed it on to a physician
    after: dt.timedelta  # the delay after which a call not taken in hand is passed on

    @property
    def first(self) -> Message:
        return self.conversation.first

    @property
    def corrected(self) -> bool:
        """The call for a correction that changed a critical value."""
        return is_correction(self.first.text)

    @property
    def result(self) -> str:
        """What was called: « Potassium 6,8 mmol/L (HH ; normales 3,5–5), prélevé le 23/11 à 11:00. »"""
        return called(self.first.text)

    @property
    def taken(self) -> Message | None:
        """The first answer, or « Je m'en occupe », from someone other than the caller."""
        return self.conversation.taken_by

    @property
    def delay(self) -> dt.timedelta | None:
        return self.taken.sent - self.first.sent if self.taken is not None else None

    @property
    def late(self) -> bool:
        """Taken in hand after the delay."""
        return self.delay is not None and self.delay > self.after

    @property
    def physician(self) -> str:
        """Whom it was passed on to (the reply's first recipient)."""
        return self.passed_on.to[0][1] if self.passed_on is not None and self.passed_on.to else ""

    @property
    def state(self) -> str:
        """taken (in time), taken-late, passed-on (and waiting), waiting."""
        if self.taken is not None:
            return "taken-late" if self.late else "taken"
        return "passed-on" if self.passed_on is not None else "waiting"


@dataclass(frozen=True)
class Register:
    since: dt.datetime
    until: dt.datetime
    after: dt.timedelta
    calls: list[Call]  # the newest first

    @property
    def taken(self) -> list[Call]:
        return [c for c in self.calls if c.taken is not None]

    @property
    def in_time(self) -> int:
        return sum(1 for c in self.taken if not c.late)

    @property
    def waiting(self) -> int:
        return len(self.calls) - len(self.taken)

    @property
    def passed_on(self) -> int:
        return sum(1 for c in self.calls if c.passed_on is not None)

    @property
    def median_delay(self) -> dt.timedelta | None:
        seconds = [c.delay.total_seconds() for c in self.taken if c.delay is not None]
        return dt.timedelta(seconds=statistics.median(seconds)) if seconds else None

    def figures(self) -> dict[str, Any]:
        """The counts, without who or whom (for the status page, which the crisis cell reads)."""
        median = self.median_delay
        return {"calls": len(self.calls), "taken": len(self.taken), "taken_in_time": self.in_time, "waiting": self.waiting,
                "passed_on": self.passed_on, "median_minutes": round(median.total_seconds() / 60, 1) if median is not None else None}


def _is_call(resource: Resource) -> bool:
    return not resource.get("inResponseTo") and any(
        c.get("system") == COMMUNICATION_CATEGORY and c.get("code") == CRITICAL_RESULT
        for concept in resource.get("category") or () for c in concept.get("coding") or ())


def _answers(store: Store, calls: list[Message], since: dt.datetime) -> dict[str, list[Message]]:
    """The answers to each call, in order: the messages about the calls' patients since, that answer one of them."""
    wanted = {c.id for c in calls}
    patients = sorted({c.patient_id for c in calls if c.patient_id})
    out: dict[str, list[Message]] = {}
    for start in range(0, len(patients), _PATIENTS_PER_SEARCH):
        about = any_of(f"Patient/{p}" for p in patients[start:start + _PATIENTS_PER_SEARCH])
        for answer in map(message, find(store, "Communication", ("subject", about), ("category", CATEGORIES),
                                        ("sent", f"ge{fhir_instant(since)}"))):
            if answer.answers in wanted:
                out.setdefault(answer.answers, []).append(answer)
    return {key: sorted(found, key=lambda m: m.sent) for key, found in out.items()}


def _services(store: Store, boxes: Iterable[str]) -> dict[str, Resource]:
    """The services named, by reference."""
    ids = sorted({rid for b in boxes if (rid := ref_id({"reference": b}, "HealthcareService"))})
    return {f"HealthcareService/{s['id']}": s for s in find(store, "HealthcareService", ("_id", ",".join(ids)))} if ids else {}


def register(store: Store, since: dt.datetime, until: dt.datetime, *, hospital: str | None = None,
             after: dt.timedelta | None = ESCALATE_AFTER) -> Register:
    """The calls sent from `since` to `until` (both included, to the second), of one hospital (an Organization id: the
    call's lab's or ward's) or of all, the newest first. `after`: the delay after which a call is passed on (the node's
    `--escalate-after`); None, never."""
    delay = after if after is not None else dt.timedelta.max
    found = [r for r in find(store, "Communication", ("category", f"{COMMUNICATION_CATEGORY}|{CRITICAL_RESULT}"),
                             ("sent", f"ge{fhir_instant(since)}"), ("sent", f"le{fhir_instant(until)}")) if _is_call(r)]
    firsts = [message(r) for r in found]
    services = _services(store, [ref for m in firsts for ref in (m.author_ref, *(r for r, _n in m.to)) if ref])
    if hospital is not None:
        firsts = [m for m in firsts if hospital in {ref_id(services.get(ref or "", {}).get("providedBy"), "Organization")
                                                   for ref in (m.author_ref, *(r for r, _n in m.to))}]
    answers = _answers(store, firsts, since - ANSWER_SKEW)
    calls = []
    for first in firsts:
        after_it = answers.get(first.id, [])
        passed = next((m for m in after_it if m.id == escalation_id(first.id)), None)
        # a call goes to the ward's service; to the lab's own when the patient is in no ward
        to_ward = not any(is_hospital_service(services.get(ref or "", {}), "LAB") for ref, _name in first.to)
        calls.append(Call(Conversation(first, after_it), to_ward, passed, delay))
    calls.sort(key=lambda c: c.first.sent, reverse=True)
    return Register(since, until, delay, calls)


class LastDay:
    """The register's figures over the last 24 hours, for the status page: counted again at most every `every` seconds,
    since the status is asked often (monitoring, the crisis cell's screen)."""

    def __init__(self, store: Store, after: dt.timedelta | None, every: float = 15.0) -> None:
        self.store, self.after, self.every = store, after, every
        self._kept: tuple[float, dict[str, Any]] | None = None

    def figures(self) -> dict[str, Any] | None:
        """None when the store cannot be read now."""
        if self._kept is not None and self._kept[0] > time.monotonic():
            return self._kept[1]
        now = dt.datetime.now(dt.UTC)
        try:
            figures = register(self.store, now - dt.timedelta(days=1), now, after=self.after).figures()
        except StoreError:
            return None
        self._kept = (time.monotonic() + self.every, figures)
        return figures


def _local(moment: dt.datetime | None) -> str:
    return moment.astimezone(HOSPITAL_TZ).strftime("%Y-%m-%d %H:%M:%S") if moment is not None else ""


def _minutes(delay: dt.timedelta | None) -> str:
    return f"{delay.total_seconds() / 60:.1f}".replace(".", ",") if delay is not None else ""


CSV_COLUMNS = ("envoi", "laboratoire", "destinataire", "patient", "patient_id", "resultat", "correction", "etat", "pris_en_charge_par",
               "pris_en_charge_a", "delai_min", "par", "transmis_a", "transmis_le", "appel_id")
_HOW = {True: "« Je m'en occupe »", False: "réponse"}
_STATES = {"taken": "pris en charge", "taken-late": "pris en charge après le délai", "passed-on": "transmis, en attente",
           "waiting": "en attente"}


def as_csv(found: Register) -> str:
    """The register as CSV for a spreadsheet (French Excel: semicolons, a BOM, local times, minutes with a comma)."""
    out = io.StringIO()
    out.write("\ufeff")
    writer = csv.writer(out, delimiter=";", lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for call in found.calls:
        taken = call.taken
        writer.writerow([
            _local(call.first.sent), call.first.author, "; ".join(name for _ref, name in call.first.to), call.first.patient,
            call.first.patient_id or "", call.result, "oui" if call.corrected else "", _STATES[call.state], taken.author if taken else "",
            _local(taken.sent if taken else None), _minutes(call.delay), _HOW[taken.taken] if taken else "",
            call.physician, _local(call.passed_on.sent if call.passed_on else None), call.first.id,
        ])
    return out.getvalue()
