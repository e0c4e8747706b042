"""Failure drill: a central server and two site nodes as real processes, under a steady write load.

The link of one site is cut while both ends stay up, and later the central server is killed
with SIGKILL. While cut off, the sites write through the API, the web app and MLLP; one record
is edited on both sides. When the central site is back, every write a site acknowledged is on
the central site exactly once, the doubly edited record waits in the reconciliation view with
both versions, and both sites converge to the central state.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import hl7.client
import httpx
import pytest

from rebond.hl7.mllp import ack_code
from rebond.security.accounts import Accounts
from rebond.store import open_store
from tests.hl7_messages import oru
from tests.pg_harness import free_port
from tests.proxy import CuttableLink
from tests.server import RebondServer, SiteServer
from tests.web_client import csrf_of, signed_in

pytestmark = pytest.mark.slow
FHIR = {"Content-Type": "application/fhir+json"}


def wait_for(condition: Callable[[], bool], seconds: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


class Load(threading.Thread):
    """A steady stream of vital signs written on the central site."""

    def __init__(self, central: RebondServer, per_second: float = 20) -> None:
        super().__init__(daemon=True)
        self.central, self.pause, self.running, self.written = central, 1 / per_second, True, 0

    def run(self) -> None:
        with httpx.Client(base_url=self.central.fhir, headers={**FHIR, **self.central.headers}, timeout=5) as client:
            while self.running:
                try:
                    client.post("/Observation", json=observation("load"))
                    self.written += 1
                except httpx.HTTPError:
                    pass  # the central server is down for a while: so is the load
                time.sleep(self.pause)


def observation(patient: str, value: float = 72) -> dict[str, object]:
    return {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": f"Patient/{patient}"}, "valueQuantity": {"value": value, "unit": "/min"}}


def site_db(tmp_path: Path, name: str) -> str:
    url = f"sqlite:///{tmp_path}/site-{name}.db"
    store = open_store(url, site_id=name)
    Accounts(store).save("nurse", "rebond-demo", "nurse", f"Infirmière {name}")
    store.close()
    return url


def test_cut_link_and_killed_central_lose_nothing_and_overwrite_nothing(demo_db: str, tmp_path: Path) -> None:
    central = RebondServer(demo_db).start()
    link_h1 = CuttableLink(central.port)
    link_h2 = CuttableLink(central.port)
    mllp_h1 = free_port()
    h1 = SiteServer(site_db(tmp_path, "H1"), central, "H1", "--mllp-port", str(mllp_h1), "--ipp-range", "910000000-910000999",
                    upstream=f"http://127.0.0.1:{link_h1.port}/fhir").start()
    h2 = SiteServer(site_db(tmp_path, "H2"), central, "H2", upstream=f"http://127.0.0.1:{link_h2.port}/fhir").start()
    load = Load(central)
    figures: dict[str, float] = {}
    try:
        for site in (h1, h2):
            wait_for(lambda s=site: s.status()["data_as_of"] is not None, 180)
        load.start()
        shared = httpx.post(f"{central.fhir}/Patient", json={"resourceType": "Patient", "name": [{"family": "PARTAGE"}]},
                            headers={**FHIR, **central.headers}).json()
        wait_for(lambda: httpx.get(f"{h1.fhir}/Patient/{shared['id']}", headers=h1.headers).status_code == 200, 10)
        stays = httpx.get(f"{h1.fhir}/Encounter?status=in-progress&_count=1", headers=h1.headers).json()
        patient_at_h1 = stays["entry"][0]["resource"]["subject"]["reference"].split("/")[1]

        # -- cut the link of H1; both ends stay up
        link_h1.cut()
        figures["detect_cut_s"] = wait_for(lambda: h1.status()["upstream_reachable"] is False, 10)
        acknowledged: list[tuple[str, str]] = []
        api = httpx.Client(base_url=h1.fhir, headers={**FHIR, **h1.headers}, timeout=10)
        for n in range(20):  # vitals through the API
            r = api.post("/Observation", json=observation(patient_at_h1, 60 + n))
            assert r.status_code == 201
            acknowledged.append(("Observation", r.json()["id"]))
        r = api.post("/Communication", json={"resourceType": "Communication", "status": "completed",
                                             "payload": [{"contentString": "Scanner en panne, patients orientés vers H2"}]})
        assert r.status_code == 201
        acknowledged.append(("Communication", r.json()["id"]))
        nurse = signed_in(h1.base, "nurse")
        ward = api.get("/Location?identifier=urn:rebond:location|H1-CARDIO").json()["entry"][0]["resource"]["id"]
        form = nurse.get(f"/wards/{ward}/admit")  # an emergency admission, numbered from the site's range
        admitted = nurse.post(f"/wards/{ward}/admit", data={"csrf": csrf_of(form.text), "family": "Urgence", "given": "Jean",
                                                             "birth_date": "12/03/1950", "gender": "male"})
        assert admitted.status_code == 303
        emergency = admitted.headers["location"].rsplit("/", 1)[1]
        acknowledged.append(("Patient", emergency))
        ipp = api.get(f"/Patient/{emergency}").json()["identifier"][0]["value"]
        assert ipp == "910000000"
        form = nurse.get(f"/patients/{patient_at_h1}/vitals")
        assert nurse.post(f"/patients/{patient_at_h1}/vitals",
                          data={"csrf": csrf_of(form.text), "heart_rate": "88", "temperature": "37,9"}).status_code == 303
        request = api.get(f"/MedicationRequest?subject=Patient/{patient_at_h1}&status=active&_count=1").json()["entry"][0]["resource"]
        form = nurse.get(f"/patients/{patient_at_h1}/administrations/{request['id']}")  # an administration through the web app
        assert nurse.post(f"/patients/{patient_at_h1}/administrations/{request['id']}",
                          data={"csrf": csrf_of(form.text), "outcome": "given", "time": "08:00"}).status_code == 303
        given = api.get(f"/MedicationAdministration?request=MedicationRequest/{request['id']}&_sort=-_lastUpdated&_count=1")
        administration = given.json()["entry"][0]["resource"]
        assert administration["performer"][0]["actor"]["display"] == "Infirmière H1", "the one just recorded at H1"
        acknowledged.append(("MedicationAdministration", administration["id"]))
        with hl7.client.MLLPClient("127.0.0.1", mllp_h1) as analyzer:  # a lab result through MLLP
            assert ack_code(analyzer.send_message(oru("DRILL1", "960000001", "FDRILL1"))) == "AA"
        # the same record edited on both sides
        edited_here = api.get(f"/Patient/{shared['id']}").json()
        assert api.put(f"/Patient/{shared['id']}", json={**edited_here, "gender": "female"}).status_code == 200
        httpx.put(f"{central.fhir}/Patient/{shared['id']}", json={**shared, "birthDate": "1950-01-01"},
                  headers={**FHIR, **central.headers}).raise_for_status()
        journal = int(h1.status()["journal_pending"])  # type: ignore[arg-type]
        figures["journal_length"] = journal

        # -- restore the link
        restored = time.monotonic()
        link_h1.restore()
        wait_for(lambda: h1.status()["journal_pending"] == 0 and h1.status()["upstream_reachable"] is True, 60)
        figures["replay_s"] = time.monotonic() - restored
        for kind, rid in acknowledged:
            found = httpx.get(f"{central.fhir}/{kind}/{rid}/_history", headers=central.headers).json()
            assert found["total"] == 1, f"{kind}/{rid} is on the central site exactly once"
        drill_report = httpx.get(f"{central.fhir}/DiagnosticReport?identifier=FDRILL1", headers=central.headers).json()
        assert len(drill_report["entry"]) == 1, "the lab result sent to the site reached the central site"
        web_vitals = httpx.get(f"{central.fhir}/Observation?subject=Patient/{patient_at_h1}&code=http://loinc.org|8310-5"
                               f"&value-quantity=37.9", headers=central.headers).json()
        assert len(web_vitals.get("entry", [])) == 1, "the vitals typed in the web app reached the central site"
        assert h1.status()["conflicts_open"] == 1
        page = nurse.get("/reconciliation")
        assert shared["id"] in page.text and "female" in page.text and "1950-01-01" in page.text, "both versions, side by side"
        central_patient = httpx.get(f"{central.fhir}/Patient/{shared['id']}", headers=central.headers).json()
        assert central_patient["birthDate"] == "1950-01-01" and "gender" not in central_patient, "nothing overwritten silently"
        wait_for(lambda: httpx.get(f"{h1.fhir}/Patient/{shared['id']}", headers=h1.headers).json() == central_patient, 10)
        wait_for(lambda: httpx.get(f"{h2.fhir}/Patient/{emergency}", headers=h2.headers).status_code == 200, 10)

        # -- cut off again, keeping the site's version cannot be done: said at once, nothing decided
        link_h1.cut()
        wait_for(lambda: h1.status()["upstream_reachable"] is False, 10)
        page = nurse.get("/reconciliation")
        seq = page.text.split('action="/reconciliation/')[1].split('"')[0]
        refused = nurse.post(f"/reconciliation/{seq}", data={"csrf": csrf_of(page.text), "keep": "site"})
        assert refused.headers["location"] == "/reconciliation?outcome=unreachable"
        assert "Le site central ne répond pas" in nurse.get(refused.headers["location"]).text
        assert h1.status()["conflicts_open"] == 1
        link_h1.restore()
        wait_for(lambda: h1.status()["upstream_reachable"] is True, 15)

        # -- a person settles the conflict: the site's version becomes a new central version
        page = nurse.get("/reconciliation")
        seq = page.text.split('action="/reconciliation/')[1].split('"')[0]
        assert nurse.post(f"/reconciliation/{seq}", data={"csrf": csrf_of(page.text), "keep": "site"}).status_code == 303
        settled = httpx.get(f"{central.fhir}/Patient/{shared['id']}", headers=central.headers).json()
        assert settled["gender"] == "female" and settled["meta"]["versionId"] == "3"
        assert h1.status()["conflicts_open"] == 0

        # -- SIGKILL of the central server, writes at H2 meanwhile
        central.kill()
        figures["detect_kill_s"] = wait_for(lambda: h2.status()["upstream_reachable"] is False, 10)
        during = httpx.post(f"{h2.fhir}/Observation", json=observation(patient_at_h1, 99), headers={**FHIR, **h2.headers})
        assert during.status_code == 201
        central.start()
        wait_for(lambda: h2.status()["journal_pending"] == 0 and h2.status()["upstream_reachable"] is True, 60)
        assert httpx.get(f"{central.fhir}/Observation/{during.json()['id']}", headers=central.headers).status_code == 200
        wait_for(lambda: httpx.get(f"{h1.fhir}/Observation/{during.json()['id']}", headers=h1.headers).status_code == 200, 15)
    finally:
        load.running = False
        print(f"\ndrill figures: {figures}, central writes under load: {load.written}")
        for server in (h1, h2, central):
            server.stop()
        link_h1.close()
        link_h2.close()
