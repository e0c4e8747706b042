"""The audit trail: every access to patient data through the API and the web app, whose data, kept and served as AuditEvents."""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from rebond.clinical.census import ward_census
from rebond.clinical.conventions import GROUP_IPP_SYSTEM
from rebond.clinical.wards import group_wards
from rebond.fhir.model import validate
from rebond.security.audit import AuditTrail, _Answered, access_to_json, audit_event, audit_query, patients_in, time_ordered_id
from rebond.store import open_store
from rebond.store.base import Access, Store, Unavailable
from rebond.store.schema import SCHEMA_VERSION
from tests.server import RebondServer, SiteServer, rebond
from tests.test_site import wait_for
from tests.web_client import csrf_of, signed_in


def access(recorded: float, agent: str = "nurse", patients: tuple[str, ...] = (), what: str = "chart") -> Access:
    return Access(time_ordered_id(recorded), recorded, "central", agent, "nurse", "10.1.2.3", "web", "R", what, f"GET /patients/{patients[:1]}",
                  200, len(patients), patients)


def test_the_trail_is_found_by_patient_by_account_and_by_time_newest_first(store: Store) -> None:
    store.write(lambda tx: tx.record_accesses([
        access(1000.0, "nurse", ("p1",)), access(2000.0, "doctor", ("p1", "p2")), access(3000.0, "nurse", ("p2",)),
        access(4000.0, "lab", ())]))
    assert [a.recorded for a in store.accesses()] == [4000.0, 3000.0, 2000.0, 1000.0]
    assert [(a.agent, a.patients) for a in store.accesses(patient="p1")] == [("doctor", ("p1", "p2")), ("nurse", ("p1",))]
    assert [a.recorded for a in store.accesses(agent="nurse")] == [3000.0, 1000.0]
    assert [a.recorded for a in store.accesses(since=2000.0, until=4000.0)] == [3000.0, 2000.0]
    assert [a.recorded for a in store.accesses(patient="p2", agent="nurse")] == [3000.0]
    assert len(store.accesses(limit=1)) == 1
    assert store.write(lambda tx: tx.prune_accesses(2500.0)) == 2
    assert [a.recorded for a in store.accesses()] == [4000.0, 3000.0] and store.accesses(patient="p1") == []


def test_a_store_made_before_the_trail_gets_it_when_it_opens(tmp_path: Any) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as old:  # as Rebond left it at schema 2: no trail
        old.execute("DROP TABLE audit")
        old.execute("DROP TABLE audit_patient")
        old.execute("UPDATE rebond_meta SET value = '2' WHERE name = 'schema'")
    store = open_store(f"sqlite:///{path}")
    try:
        store.write(lambda tx: tx.record_accesses([access(1000.0, "nurse", ("p1",))]))
        assert [a.patients for a in store.accesses(patient="p1")] == [("p1",)]
    finally:
        store.close()
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT value FROM rebond_meta WHERE name = 'schema'").fetchone() == (str(SCHEMA_VERSION),)


def test_the_patients_of_an_answer_are_found_in_fhir_json_and_in_pages() -> None:
    bundle = orjson.dumps({"resourceType": "Bundle", "entry": [
        {"resource": {"resourceType": "Patient", "id": "pat-1", "name": [{"family": "DUPONT"}]}},
        {"resource": {"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/pat-2", "display": "X"}}},
        {"resource": {"resourceType": "Encounter", "id": "e1", "subject": {"display": "Y", "reference": "http://h/fhir/Patient/pat-3"}}},
        {"resource": {"resourceType": "Practitioner", "id": "doc-1"}},
        {"resource": {"resourceType": "Observation", "id": "o2", "performer": [{"reference": "Practitioner/doc-1"}]}}]})
    assert patients_in(bundle, html=False) == {"pat-1", "pat-2", "pat-3"}
    page = b'<a class="patient" href="/patients/abc-1">DUPONT</a> <a href="/patients/abc-2/vitals">x</a> <a href="/wards/w1">'
    assert patients_in(page, html=True) == {"abc-1", "abc-2"}


class _Refusing:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.site_id = store.site_id
        self.down = True

    def write(self, work: Callable[[Any], Any]) -> Any:
        if self.down:
            raise Unavailable("the store did not answer")
        return self.store.write(work)


def answered(recorded: float, patient: str) -> _Answered:
    return _Answered(recorded, "nurse", "nurse", "10.0.0.1", "web", "R", "chart", f"GET /patients/{patient}", 200, known=(patient,))


def test_accesses_wait_in_order_while_the_store_refuses_them_and_the_oldest_are_counted_lost_beyond_the_bound(store: Store) -> None:
    refusing = _Refusing(store)
    trail = AuditTrail(refusing, max_pending=3)  # type: ignore[arg-type]
    for n in range(4):
        trail.hand_over(answered(1000.0 + n, f"p{n}"))
    assert trail.flush() == 0 and trail.pending == 3 and trail.lost == 1
    assert trail.status()["problem"] == "the store did not answer"
    refusing.down = False
    trail.hand_over(answered(1004.0, "p4"))
    assert trail.lost == 2 and trail.flush() == 3 and trail.flush() == 0
    assert [a.patients for a in store.accesses()] == [("p4",), ("p3",), ("p2",)]
    assert trail.status()["problem"] is None and trail.status()["written"] == 3 and trail.status()["lost"] == 2


def test_a_site_nodes_polls_of_the_feed_are_on_the_trail_only_when_they_carried_changes(store: Store) -> None:
    trail = AuditTrail(store)
    for body in (b'{"resourceType":"Bundle","entry":[]}', b'{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient","id":"p9"}}]}'):
        trail.hand_over(_Answered(1000.0, "site-h1", "site", "10.0.0.2", "fhir", "R", "feed", "GET /fhir/$changes?after=5", 200,
                                  body=[body], scan=False))
    assert trail.flush() == 1
    (line,) = store.accesses()
    assert line.what == "feed" and line.patient_count == 0, "the feed carries everyone's data: its patients are not listed"


def test_the_audit_query_says_what_it_cannot_read() -> None:
    assert audit_query([("patient", "Patient/p1"), ("agent", "nurse"), ("_count", "5")]) == {"limit": 5, "patient": "p1", "agent": "nurse"}
    day = audit_query([("date", "2026-12-02")])
    assert day["until"] - day["since"] == 86400
    assert audit_query([("date", "ge2026-12-02T10:00:00Z"), ("date", "lt2026-12-02T11:00:00Z")]) == {
        "limit": 100, "since": 1796205600.0, "until": 1796209200.0}
    for bad in ([("date", "yesterday")], [("_count", "5000")], [("name", "DUPONT")]):
        with pytest.raises(ValueError):
            audit_query(bad)


def test_an_access_is_a_valid_audit_event() -> None:
    many = Access(uuid.uuid4().hex, 1796205600.5, "central", "interface", "system", "10.0.0.9", "fhir", "E", "search-type",
                  "GET /fhir/Observation?patient=p1", 200, 1200, tuple(f"p{n}" for n in range(1000)))
    event = audit_event(many)
    assert validate(event) == []
    assert event["subtype"][0] == {"system": "http://hl7.org/fhir/restful-interaction", "code": "search-type"}
    assert event["entity"][-1]["detail"][0]["valueString"] == "1200 patients, 1000 listed"
    page = audit_event(Access(uuid.uuid4().hex, 1796205600.0, "H1", "lab", "lab", "", "web", "C", "vital signs", "POST /patients/p1/vitals",
                              403, 1, ("p1",)))
    assert validate(page) == [] and page["outcome"] == "4" and page["source"]["site"] == "H1" and "network" not in page["agent"][0]


def trail_of(server: RebondServer, token: str, **query: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.fhir}/$audit", params=query, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry", [])]


def patients_of(event: dict[str, Any]) -> set[str]:
    return {e["what"]["reference"].removeprefix("Patient/") for e in event["entity"] if "what" in e}


def inpatients_of_a_ward(web: RebondServer) -> tuple[str, list[str]]:
    store = open_store(web.db)
    try:
        ward = group_wards(store)[0].wards[0][0]
        beds = ward_census(store, ward.id, dt.datetime.now(dt.UTC)).beds
        return ward.id, [b.patient.id for b in beds if b.patient is not None]
    finally:
        store.close()


def test_every_access_to_patient_data_is_on_the_trail_within_seconds(web: RebondServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBOND_PASSWORD", "protection-2026")
    assert rebond("accounts", "add", "dpo", "--role", "admin", "--name", "Délégué à la protection des données", "--db", web.db).returncode == 0
    auditor = rebond("accounts", "token", "dpo", "--label", "audit", "--db", web.db).stdout.strip()
    ward, inpatients = inpatients_of_a_ward(web)
    patient = inpatients[0]

    nurse = signed_in(web.base, "nurse")
    assert nurse.get(f"/patients/{patient}").status_code == 200
    assert nurse.get(f"/wards/{ward}").status_code == 200
    search = httpx.get(f"{web.fhir}/Observation", params={"patient": patient, "_count": "5"}, headers=web.headers, timeout=30)
    assert search.status_code == 200
    lab = signed_in(web.base, "lab")
    chart = lab.get(f"/patients/{patient}")
    assert lab.post(f"/patients/{patient}/vitals", data={"csrf": csrf_of(chart.text), "heart_rate": "80"}).status_code == 403
    assert httpx.get(f"{web.fhir}/$audit", headers=web.headers).status_code == 403, "an interface does not read the trail"

    def said() -> set[tuple[str, str, str]]:
        return {(e["agent"][0]["who"]["identifier"]["value"], e["subtype"][0]["code"], e["outcome"])
                for e in trail_of(web, auditor, patient=patient)}

    # the nurse's chart, the interface's search, and the lab technician's refused form: a refusal is on the trail too
    expected = {("nurse", "chart", "0"), ("interface-tests", "search-type", "0"), ("lab", "chart", "0"), ("lab", "vital-signs", "4")}
    took = wait_for(lambda: expected <= said(), 10)
    print(f"\nthe accesses were on the trail {took:.1f} s later")
    events = trail_of(web, auditor, patient=patient)
    census = next(e for e in events if e["subtype"][0]["code"] == "census")
    assert patients_of(census) == set(inpatients), "the census names every patient it showed"
    assert all(validate(e) == [] for e in events)
    assert census["agent"][0]["network"]["address"] == "127.0.0.1"

    assert trail_of(web, auditor, agent="lab", patient=patient)[0]["action"] == "C"
    assert trail_of(web, auditor, date="ge2000-01-01", _count="1")[0]["recorded"] >= events[0]["recorded"]
    refused = httpx.get(f"{web.fhir}/$audit", params={"date": "hier"}, headers={"Authorization": f"Bearer {auditor}"})
    assert refused.status_code == 400 and refused.json()["resourceType"] == "OperationOutcome"
    wait_for(lambda: any(e["subtype"][0]["code"] == "audit-trail" for e in trail_of(web, auditor, agent="dpo")), 10)
    status = web.status()["audit"]
    assert status["written"] > 0 and status["lost"] == 0 and status["problem"] is None  # type: ignore[index]
    assert "accès enregistrés depuis le démarrage" in httpx.get(f"{web.base}/status").text, "IT sees the trail is written"


def test_it_reads_the_trail_of_a_patient_by_ipp_in_the_web_app(web: RebondServer) -> None:
    patient = inpatients_of_a_ward(web)[1][-1]
    stored = open_store(web.db).read("Patient", patient)
    assert stored is not None and stored.body is not None
    number = next(i["value"] for i in orjson.loads(stored.body)["identifier"] if i["system"] == GROUP_IPP_SYSTEM)
    nurse = signed_in(web.base, "nurse")
    nurse.get(f"/patients/{patient}")
    assert nurse.get("/admin/audit").status_code == 403
    admin = signed_in(web.base, "admin")
    wait_for(lambda: f"GET /patients/{patient}" in admin.get("/admin/audit", params={"patient": number}).text, 10)
    page = admin.get("/admin/audit", params={"patient": number, "user": "nurse"})
    assert page.status_code == 200 and "Journal des accès" in page.text and f"GET /patients/{patient}" in page.text
    assert "<td>dossier<br>" in page.text, "what was done, in French"
    unknown = admin.get("/admin/audit", params={"patient": "000000000"})
    assert unknown.status_code == 400 and "Aucun patient" in unknown.text
    assert admin.get("/admin/audit", params={"day": "31/02/2026"}).status_code == 400



def test_the_command_line_reads_and_prunes_the_trail_and_is_on_it(web: RebondServer) -> None:
    patient = inpatients_of_a_ward(web)[1][0]
    signed_in(web.base, "doctor").get(f"/patients/{patient}")
    wait_for(lambda: any(a.agent == "doctor" for a in open_store(web.db).accesses(patient=patient)), 10)
    listed = rebond("audit", "list", "--patient", patient, "--user", "doctor", "--json", "--db", web.db)
    assert listed.returncode == 0, listed.stderr
    lines = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert lines and all(line["agent"] == "doctor" and patient in line["listed"] for line in lines)
    assert lines[0]["what"] == "chart" and lines[0]["entity"] == f"GET /patients/{patient}"
    mine = open_store(web.db).accesses(patient=patient, limit=1)[0]
    assert mine.channel == "cli" and mine.what == "audit trail", "reading the trail is an access too"

    for args, said in ((["list", "--since", "hier"], "is not a day"), (["list", "--patient", "000000000"], "no patient"),
                       (["prune", "--older-than", "7"], "30 days or more")):
        refused = rebond("audit", *args, "--db", web.db)
        assert refused.returncode == 1 and said in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    kept = len(open_store(web.db).accesses(limit=100_000))
    pruned = rebond("audit", "prune", "--older-than", "30", "--db", web.db)
    assert pruned.returncode == 0 and "removed 0 access(es)" in pruned.stdout
    assert len(open_store(web.db).accesses(limit=100_000)) == kept + 1  # nothing that recent went; the pruning is recorded


def test_a_site_nodes_accesses_reach_the_central_trail_also_those_made_while_cut_off(demo_db: str, tmp_path: Any,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    central = RebondServer(demo_db).start()
    site: SiteServer | None = None
    try:
        monkeypatch.setenv("REBOND_PASSWORD", "site-2026")
        for name, role in (("site-h1", "site"), ("dpo", "admin")):
            assert rebond("accounts", "add", name, "--role", role, "--db", central.db).returncode == 0
        token = rebond("accounts", "token", "site-h1", "--label", "site node H1", "--db", central.db).stdout.strip()
        auditor = rebond("accounts", "token", "dpo", "--label", "audit", "--db", central.db).stdout.strip()
        first, second = inpatients_of_a_ward(central)[1][:2]
        site = SiteServer(f"sqlite:///{tmp_path}/site-H1.db", central, upstream_token=token).start()
        wait_for(lambda: site.status()["accounts"]["copied_at"] is not None, 60)  # type: ignore[index]

        nurse = signed_in(site.base, "nurse")  # the central account, copied to the site
        assert nurse.get(f"/patients/{first}").status_code == 200
        took = wait_for(lambda: any(e["source"]["site"] == "H1" for e in trail_of(central, auditor, patient=first)), 30)
        print(f"\nan access at the site node was on the central trail {took:.1f} s later")

        central.kill()
        wait_for(lambda: site.status()["upstream_reachable"] is False, 10)
        assert nurse.get(f"/patients/{second}").status_code == 200  # cut off: on the site's trail only, for now
        central.start()
        wait_for(lambda: any(e["source"]["site"] == "H1" and e["agent"][0]["who"]["identifier"]["value"] == "nurse"
                             for e in trail_of(central, auditor, patient=second)), 30)
        assert site.status()["audit_sent"]["problem"] is None  # type: ignore[index]
        assert "envoyées au site central" in httpx.get(f"{site.base}/status").text

        lines = open_store(site.db).accesses_after("", node="H1")
        again = httpx.post(f"{central.fhir}/$audit-import", content=orjson.dumps({"accesses": [access_to_json(a) for a in lines]}),
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, timeout=30)
        assert again.status_code == 200 and again.json() == {"received": len(lines), "new": 0}, "a line sent twice is kept once"
        by_system = httpx.post(f"{central.fhir}/$audit-import", content=b'{"accesses": []}', headers=central.headers, timeout=30)
        assert by_system.status_code == 403, "only a site node sends its trail"
        garbled = httpx.post(f"{central.fhir}/$audit-import", content=b'{"accesses": [["x"]]}',
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert garbled.status_code == 400 and garbled.json()["resourceType"] == "OperationOutcome"
    finally:
        if site is not None:
            site.stop()
        central.stop()


#: the web app's pages that show or take no patient's data: every other page must be on the audit trail
NO_PATIENT_DATA = {"/", "/login", "/logout", "/language/{lang}", "/auth/authorize", "/directory", "/procedures", "/admin/accounts",
                   "/status/situation", "/static"}


def test_every_page_with_patient_data_is_on_the_trail(store: Store) -> None:
    """A page added without its line in WEB_PAGES would read or write patient data unrecorded: it fails here."""
    from rebond.security.accounts import Accounts
    from rebond.security.audit import WEB_PAGES
    from rebond.web.app import WebApp

    paths = {getattr(route, "path", "") for route in WebApp(store, Accounts(store)).routes()}
    assert paths - NO_PATIENT_DATA - set(WEB_PAGES) == set(), "each must be in WEB_PAGES, or in NO_PATIENT_DATA if it shows none"
    assert set(WEB_PAGES) <= paths, "no line for a page that does not exist"
