"""Imaging reports lead to their images in the PACS, a real Orthanc, found there by the Study Instance UID."""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from rebond.clinical.conventions import GROUP_IPP_SYSTEM
from rebond.clinical.imaging import study_uid
from rebond.clinical.records import find
from rebond.store import open_store
from tests.infrastructure import started
from tests.orthanc_harness import OrthancServer
from tests.server import RebondServer
from tests.test_site import wait_for
from tests.web_client import signed_in


@pytest.fixture
def pacs() -> Iterator[OrthancServer]:
    server = started(lambda: OrthancServer().start(), "Orthanc")
    yield server
    server.close()


def test_an_imaging_report_opens_its_images_in_orthanc_and_says_so_when_it_cannot(demo_db: str, pacs: OrthancServer) -> None:
    store = open_store(demo_db)
    try:
        studies = find(store, "ImagingStudy")
        assert len(studies) >= 2, "the demo group has imaging studies"
        kept, missing = studies[0], studies[1]
        patient_id = kept["subject"]["reference"].split("/")[1]
        patient = orjson.loads(store.read("Patient", patient_id).body)  # type: ignore[union-attr]
    finally:
        store.close()
    uid = study_uid(kept)
    assert uid is not None
    ipp = next(i["value"] for i in patient["identifier"] if i["system"] == GROUP_IPP_SYSTEM)
    in_orthanc = pacs.store_study(ipp, uid, str(kept.get("description", "")))

    server = RebondServer(demo_db, "--orthanc", pacs.url_with_account).start()
    try:
        nurse = signed_in(server.base, "nurse")
        chart = nurse.get(f"/patients/{patient_id}")
        link = f"/patients/{patient_id}/imaging/{kept['id']}"
        assert "Voir les images" in chart.text and link in chart.text
        opened = nurse.get(link, follow_redirects=False)
        assert opened.status_code == 303, opened.text
        viewer = opened.headers["location"]
        # found with Rebond's account; the browser gets the viewer without it (Orthanc asks the person for theirs)
        assert viewer == f"{pacs.url}/app/explorer.html#study?uuid={in_orthanc['ParentStudy']}"
        study = httpx.get(f"{pacs.url}/studies/{in_orthanc['ParentStudy']}", auth=pacs.auth).json()
        assert study["MainDicomTags"]["StudyInstanceUID"] == uid

        other = missing["subject"]["reference"].split("/")[1]
        absent = nurse.get(f"/patients/{other}/imaging/{missing['id']}", follow_redirects=False)
        assert absent.status_code == 404 and "ne sont pas (encore) dans le PACS" in absent.text
        wrong = nurse.get(f"/patients/{other}/imaging/{kept['id']}", follow_redirects=False)
        assert wrong.status_code == 404, "a study is opened only from its own patient's chart"
        facts = server.status()["imaging"]
        assert isinstance(facts, dict) and (facts["pacs"], facts["reachable"], facts["problem"]) == (pacs.url, True, None)
        assert pacs.PASSWORD not in httpx.get(f"{server.base}/status").text, "the status page shows no password"

        pacs.stop()  # the PACS is down: the report is still read, the images are said to be out of reach
        down = nurse.get(link, follow_redirects=False)
        assert down.status_code == 503 and "Le PACS (Orthanc) ne répond pas" in down.text
        assert "Voir les images" in nurse.get(f"/patients/{patient_id}").text
    finally:
        server.stop()
    store = open_store(demo_db)
    try:
        assert "images" in {a.what for a in store.accesses(patient=patient_id)}, "opening the images is on the audit trail"
    finally:
        store.close()


def test_orthanc_must_be_a_url(demo_db: str) -> None:
    from tests.server import rebond

    refused = rebond("serve", "--db", demo_db, "--orthanc", "pacs:8042")
    assert refused.returncode == 1 and "--orthanc takes the URL" in refused.stderr


def test_a_study_the_pacs_receives_is_linked_to_its_patient_before_any_report(demo_db: str, pacs: OrthancServer) -> None:
    """Images come before the report: Orthanc's stable studies become ImagingStudies of the patient whose IPP is their
    PatientID, shown in the chart with their images; a study of an unknown patient number is counted for IT, not guessed."""
    patient, ipp = _a_patient(demo_db)
    server = RebondServer(demo_db, "--orthanc", pacs.url_with_account).start()
    try:
        pacs.store_study(ipp, "1.2.250.1.999.3.1", "Radiographie thoracique", modality="CR")
        pacs.store_study("999999999", "1.2.250.1.999.3.2", "Examen d'un autre établissement")
        pacs.store_study(f"{ipp},999999999", "1.2.250.1.999.3.3", "Numéro mal saisi")  # never read as two numbers
        with server.client() as api:
            def linked() -> list[dict[str, object]]:
                bundle = api.get("/ImagingStudy", params={"identifier": "urn:dicom:uid|urn:oid:1.2.250.1.999.3.1"}).json()
                return [e["resource"] for e in bundle.get("entry", [])]
            took = wait_for(lambda: bool(linked()), 30)
            print(f"\nthe study was in Rebond {took:.1f} s after the PACS received it")
            study = linked()[0]
            assert study["subject"] == {"reference": f"Patient/{patient['id']}"} and study["numberOfInstances"] == 1
            assert study["modality"] == [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CR"}]
            wait_for(lambda: server.status()["imaging"]["new_studies"]["unmatched"] == 2, 30)  # type: ignore[index]
            for uid in ("1.2.250.1.999.3.2", "1.2.250.1.999.3.3"):
                nobody = api.get("/ImagingStudy", params={"identifier": f"urn:dicom:uid|urn:oid:{uid}"}).json()
                assert not nobody.get("entry"), "a study of an unknown patient number is not given to anyone"
        nurse = signed_in(server.base, "nurse")
        chart = nurse.get(f"/patients/{patient['id']}")
        assert "Radiographie thoracique" in chart.text and "le compte rendu est à venir" in chart.text
        opened = nurse.get(f"/patients/{patient['id']}/imaging/{study['id']}", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"].startswith(f"{pacs.url}/app/explorer.html#study?uuid=")
        status = httpx.get(f"{server.base}/status", headers={"Accept-Language": "fr"}).text
        assert "1 nouvel examen relié depuis le démarrage" in status and "2 examens ne désignent aucun patient connu" in status

        # the patient of 999999999 is registered after the images (a trauma CT before the admission): linked then
        with server.client() as api:
            registered = api.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "TRAUMA"}],
                                                     "identifier": [{"system": GROUP_IPP_SYSTEM, "value": "999999999"}]}).json()
            def later() -> list[dict[str, Any]]:
                found = api.get("/ImagingStudy", params={"identifier": "urn:dicom:uid|urn:oid:1.2.250.1.999.3.2"}).json()
                return [e["resource"] for e in found.get("entry", [])]
            wait_for(lambda: bool(later()), 30)
            assert later()[0]["subject"] == {"reference": f"Patient/{registered['id']}"}
        assert server.status()["imaging"]["new_studies"]["unmatched"] == 1  # type: ignore[index]
    finally:
        server.stop()

    # restarted, the node resumes after what it read: nothing is linked twice
    server = RebondServer(demo_db, "--orthanc", pacs.url_with_account).start()
    try:
        time.sleep(7)  # more than a round of following
        with server.client() as api:
            again = api.get("/ImagingStudy", params={"identifier": "urn:dicom:uid|urn:oid:1.2.250.1.999.3.1"}).json()
            assert len(again["entry"]) == 1 and again["entry"][0]["resource"]["meta"]["versionId"] == "1"
        restarted = server.status()["imaging"]["new_studies"]
        assert restarted["linked"] == 0 and restarted["unmatched"] == 1, "the study still waiting is still waiting"  # type: ignore[index]
    finally:
        server.stop()


def test_a_node_that_does_not_follow_the_pacs_opens_images_but_makes_no_imaging_study(demo_db: str, pacs: OrthancServer) -> None:
    patient, ipp = _a_patient(demo_db)
    server = RebondServer(demo_db, "--orthanc", pacs.url_with_account, "--no-follow-pacs").start()
    try:
        pacs.store_study(ipp, "1.2.250.1.999.3.9", "Échographie")
        time.sleep(7)  # more than a round of following, and Orthanc's 1 s to call the study stable
        with server.client() as api:
            assert not api.get("/ImagingStudy", params={"identifier": "urn:dicom:uid|urn:oid:1.2.250.1.999.3.9"}).json().get("entry")
        facts = server.status()["imaging"]
        assert isinstance(facts, dict) and facts["reachable"] and facts["new_studies"] is None
    finally:
        server.stop()


def _a_patient(db: str) -> tuple[dict[str, Any], str]:
    """A patient of the demo group, and its IPP (the PatientID a modality would write)."""
    store = open_store(db)
    try:
        patient = find(store, "Patient", ("identifier", f"{GROUP_IPP_SYSTEM}|"), limit=1)[0]
    finally:
        store.close()
    return patient, next(i["value"] for i in patient["identifier"] if i["system"] == GROUP_IPP_SYSTEM)


def test_a_study_s_images_are_read_over_dicomweb_through_rebond_by_whoever_may_read_it(demo_db: str, pacs: OrthancServer) -> None:
    store = open_store(demo_db)
    try:
        studies = find(store, "ImagingStudy")
        kept, missing = studies[0], studies[1]
        patient_id = kept["subject"]["reference"].split("/")[1]
        patient = orjson.loads(store.read("Patient", patient_id).body)  # type: ignore[union-attr]
    finally:
        store.close()
    uid, absent_uid = study_uid(kept), study_uid(missing)
    assert uid is not None and absent_uid is not None
    ipp = next(i["value"] for i in patient["identifier"] if i["system"] == GROUP_IPP_SYSTEM)
    pacs.store_study(ipp, uid, "Scanner thoracique")

    server = RebondServer(demo_db, "--orthanc", pacs.url_with_account, "--no-follow-pacs").start()
    try:
        base = f"{server.base}/dicom-web/studies"
        metadata = httpx.get(f"{base}/{uid}/metadata", headers={**server.headers, "Accept": "application/dicom+json"}, timeout=30)
        assert metadata.status_code == 200 and metadata.headers["content-type"].startswith("application/dicom+json"), metadata.text
        assert metadata.json()[0]["0020000D"]["Value"] == [uid], "the study's own instances, from the PACS"
        whole = httpx.get(f"{base}/{uid}", headers={**server.headers, "Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
        assert whole.status_code == 200 and whole.headers["content-type"].startswith("multipart/related") and b"DICM" in whole.content

        assert httpx.get(f"{base}/{uid}/metadata", timeout=10).status_code == 401, "no images without signing in"
        unknown = httpx.get(f"{base}/1.2.250.1.999.9.9/metadata", headers=server.headers, timeout=10)
        assert unknown.status_code == 404 and unknown.json()["resourceType"] == "OperationOutcome", "only the studies Rebond holds"
        assert httpx.get(f"{base}/{absent_uid}/metadata", headers=server.headers, timeout=10).status_code == 404, "not in the PACS"
        pacs.stop()
        down = httpx.get(f"{base}/{uid}/metadata", headers=server.headers, timeout=30)
        assert down.status_code == 503 and down.headers["retry-after"] == "5"
    finally:
        server.stop()
    store = open_store(demo_db)
    try:
        reads = [a for a in store.accesses(patient=patient_id) if a.channel == "dicomweb"]
        assert reads and {a.what for a in reads} == {"images"}, "reading the images is on the audit trail, with their patient"
    finally:
        store.close()


@pytest.mark.slow
def test_one_process_follows_the_pacs_and_another_takes_over_when_it_dies(demo_db: str, pacs: OrthancServer) -> None:
    """Two servers over one store (as `--workers 2`, or two central servers behind HAProxy): one follows the PACS; killed,
    the other follows within three rounds, and no study is lost or linked twice."""
    patient, ipp = _a_patient(demo_db)
    first = RebondServer(demo_db, "--orthanc", pacs.url_with_account).start()
    second: RebondServer | None = None
    try:
        wait_for(lambda: first.status()["imaging"]["new_studies"]["this_process"] is True, 15)  # type: ignore[index]
        second = RebondServer(demo_db, "--orthanc", pacs.url_with_account).start()
        time.sleep(6)  # a round of each
        assert second.status()["imaging"]["new_studies"]["this_process"] is False, "one follower at a time"  # type: ignore[index]
        pacs.store_study(ipp, "1.2.250.1.999.4.1", "Échographie abdominale", modality="US")
        wait_for(lambda: first.status()["imaging"]["new_studies"]["linked"] == 1, 30)  # type: ignore[index]

        first.kill()
        took = wait_for(lambda: second.status()["imaging"]["new_studies"]["this_process"] is True, 30)  # type: ignore[index]
        print(f"\nthe second server followed the PACS {took:.1f} s after the first was killed")
        pacs.store_study(ipp, "1.2.250.1.999.4.2", "Scanner abdominal", modality="CT")
        wait_for(lambda: second.status()["imaging"]["new_studies"]["linked"] == 1, 30)  # type: ignore[index]
        with second.client() as api:
            mine = api.get("/ImagingStudy", params={"subject": f"Patient/{patient['id']}", "identifier":
                           "urn:dicom:uid|urn:oid:1.2.250.1.999.4.1,urn:dicom:uid|urn:oid:1.2.250.1.999.4.2"}).json()
            assert len(mine["entry"]) == 2 and all(e["resource"]["meta"]["versionId"] == "1" for e in mine["entry"])
    finally:
        if second is not None:
            second.stop()
        first.stop()
