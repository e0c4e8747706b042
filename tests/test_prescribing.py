"""Prescribing: the formulary, a new prescription and its doses, stopping one, and the allergy check (both engines)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from rebond.clinical.census import Allergy, BedLine, allergies_by_patient, ward_census
from rebond.clinical.chart import patient_chart
from rebond.clinical.conventions import HOSPITAL_TZ, SNOMED
from rebond.clinical.medication import dose_schedule
from rebond.clinical.prescribing import acknowledge, allergy_conflicts, formulary, parse_times, prescribe, stop
from rebond.clinical.recording import InvalidForm
from rebond.clinical.records import Clinician, Entry, find, read
from rebond.fhir import operations
from rebond.seed.demo import DemoSize, seed_demo
from rebond.seed.vocabulary import DRUGS, MORE_DRUGS
from rebond.store import open_store
from rebond.store.base import NotFound, PreconditionFailed, Store

NOW = dt.datetime(2026, 11, 23, 3, 10, tzinfo=HOSPITAL_TZ)  # the night: a physician on call prescribes
DOCTOR = Clinician("doctor", "Dr MARTIN Paul", "p-martin")
NURSE = Clinician("nurse", "LEROY Hélène")
PENICILLIN = Allergy("Pénicillines", "high", ((SNOMED, "764146007"),))


def test_times_are_read_as_wards_write_them() -> None:
    assert parse_times("8h, 20h30") == ["08:00", "20:30"]
    assert parse_times("08:00 ; 14:00 et 20:00") == ["08:00", "14:00", "20:00"]
    assert parse_times("20h 8h 8h") == ["08:00", "20:00"], "in order, once each"
    assert parse_times("") == []
    for wrong in ("25h", "8h61", "matin", "8.30"):
        with pytest.raises(ValueError):
            parse_times(wrong)


def test_an_allergy_is_met_by_code_class_or_name() -> None:
    amoxicillin = {("http://www.whocc.no/atc", "J01CA04"), (SNOMED, "372687004"), (SNOMED, "764146007")}
    assert allergy_conflicts([PENICILLIN], amoxicillin, "Amoxicilline 1 g comprimé") == [PENICILLIN], "a penicillin"
    assert allergy_conflicts([PENICILLIN], {(SNOMED, "387406002")}, "Cotrimoxazole 800 mg") == []
    codeine = Allergy("Codéine", "low")  # typed without a code
    assert allergy_conflicts([codeine], set(), "Codéine/paracétamol 30 mg/500 mg comprimé") == [codeine], "named in the name"
    assert allergy_conflicts([Allergy("Iode (produits de contraste)", "high")], set(), "Iohexol 300 mg I/mL") == []
    assert allergy_conflicts([Allergy("Latex", "low")], set(), "Paracétamol 1 g") == []


@pytest.fixture
def seeded(store: Store) -> Store:
    seed_demo(store, seed=2, size=DemoSize(1, 1, 6), now=NOW - dt.timedelta(hours=20))
    return store


def _inpatient(store: Store) -> tuple[str, str]:
    stay = find(store, "Encounter", ("status", "in-progress"))[0]
    return stay["subject"]["reference"].split("/")[1], stay["id"]


def _census_line(store: Store, patient: str) -> BedLine:
    ward = next(w for w in find(store, "Location") if w.get("alias"))
    return next(b for b in ward_census(store, ward["id"], NOW).beds if b.patient is not None and b.patient.id == patient)


def _line(store: Store, name: str) -> str:
    return next(m.id for m in formulary(store) if m.name == name)


def test_the_seed_makes_the_formulary_once(seeded: Store) -> None:
    names = [m.name for m in formulary(seeded)]
    assert sorted(names) == sorted({d.name for d in (*DRUGS, *MORE_DRUGS)})
    from rebond.seed.demo import add_formulary

    assert add_formulary(seeded) == 0, "made where missing only"


def test_a_prescription_is_written_once_and_its_doses_are_scheduled(seeded: Store) -> None:
    patient, stay = _inpatient(seeded)
    form = {"medication": _line(seeded, "Furosémide 40 mg comprimé"), "dose": "1 comprimé", "route": "Voie orale",
            "times": "8h, 3h", "days": "5", "note": "Contrôle de la kaliémie à J2", "entry": str(Entry.new())}
    written = prescribe(seeded, patient, form, DOCTOR, NOW, [], stay)
    assert prescribe(seeded, patient, form, DOCTOR, NOW, [], stay) == written, "the form sent twice: recorded once"
    request = read(seeded, "MedicationRequest", written)
    assert request is not None and request["status"] == "active" and request["encounter"]["reference"] == f"Encounter/{stay}"
    assert request["requester"] == {"display": "Dr MARTIN Paul", "reference": "Practitioner/p-martin"}
    assert request["dosageInstruction"][0]["text"] == "1 comprimé à 03:00, 08:00 pendant 5 jours"
    assert request["note"][0]["text"] == "Contrôle de la kaliémie à J2"
    chart = patient_chart(seeded, patient, NOW)
    rx = next(r for r in chart.prescriptions if r.id == written)
    assert rx.until is not None and rx.until - rx.authored == dt.timedelta(days=5)  # type: ignore[operator]
    doses = {d.due.strftime("%H:%M"): d.state for d in chart.doses if d.prescription.id == written}
    assert doses == {"03:00": "due", "08:00": "planned"}, "the dose of the hour is due at once"
    line = _census_line(seeded, patient)
    assert line.new_prescriptions == 1 and line.doses_due >= 1, "the census tells the nurses"
    first = acknowledge(seeded, written, NURSE, NOW + dt.timedelta(minutes=2))
    assert acknowledge(seeded, written, Clinician("other", "MOREAU Inès"), NOW + dt.timedelta(minutes=3)) == first, "read once"
    assert first.by == "LEROY Hélène" and len(find(seeded, "Task", ("focus", f"MedicationRequest/{written}"))) == 1
    assert _census_line(seeded, patient).new_prescriptions == 0, "read: no longer new on the census"
    seen_rx = next(r for r in patient_chart(seeded, patient, NOW).prescriptions if r.id == written)
    assert seen_rx.seen is not None and seen_rx.seen.by == "LEROY Hélène"
    later = dose_schedule([rx], [], NOW + dt.timedelta(days=4), NOW + dt.timedelta(days=7), NOW)
    assert [d.due.strftime("%d %H:%M") for d in later] == ["27 08:00", "28 03:00"], "none after five days (28 at 03:10)"


def test_a_prescription_when_needed_has_no_set_times(seeded: Store) -> None:
    patient, stay = _inpatient(seeded)
    form = {"medication": _line(seeded, "Tramadol 50 mg gélule"), "dose": "1 gélule", "route": "Voie orale",
            "as_needed": "yes", "indication": "douleur EVA > 4", "entry": str(Entry.new())}
    written = prescribe(seeded, patient, form, DOCTOR, NOW, [], stay)
    rx = next(r for r in patient_chart(seeded, patient, NOW).prescriptions if r.id == written)
    assert (rx.as_needed, rx.indication, rx.times, rx.dose) == (True, "douleur EVA > 4", (), "1 gélule si besoin (douleur EVA > 4)")


def test_a_form_with_problems_writes_nothing(seeded: Store) -> None:
    patient, stay = _inpatient(seeded)
    before = len(find(seeded, "MedicationRequest"))
    line = _line(seeded, "Paracétamol 1 g comprimé")
    for form, problems in (
        ({"medication": "not-a-line", "dose": "1", "route": "Voie orale", "times": "8h"}, {"medication": "not-in-formulary"}),
        ({"medication": line, "dose": " ", "route": "Voie orale", "times": "8h"}, {"dose": "required"}),
        ({"medication": line, "dose": "1 g", "route": "Par magie", "times": "8h"}, {"route": "choose-one"}),
        ({"medication": line, "dose": "1 g", "route": "Voie orale", "times": ""}, {"times": "times-or-as-needed"}),
        ({"medication": line, "dose": "1 g", "route": "Voie orale", "times": "le matin"}, {"times": "not-times"}),
        ({"medication": line, "dose": "1 g", "route": "Voie orale", "times": "8h", "days": "0"}, {"days": "out-of-range:1:365"}),
    ):
        with pytest.raises(InvalidForm) as refused:
            prescribe(seeded, patient, form, DOCTOR, NOW, [], stay)
        assert refused.value.problems == problems
    with pytest.raises(NotFound):
        prescribe(seeded, "nobody", {"medication": line}, DOCTOR, NOW, [])
    assert len(find(seeded, "MedicationRequest")) == before


def test_a_known_allergy_stops_the_prescription_until_the_prescriber_maintains_it(seeded: Store) -> None:
    patient, stay = _inpatient(seeded)
    seeded.write(lambda tx: operations.create(tx, "AllergyIntolerance", {
        "resourceType": "AllergyIntolerance", "patient": {"reference": f"Patient/{patient}"}, "criticality": "high",
        "code": {"coding": [{"system": SNOMED, "code": "764146007"}], "text": "Pénicillines"}}))
    allergies = allergies_by_patient(seeded, [patient])[patient]
    form = {"medication": _line(seeded, "Amoxicilline 1 g comprimé"), "dose": "1 comprimé", "route": "Voie orale",
            "times": "8h 16h 0h", "entry": str(Entry.new())}
    with pytest.raises(InvalidForm) as refused:
        prescribe(seeded, patient, form, DOCTOR, NOW, allergies, stay)
    assert refused.value.problems == {"medication": "allergy:Pénicillines"}
    assert not find(seeded, "DetectedIssue")
    written = prescribe(seeded, patient, {**form, "despite_allergy": "yes"}, DOCTOR, NOW, allergies, stay)
    issue = find(seeded, "DetectedIssue", ("implicated", f"MedicationRequest/{written}"))
    assert len(issue) == 1 and issue[0]["code"]["coding"][0]["code"] == "ALGY" and issue[0]["severity"] == "high"
    assert issue[0]["mitigation"][0]["author"]["display"] == "Dr MARTIN Paul"
    rx = next(r for r in patient_chart(seeded, patient, NOW).prescriptions if r.id == written)
    assert rx.alerts == ("Pénicillines",), "the chart says it too, as for any prescription that meets an allergy"
    assert "Amoxicilline 1 g comprimé" in _census_line(seeded, patient).allergy_prescriptions, "and the census"


def test_stopping_a_prescription_ends_its_doses_and_says_who_and_why(seeded: Store) -> None:
    patient, stay = _inpatient(seeded)
    form = {"medication": _line(seeded, "Kétoprofène 100 mg comprimé LP"), "dose": "1 comprimé", "route": "Voie orale",
            "times": "20h", "entry": str(Entry.new())}
    written = prescribe(seeded, patient, form, DOCTOR, NOW, [], stay)
    with pytest.raises(InvalidForm):
        stop(seeded, patient, written, {"reason": " ", "version": "1"}, DOCTOR, NOW)
    with pytest.raises(PreconditionFailed):
        stop(seeded, patient, written, {"reason": "Insuffisance rénale", "version": "7"}, DOCTOR, NOW)
    with pytest.raises(NotFound):
        stop(seeded, "someone-else", written, {"reason": "x", "version": "1"}, DOCTOR, NOW)
    stop(seeded, patient, written, {"reason": "Insuffisance rénale", "version": "1"}, DOCTOR, NOW + dt.timedelta(minutes=3))
    stop(seeded, patient, written, {"reason": "Insuffisance rénale", "version": "1"}, DOCTOR, NOW + dt.timedelta(minutes=4))
    history = seeded.history("MedicationRequest", written)
    assert len(history) == 2, "stopped once, however often sent"
    request = read(seeded, "MedicationRequest", written)
    assert request is not None and request["status"] == "stopped" and request["statusReason"]["text"] == "Insuffisance rénale"
    assert request["note"][-1]["text"] == "Arrêtée : Insuffisance rénale" and request["note"][-1]["authorReference"]["display"] == "Dr MARTIN Paul"
    chart = patient_chart(seeded, patient, NOW + dt.timedelta(minutes=5))
    assert written not in {r.id for r in chart.prescriptions}
    assert [(s.medication, s.reason, s.by) for s in chart.stopped] == [("Kétoprofène 100 mg comprimé LP", "Insuffisance rénale",
                                                                        "Dr MARTIN Paul")], "listed as stopped for the nurses"


def test_a_cut_off_site_prescribes_and_stops_and_the_central_site_gets_both(demo_db: str, tmp_path: Path) -> None:
    """The prescription module keeps working at a site node cut off from the central site (the design brief's bar)."""
    import httpx

    from tests import test_site as site_tests
    from tests.server import RebondServer
    from tests.web_client import csrf_of, entry_of, signed_in

    central = RebondServer(demo_db).start()
    site = site_tests.start_site(central, tmp_path, ("doctor", "physician", "Dr GARDE Anne"))
    try:
        store = open_store(central.db)
        try:
            stay = find(store, "Encounter", ("status", "in-progress"))[0]
            patient = stay["subject"]["reference"].split("/")[1]
            running = find(store, "MedicationRequest", ("subject", f"Patient/{patient}"), ("status", "active"))[0]["id"]
            line = _line(store, "Ondansétron 4 mg comprimé orodispersible")
        finally:
            store.close()
        central.kill()
        site_tests.wait_for(lambda: site.status()["upstream_reachable"] is False, 10)

        doctor = signed_in(site.base, "doctor")
        form = doctor.get(f"/patients/{patient}/prescriptions/new")
        written = doctor.post(f"/patients/{patient}/prescriptions/new", data={
            "csrf": csrf_of(form.text), "entry": entry_of(form.text), "medication": line, "dose": "1 comprimé",
            "route": "Voie orale", "as_needed": "yes", "indication": "nausées"})
        assert written.status_code == 303, "prescribed at the site while cut off"
        form = doctor.get(f"/patients/{patient}/prescriptions/{running}/stop")
        stopped = doctor.post(f"/patients/{patient}/prescriptions/{running}/stop", data={
            "csrf": csrf_of(form.text), "entry": entry_of(form.text), "version": "1", "reason": "Fin de traitement"})
        assert stopped.status_code == 303
        assert site.status()["journal_pending"] == 2

        central.start()
        site_tests.wait_for(lambda: site.status()["journal_pending"] == 0, 30)
        assert site.status()["conflicts_open"] == 0

        def central_search(query: str) -> list[dict[str, object]]:
            bundle = httpx.get(f"{central.fhir}/MedicationRequest?{query}", headers=central.headers, timeout=10).json()
            return [e["resource"] for e in bundle.get("entry", [])]

        new = central_search(f"subject=Patient/{patient}&code=http://www.whocc.no/atc|A04AA01")
        assert len(new) == 1 and new[0]["requester"]["display"] == "Dr GARDE Anne"
        assert central_search(f"_id={running}")[0]["status"] == "stopped"
    finally:
        site.stop()
        central.stop()


def test_the_formulary_is_added_to_a_store_seeded_before_it_existed(tmp_path: Path) -> None:
    from tests.server import rebond

    db = f"sqlite:///{tmp_path}/old.db"
    open_store(db).close()
    first = rebond("seed", "--formulary", "--db", db)
    assert first.returncode == 0 and f"formulary: {len({d.name for d in (*DRUGS, *MORE_DRUGS)})} medicines added" in first.stdout
    again = rebond("seed", "--formulary", "--db", db)
    assert again.returncode == 0 and "0 medicines added (all there already)" in again.stdout
    refused = rebond("seed", "--db", db)
    assert refused.returncode != 0 and "--formulary" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
