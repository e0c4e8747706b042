"""Downtime packs, read back the way a person would: the PDF turned into text (pdftotext) and into pictures (pdftoppm)."""
from __future__ import annotations

import datetime as dt
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from rebond.clinical import messaging
from rebond.clinical.census import ward_occupancy
from rebond.clinical.conventions import COMMUNICATION_CATEGORY, INTERPRETATION, LOINC, UCUM
from rebond.clinical.interventions import propose
from rebond.clinical.pharmacy import validate
from rebond.clinical.records import Clinician, Entry, find
from rebond.downtime.library import ward_ids
from rebond.fhir import operations
from rebond.hl7.intake import receive
from rebond.store import open_store
from tests.auth import api_token
from tests.hl7_messages import oru
from tests.server import RebondServer, rebond

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "downtime"


def pages_of(pdf: Path) -> list[str]:
    """The text of each page (pdftotext separates pages with a form feed)."""
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    return text.split("\f")[:-1] if text.endswith("\f") else text.split("\f")


def picture(pdf: Path, page: int, name: str) -> Path:
    """Page `page` as a PNG in test-artifacts/downtime/, to look at; fails if the page renders blank."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    prefix = ARTIFACTS / name
    subprocess.run(["pdftoppm", "-png", "-r", "70", "-f", str(page), "-l", str(page), "-singlefile", str(pdf), str(prefix)], check=True)
    png = prefix.with_suffix(".png")
    gray = subprocess.run(["pdftoppm", "-gray", "-r", "20", "-f", str(page), "-l", str(page), "-singlefile", str(pdf)],
                          capture_output=True, check=True).stdout
    pixels = gray[gray.index(b"255\n") + 4:]  # PGM: header, then one byte per pixel
    assert sum(1 for b in pixels if b < 128) > 200, f"page {page} of {pdf.name} is nearly blank"
    return png


def first_ward(db: str) -> tuple[str, list[Any]]:
    store = open_store(db)
    try:
        ward_id = ward_ids(store)[0]
        lines = [line for line in ward_occupancy(store, ward_id, dt.datetime.now(dt.UTC)).beds if line.patient is not None]
        return ward_id, lines
    finally:
        store.close()


def write(db: str, resource: dict[str, Any]) -> None:
    store = open_store(db)
    try:
        store.write(lambda tx: operations.create(tx, resource["resourceType"], resource))
    finally:
        store.close()


def allergy(patient_id: str, substance: str) -> dict[str, Any]:
    return {"resourceType": "AllergyIntolerance", "patient": {"reference": f"Patient/{patient_id}"}, "criticality": "high",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
            "code": {"text": substance}, "recordedDate": dt.datetime.now(dt.UTC).isoformat()}


def make_pack(db: str, ward_id: str, out: Path, *extra: str) -> None:
    done = rebond("downtime-pack", "--ward", ward_id, "--out", str(out), "--db", db, *extra)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(b"%PDF")


def test_a_pack_holds_the_census_names_allergies_and_marked_abnormal_values(demo_db: str, tmp_path: Path) -> None:
    ward_id, lines = first_ward(demo_db)
    patient = lines[0].patient
    write(demo_db, {**allergy(patient.id, "Pénicilline G"), "code": {"coding": [{"system": "http://snomed.info/sct", "code": "764146007"}],
                                                                      "text": "Pénicilline G"}})
    write(demo_db, {"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": {"reference": f"Patient/{patient.id}"},
                    "medicationCodeableConcept": {"coding": [{"system": "http://www.whocc.no/atc", "code": "J01CA04"}],
                                                  "text": "Amoxicilline 1 g comprimé"},
                    "authoredOn": dt.datetime.now(dt.UTC).isoformat(),
                    "dosageInstruction": [{"text": "1 comprimé", "timing": {"repeat": {"timeOfDay": ["08:00:00"]}}}]})
    store = open_store(demo_db)
    try:  # the pharmacy validates the amoxicillin as it stands (and only it, of the patient's prescriptions)
        [amoxicillin] = [r for r in find(store, "MedicationRequest", ("subject", f"Patient/{patient.id}"), ("status", "active"))
                         if r["medicationCodeableConcept"].get("text") == "Amoxicilline 1 g comprimé"]
        validate(store, amoxicillin["id"], 1, Clinician("pharma", "Pharmacie (démo)"), dt.datetime.now(dt.UTC))
        other = next(r for r in find(store, "MedicationRequest", ("subject", f"Patient/{patient.id}"), ("status", "active"))
                     if r["id"] != amoxicillin["id"])
        propose(store, other["id"], {"problem": "1.4", "proposal": "2.7", "entry": str(Entry.new())},
                Clinician("pharma", "Pharmacie (démo)", None, "H1-PHARMA"), dt.datetime.now(dt.UTC))
    finally:
        store.close()
    write(demo_db, {"resourceType": "Observation", "status": "final", "subject": {"reference": f"Patient/{patient.id}"},
                    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
                    "code": {"coding": [{"system": LOINC, "code": "2823-3"}], "text": "Potassium"},
                    "valueQuantity": {"value": 6.9, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
                    "referenceRange": [{"low": {"value": 3.5}, "high": {"value": 5.0}}],
                    "interpretation": [{"coding": [{"system": INTERPRETATION, "code": "HH"}]}],
                    "effectiveDateTime": dt.datetime.now(dt.UTC).isoformat()})
    out = tmp_path / "ward.pdf"
    make_pack(demo_db, ward_id, out)
    pages = pages_of(out)
    cover, census = pages[0], pages[1]
    assert "Dossier de secours" in cover and "Données à jour au" in cover and "Premier dossier de secours" in cover
    for line in lines:
        assert line.patient.name in census, "every inpatient is on the census"
    own = [p for p in pages[2:] if patient.name in p and "Allergies" in p]
    assert own, "the patient has their own page"
    assert "Pénicilline G" in own[0] and "Pénicilline G" in census
    assert "6,9 mmol/L ▲" in "".join(pages[2:]), "an abnormal value is marked (on the patient's page or the next)"
    assert "⚠ Allergie connue" in own[0] and "Amoxicilline 1 g" in own[0], "a prescription that meets a known allergy (a penicillin)"
    assert "✓ validée" in own[0], "the pharmacy's validation is on paper too"
    assert "⚠ Pharmacie : Surdosage," in own[0] and "en attente du prescripteur" in own[0], "and its open intervention"
    assert "non validée" in own[0], "and the prescriptions it has not validated yet"
    every_page = [p for p in pages if p.strip()]
    assert all("Données à jour au" in p for p in every_page), "every page says how old it is"
    assert any("Procédures dégradées" in p for p in pages) and any("Feuille de constantes" in p for p in pages)
    picture(out, 1, "cover")
    picture(out, 2, "census")
    picture(out, 3, "patient")


def test_a_new_allergy_shows_in_the_next_pack_and_in_what_changed(demo_db: str, tmp_path: Path) -> None:
    ward_id, lines = first_ward(demo_db)
    patient = lines[-1].patient
    out = tmp_path / "ward.pdf"
    make_pack(demo_db, ward_id, out)
    first = pages_of(out)
    assert "Aspartame" not in "".join(first)
    write(demo_db, allergy(patient.id, "Aspartame"))
    make_pack(demo_db, ward_id, out)
    second = pages_of(out)
    cover = second[0]
    assert "Nouvelles allergies (1)" in cover and "Aspartame" in cover and patient.name in cover
    assert "Premier dossier" not in cover and "dossier précédent" in cover
    own = next(p for p in second[2:] if patient.name in p and "Allergies" in p)
    assert "Aspartame" in own
    digest = [line for line in cover.splitlines() if "Empreinte du contenu" in line]
    assert digest and digest[0] not in first[0], "a pack that says something new has a new content hash"
    picture(out, 1, "what-changed")


def test_a_page_break_never_splits_a_patients_allergy_block(demo_db: str, tmp_path: Path) -> None:
    ward_id, lines = first_ward(demo_db)
    substances = [f"Allergène numéro {n:02d}" for n in range(18)]
    for line in lines[:3]:
        for substance in substances:
            write(demo_db, allergy(line.patient.id, substance))
    out = tmp_path / "ward.pdf"
    make_pack(demo_db, ward_id, out)
    pages = pages_of(out)
    for line in lines[:3]:
        start = next(n for n, p in enumerate(pages) if line.patient.name in p and "Allergène numéro 00" in p and n > 1)
        assert all(s in pages[start] for s in substances), f"{line.patient.name}'s allergies run over a page break"


def test_a_critical_results_call_no_one_has_taken_is_on_paper_until_someone_does(demo_db: str, tmp_path: Path) -> None:
    """The IT goes down just after the lab's call for a potassium at 6.4: the ward's paper says no one has taken it."""
    ward_id, lines = first_ward(demo_db)
    patient = lines[0].patient
    store = open_store(demo_db)
    try:
        assert receive(store, oru("DT1", patient.ipp, "FDT1")).code == "AA"
        [call] = find(store, "Communication", ("subject", f"Patient/{patient.id}"),
                      ("category", f"{COMMUNICATION_CATEGORY}|critical-result"))
    finally:
        store.close()
    out = tmp_path / "ward.pdf"
    make_pack(demo_db, ward_id, out)
    pages = pages_of(out)
    assert "☎ résultat critique : appel non pris en charge" in " ".join(pages[1].split()), "on the census, beside the patient"
    own = " ".join(next(p for p in pages[2:] if patient.name in p and "Allergies" in p).split())
    assert "Résultats critiques appelés par le laboratoire" in own and "Potassium 6,4 mmol/L (HH ; normales 3,5–5)" in own
    assert "PERSONNE NE L'A PRIS EN CHARGE : prévenez le médecin" in own
    picture(out, 3, "critical-call")

    store = open_store(demo_db)
    try:
        nurse = find(store, "Practitioner")[0]
        messaging.answer(store, str(call["id"]), {"entry": str(Entry.new())}, Clinician("nurse", "IDE", str(nurse["id"])),
                         dt.datetime.now(dt.UTC), taken=True)
    finally:
        store.close()
    make_pack(demo_db, ward_id, out)
    pages = pages_of(out)
    own = " ".join(next(p for p in pages[2:] if patient.name in p and "Allergies" in p).split())
    assert "pris en charge par" in own and "PERSONNE" not in own and "appel non pris en charge" not in " ".join(pages[1].split())


def test_english_on_request_and_every_ward_in_one_go(demo_db: str, tmp_path: Path) -> None:
    ward_id, _lines = first_ward(demo_db)
    out = tmp_path / "en.pdf"
    make_pack(demo_db, ward_id, out, "--lang", "en")
    assert "Downtime pack" in pages_of(out)[0]
    done = rebond("downtime-pack", "--all", "--out-dir", str(tmp_path / "all"), "--db", demo_db)
    assert done.returncode == 0, done.stderr
    store = open_store(demo_db)
    wards = ward_ids(store)
    store.close()
    assert sorted(p.stem for p in (tmp_path / "all").glob("*.pdf")) == sorted(wards)


@pytest.mark.parametrize(("args", "says"), [
    (["--all"], "--all needs --out-dir"),
    (["--ward", "W"], "--ward needs --out"),
    (["--ward", "no-such-ward", "--out", "x.pdf"], "no ward 'no-such-ward'"),
    (["--all", "--out-dir", "d", "--lang", "de"], "--lang is fr or en"),
])
def test_a_wrong_request_says_why_in_one_line(demo_db: str, tmp_path: Path, args: list[str], says: str) -> None:
    done = rebond("downtime-pack", *[str(tmp_path / a) if a in ("x.pdf", "d") else a for a in args], "--db", demo_db)
    assert done.returncode == 1 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_server_remakes_packs_on_schedule_lists_them_and_never_shows_half_a_file(demo_db: str, tmp_path: Path) -> None:
    folder = tmp_path / "packs"
    server = RebondServer(demo_db, "--downtime-dir", str(folder), "--downtime-every", "0.02", "--downtime-keep", "2")
    store = open_store(demo_db)
    server.token = api_token(store, "nurse", "nurse")  # a clinician's token: packs are for people who may see the ward
    wards = ward_ids(store)
    store.close()
    server.start()
    bad: list[str] = []
    stop = threading.Event()

    def reader() -> None:  # a copy to a USB key, a print job: any .pdf it finds must be whole
        while not stop.is_set():
            for pdf in folder.glob("*/*.pdf"):
                try:
                    content = pdf.read_bytes()
                except FileNotFoundError:
                    continue  # pruned between listing and reading
                if not (content.startswith(b"%PDF") and content.rstrip().endswith(b"%%EOF")):
                    bad.append(pdf.name)
            time.sleep(0.01)

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        listing: dict[str, Any] = {}
        deadline = time.time() + 120
        with httpx.Client(base_url=server.base, headers=server.headers, timeout=60) as client:
            while time.time() < deadline:
                listing = client.get("/downtime", headers={"Accept": "application/json"}).json()
                if (listing["schedule"] or {}).get("rounds", 0) >= 3:
                    break
                time.sleep(0.5)
            assert listing["schedule"]["rounds"] >= 3 and listing["schedule"]["last_outcome"]["failed"] == 0
            assert sorted(w["ward_id"] for w in listing["wards"]) == sorted(wards)
            for ward in listing["wards"]:
                assert 1 <= len(ward["kept"]) <= 2, "the last two are kept"
                assert len(list((folder / ward["ward_id"]).glob("*.pdf"))) <= 2
            kept = listing["wards"][0]["kept"][0]
            assert client.get(kept["url"]).content.startswith(b"%PDF")
            assert client.get(listing["wards"][0]["fresh"]).content.startswith(b"%PDF")
            page = client.get("/downtime")
            assert page.status_code == 200 and "Dossiers de secours" in page.text and kept["digest"] in page.text
            assert client.get(f"/downtime/files/{wards[0]}/..%2F..%2Fdemo.pdf").status_code == 404
            assert client.get("/downtime/files/no%20such%20ward/20990101T000000Z-000000000000.pdf").status_code == 404
            assert client.get(f"/downtime/files/{wards[0]}/20990101T000000Z-000000000000.pdf").status_code == 404
            status = client.get("/status", headers={"Accept": "application/json"}).json()
            assert status["downtime_packs"]["rounds"] >= 3
        assert httpx.get(f"{server.base}/downtime", follow_redirects=False).status_code == 303, "signing in comes first"
        done = rebond("downtime-pack", "--all", "--out-dir", str(tmp_path / "copy"), "--server", server.base, "--token", server.token)
        assert done.returncode == 0, done.stderr
        assert len(list((tmp_path / "copy").glob("*.pdf"))) == len(wards)
    finally:
        stop.set()
        watcher.join()
        server.stop()
    assert not bad, f"half-written packs were visible: {bad[:3]}"


def test_with_several_server_processes_one_schedule_makes_the_packs_and_every_process_lists_them(demo_db: str,
                                                                                                 tmp_path: Path) -> None:
    """`rebond serve --workers 2`: the parent process runs the schedule; each web process shows its packs and status."""
    folder = tmp_path / "packs"
    server = RebondServer(demo_db, "--workers", "2", "--downtime-dir", str(folder), "--downtime-every", "0.02",
                          "--downtime-keep", "2")
    store = open_store(demo_db)
    server.token = api_token(store, "nurse", "nurse")
    wards = ward_ids(store)
    store.close()
    server.start(timeout=60)
    try:
        deadline = time.time() + 120
        with httpx.Client(base_url=server.base, headers=server.headers, timeout=60) as client:
            listing: dict[str, Any] = {}
            while time.time() < deadline and (listing.get("schedule") or {}).get("rounds", 0) < 2:
                listing = client.get("/downtime", headers={"Accept": "application/json"}).json()
                time.sleep(0.5)
            assert listing["schedule"]["rounds"] >= 2 and listing["schedule"]["last_outcome"]["failed"] == 0
            for _ in range(12):  # new connections: both web processes answer some of them
                with httpx.Client(base_url=server.base, headers=server.headers, timeout=60) as fresh:
                    answer = fresh.get("/downtime", headers={"Accept": "application/json"}).json()
                    assert answer["schedule"]["rounds"] >= 2, "every process shows the one schedule"
                    assert sorted(w["ward_id"] for w in answer["wards"]) == sorted(wards)
                    assert all(1 <= len(w["kept"]) <= 2 for w in answer["wards"])
                    assert fresh.get("/status", headers={"Accept": "application/json"}).json()["downtime_packs"]["rounds"] >= 2
            kept = listing["wards"][0]["kept"][0]
            assert client.get(kept["url"]).content.startswith(b"%PDF")
        for ward in wards:
            assert 1 <= len(list((folder / ward).glob("*.pdf"))) <= 2, "the last two packs are kept"
    finally:
        server.stop()
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"rebond.downtime.regenerate.*{folder}"], capture_output=True, text=True).stdout
    assert not left.strip(), "stopping the server stops the round in progress"
