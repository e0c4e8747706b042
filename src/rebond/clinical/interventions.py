"""The pharmacy's interventions (« interventions pharmaceutiques »): a problem found in a prescription, what the
pharmacist proposes, and the prescriber's answer, coded as the French society of clinical pharmacy codes them (SFPC).

A pharmacist reading a prescription that is wrong for this patient (a dose too high for their kidneys, an interaction,
a route they cannot take) does not validate it: they tell the prescriber what the problem is and what they propose,
and the prescriber accepts or refuses. The hospital counts them, and how many were accepted. Here:

    DetectedIssue.status        preliminary while the prescriber has not answered; final once they have
    DetectedIssue.code          the problem: urn:rebond:sfpc-problem|1.4 « Surdosage » (PROBLEMS)
    DetectedIssue.severity      high for an urgent one, else moderate
    DetectedIssue.patient       the patient
    DetectedIssue.implicated    the MedicationRequest
    DetectedIssue.author        the pharmacist (their Practitioner, or their name for the pharmacy's account)
    DetectedIssue.detail        their words, if any
    DetectedIssue.mitigation    [0] the proposal: urn:rebond:sfpc-intervention|2.7 « Adaptation posologique »
                                [1] the answer: urn:rebond:intervention-outcome|accepted or refused, by the prescriber

With it, in the same transaction, a message of the messaging (clinical/messaging.py), from the
pharmacy, about the patient, to the prescriber (their box), or to the patient's ward when the
prescription names no prescriber the store knows; `about` the DetectedIssue. The prescriber
answers on the chart (« Accepter », « Refuser »), which also answers the message; accepting changes
nothing by itself: they then correct or stop the prescription.
"""
from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from rebond.clinical import messaging
from rebond.clinical.medication import prescription
from rebond.clinical.recording import InvalidForm
from rebond.clinical.records import Clinician, Entry, Resource, any_of, fhir_instant, find, instant, read, ref_id
from rebond.fhir import operations
from rebond.store.base import NotFound, PreconditionFailed, Session, Store
from rebond.web.i18n import N_

PROBLEM_SYSTEM = "urn:rebond:sfpc-problem"
INTERVENTION_SYSTEM = "urn:rebond:sfpc-intervention"
OUTCOME_SYSTEM = "urn:rebond:intervention-outcome"
#: the problems (SFPC 1.1–1.10): code, how the app names it (translated), how the record names it (French, as coded)
PROBLEMS = (
    ("1.1", N_("Not as the guidelines say, or contraindicated"), "Non-conformité aux référentiels ou contre-indication"),
    ("1.2", N_("Indication not treated"), "Indication non traitée"),
    ("1.3", N_("Dose too low"), "Sous-dosage"),
    ("1.4", N_("Dose too high"), "Surdosage"),
    ("1.5", N_("Medication not indicated"), "Médicament non indiqué"),
    ("1.6", N_("Interaction"), "Interaction"),
    ("1.7", N_("Adverse effect"), "Effet indésirable"),
    ("1.8", N_("Route or administration not suited"), "Voie et/ou administration inappropriée"),
    ("1.9", N_("Treatment not received"), "Traitement non reçu"),
    ("1.10", N_("Monitoring to follow"), "Monitorage à suivre"),
)
#: what the pharmacist proposes (SFPC 2.1–2.7)
PROPOSALS = (
    ("2.1", N_("Add a medication"), "Ajout (prescription nouvelle)"),
    ("2.2", N_("Stop"), "Arrêt"),
    ("2.3", N_("Substitute or exchange"), "Substitution / échange"),
    ("2.4", N_("Choose the route"), "Choix de la voie d'administration"),
    ("2.5", N_("Therapeutic monitoring"), "Suivi thérapeutique"),
    ("2.6", N_("Better ways of giving it"), "Optimisation des modalités d'administration"),
    ("2.7", N_("Adjust the dose"), "Adaptation posologique"),
)
OUTCOMES = {"accepted": "Acceptée par le prescripteur", "refused": "Refusée par le prescripteur"}
#: the extension that names the message which told the prescriber (its id)
_MESSAGE_URL = "urn:rebond:intervention-message"
#: the longest text a pharmacist writes with an intervention
MAX_TEXT = 1000
_NAMES = {code: name for code, name, _fr in (*PROBLEMS, *PROPOSALS)}


def name_of(code: str) -> str:
    """How the app names a problem or proposal (to translate): « Dose too high »."""
    return _NAMES.get(code, code)


@dataclass(frozen=True)
class Intervention:
    id: str
    request_id: str
    problem: str  # its SFPC code
    proposal: str
    text: str
    author: str
    at: dt.datetime | None
    urgent: bool
    outcome: str | None = None  # accepted, refused; None while unanswered
    answered_by: str = ""
    answered_at: dt.datetime | None = None
    message_id: str | None = None

    @property
    def problem_name(self) -> str:
        return name_of(self.problem)

    @property
    def proposal_name(self) -> str:
        return name_of(self.proposal)

    @property
    def outcome_text(self) -> str:
        """Where it stands, to translate."""
        return {"accepted": N_("accepted by the prescriber"), "refused": N_("refused by the prescriber")}.get(
            self.outcome or "", N_("awaiting the prescriber's answer"))


def _coded(system: str, table: tuple[tuple[str, str, str], ...], code: str) -> Resource:
    french = next(fr for c, _en, fr in table if c == code)
    return {"coding": [{"system": system, "code": code, "display": french}], "text": french}


def _code(concept: Any, system: str) -> str:
    return next((str(c.get("code")) for c in (concept or {}).get("coding") or () if c.get("system") == system), "")


def intervention(issue: Resource) -> Intervention:
    mitigations = issue.get("mitigation") or []
    proposal = next((_code(m.get("action"), INTERVENTION_SYSTEM) for m in mitigations if _code(m.get("action"), INTERVENTION_SYSTEM)), "")
    answer = next((m for m in mitigations if _code(m.get("action"), OUTCOME_SYSTEM)), None)
    return Intervention(
        str(issue["id"]), ref_id(next(iter(issue.get("implicated") or ()), None), "MedicationRequest") or "",
        _code(issue.get("code"), PROBLEM_SYSTEM), proposal, str(issue.get("detail") or ""),
        str((issue.get("author") or {}).get("display", "")), instant(issue.get("identifiedDateTime")), issue.get("severity") == "high",
        _code(answer.get("action"), OUTCOME_SYSTEM) if answer else None,
        str((answer.get("author") or {}).get("display", "")) if answer else "", instant(answer.get("date")) if answer else None,
        next((str(e.get("valueString")) for e in issue.get("extension") or () if e.get("url") == _MESSAGE_URL), None),
    )


def _recipient(store: Store, request: Resource) -> messaging.Box | None:
    """Who is told: the prescriber, when the store knows them; else the ward the patient is in now."""
    prescriber = ref_id(request.get("requester"), "Practitioner")
    if prescriber is not None:
        found = messaging.box(store, f"Practitioner/{prescriber}")
        if found is not None:
            return found
    patient = ref_id(request.get("subject"), "Patient")
    for stay in find(store, "Encounter", ("subject", f"Patient/{patient}"), ("status", "in-progress")) if patient else ():
        for place in stay.get("location") or ():
            ward = ref_id(place.get("location"), "Location")
            if place.get("status", "active") == "active" and ward:
                team = messaging.ward_box(store, ward)
                if team is not None:
                    return team
    return None


def propose(store: Store, request_id: str, form: Mapping[str, str], clinician: Clinician, now: dt.datetime) -> str:
    """Record an intervention on a prescription (fields: problem, proposal, text, urgent, as, entry) and tell the
    prescriber; its id. Problems as message ids (InvalidForm); NotFound for no active prescription."""
    request = read(store, "MedicationRequest", request_id)
    if request is None or request.get("status") != "active":
        raise NotFound(f"no active MedicationRequest/{request_id}")
    problems: dict[str, str] = {}
    problem, proposal = (form.get("problem") or "").strip(), (form.get("proposal") or "").strip()
    if problem not in {c for c, _n, _f in PROBLEMS}:
        problems["problem"] = "choose-one"
    if proposal not in {c for c, _n, _f in PROPOSALS}:
        problems["proposal"] = "choose-one"
    text = (form.get("text") or "").strip().replace("\r\n", "\n")
    if len(text) > MAX_TEXT:
        problems["text"] = f"too-long:{MAX_TEXT}"
    to = _recipient(store, request)
    if to is None:
        problems["problem"] = problems.get("problem") or "no-one-to-tell"
    author = messaging.author_of(store, clinician, form, problems)
    if problems:
        raise InvalidForm(problems)
    assert to is not None
    entry = Entry.of(form.get("entry"))
    urgent = form.get("urgent") == "1"
    issue_id, message_id = entry.id("intervention"), entry.id("message")
    rx = prescription(request)
    issue: Resource = {
        "resourceType": "DetectedIssue", "id": issue_id, "status": "preliminary",
        "code": _coded(PROBLEM_SYSTEM, PROBLEMS, problem), "severity": "high" if urgent else "moderate",
        "patient": {"reference": str(request["subject"]["reference"])},
        "implicated": [{"reference": f"MedicationRequest/{request_id}", "display": rx.medication}],
        "identifiedDateTime": fhir_instant(now), "author": clinician.reference(),
        "mitigation": [{"action": _coded(INTERVENTION_SYSTEM, PROPOSALS, proposal), "date": fhir_instant(now),
                        "author": clinician.reference()}],
        "extension": [{"url": _MESSAGE_URL, "valueString": message_id}],
    }
    if text:
        issue["detail"] = text
    said = (f"Intervention pharmaceutique — {rx.medication} ({rx.dose}) : {issue['code']['text']}. "
            f"Proposition : {issue['mitigation'][0]['action']['text']}." + (f"\n{text}" if text else "")
            + "\nRépondez sur le dossier du patient (« Accepter » ou « Refuser »).")
    patient = read(store, "Patient", str(ref_id(request["subject"], "Patient")))
    note = messaging.communication(message_id, messaging.MESSAGE, author, [{"reference": to.reference, "display": to.name}], said, now,
                                   urgent=urgent, patient=patient)
    note["about"] = [{"reference": f"DetectedIssue/{issue_id}"}]

    def save(tx: Session) -> None:
        if entry.recorded(tx, "DetectedIssue", "intervention"):
            return  # the form sent twice
        operations.create(tx, "DetectedIssue", issue, resource_id=issue_id)
        operations.create(tx, "Communication", note, resource_id=message_id)

    store.write(save)
    return issue_id


def answer(store: Store, issue_id: str, accepted: bool, clinician: Clinician, now: dt.datetime) -> Intervention:
    """The prescriber's answer, once (a second answer, by anyone, leaves the first: PreconditionFailed); it also answers
    the pharmacy's message, in its conversation."""

    def save(tx: Session) -> Resource:
        stored = tx.read("DetectedIssue", issue_id)
        if stored is None or stored.deleted or stored.body is None:
            raise NotFound(f"no DetectedIssue/{issue_id}")
        issue: Resource = orjson.loads(stored.body)
        if intervention(issue).outcome is not None:
            raise PreconditionFailed(f"DetectedIssue/{issue_id} was answered already")
        outcome = "accepted" if accepted else "refused"
        issue["mitigation"] = [*issue.get("mitigation", []), {
            "action": {"coding": [{"system": OUTCOME_SYSTEM, "code": outcome, "display": OUTCOMES[outcome]}], "text": OUTCOMES[outcome]},
            "date": fhir_instant(now), "author": clinician.reference()}]
        issue["status"] = "final"
        operations.update(tx, "DetectedIssue", issue_id, issue, if_match=stored.version)
        return issue

    issue = store.write(save)
    done = intervention(issue)
    if done.message_id is not None:
        # the message gone, or an account that writes for no one: the answer stands without it
        with contextlib.suppress(NotFound, InvalidForm):
            messaging.answer(store, done.message_id, {"text": f"Intervention {OUTCOMES[str(done.outcome)].lower()}."}, clinician, now)
    return done


def of_prescriptions(store: Store, request_ids: Iterable[str]) -> dict[str, list[Intervention]]:
    """The interventions on each prescription, the latest first."""
    ids = list(dict.fromkeys(request_ids))
    out: dict[str, list[Intervention]] = {}
    for start in range(0, len(ids), 500):
        for issue in find(store, "DetectedIssue", ("implicated", any_of(f"MedicationRequest/{r}" for r in ids[start:start + 500]))):
            if _code(issue.get("code"), PROBLEM_SYSTEM):
                found = intervention(issue)
                out.setdefault(found.request_id, []).append(found)
    oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
    return {rid: sorted(found, key=lambda i: i.at or oldest, reverse=True) for rid, found in out.items()}


@dataclass(frozen=True)
class Figures:
    proposed: int
    accepted: int
    refused: int

    @property
    def unanswered(self) -> int:
        return self.proposed - self.accepted - self.refused


def figures(store: Store, since: dt.datetime) -> Figures:
    """The interventions proposed since, and how they were answered (the hospital's measure of its pharmacy's work)."""
    found = [intervention(i) for i in find(store, "DetectedIssue", ("identified", f"ge{fhir_instant(since)}"))
             if _code(i.get("code"), PROBLEM_SYSTEM)]
    return Figures(len(found), sum(1 for i in found if i.outcome == "accepted"), sum(1 for i in found if i.outcome == "refused"))
