"""Imaging reports lead to their images in the PACS, a real Orthanc, found there by the Study Instance UID."""
from __future__ import annotations

from collections.abc import Iterator

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
        assert facts == {"pacs": pacs.url, "reachable": True, "problem": None}  # type: ignore[comparison-overlap]
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
