"""Site nodes as real processes beside a real central server: following, freshness, cut-off, restarts."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from rebond.hl7.intake import receive
from rebond.security.accounts import PEOPLE
from rebond.site.node import SiteNode
from rebond.store import open_store
from rebond.store.base import Store
from tests.hl7_messages import oru
from tests.pg_harness import PostgresServer
from tests.server import RebondServer, SiteServer, rebond
from tests.web_client import signed_in

FHIR = {"Content-Type": "application/fhir+json"}


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError("not within the time allowed")


def start_site(central: RebondServer, tmp_path: Path, account: tuple[str, str, str]) -> SiteServer:
    """Site node H1 following `central`, with one account of its own (name, role, display), once it holds the data."""
    from rebond.security.accounts import Accounts

    site_db = f"sqlite:///{tmp_path}/site-H1.db"
    store = open_store(site_db)
    username, role, display = account
    Accounts(store).save(username, "rebond-demo", role, display)
    store.close()
    site = SiteServer(site_db, central).start()
    wait_for(lambda: site.status()["data_as_of"] is not None, 120)  # the first copy of the demo group
    return site


@pytest.fixture
def group(demo_db: str, tmp_path: Path) -> Iterator[tuple[RebondServer, SiteServer]]:
    central = RebondServer(demo_db).start()
    site = start_site(central, tmp_path, ("nurse", "nurse", "LEROY Hélène"))
    yield central, site
    site.stop()
    central.stop()


def create_at(server: RebondServer, family: str) -> dict[str, object]:
    response = httpx.post(f"{server.fhir}/Patient", json={"resourceType": "Patient", "name": [{"family": family}]},
                          headers={**FHIR, **server.headers}, timeout=10)
    assert response.status_code == 201, response.text
    return dict(response.json())


def site_read(site: SiteServer, path: str) -> httpx.Response:
    return httpx.get(f"{site.fhir}/{path}", headers=site.headers, timeout=10)


def test_a_central_write_reaches_the_site_within_a_second_with_the_same_version(group: tuple[RebondServer, SiteServer]) -> None:
    central, site = group
    created = create_at(central, "Suivi")
    took = wait_for(lambda: site_read(site, f"Patient/{created['id']}").status_code == 200)
    copy = site_read(site, f"Patient/{created['id']}")
    assert copy.json()["meta"] == created["meta"], "the same version, the same time"
    assert took < 2.0
    status = site.status()
    for field in ("role", "site_id", "upstream_reachable", "last_change_applied_at", "lag_seconds", "journal_pending", "conflicts_open"):
        assert field in status
    assert status["role"] == "site" and status["site_id"] == "H1" and status["upstream_reachable"] is True
    assert float(status["lag_seconds"]) < 5  # type: ignore[arg-type]
    assert copy.headers["x-rebond-upstream"] == "reachable" and copy.headers["x-rebond-data-as-of"] != "never"
    page = httpx.get(f"{site.base}/status")  # for people: no sign-in, no patient data
    assert page.status_code == 200 and "nœud de site · H1" in page.text and "joignable" in page.text
    central_status = httpx.get(f"{central.base}/status", headers={"Accept": "application/json"}).json()
    assert central_status["role"] == "central" and central_status["upstream_reachable"] is None


def test_the_site_keeps_serving_and_says_since_when_it_is_cut_off(group: tuple[RebondServer, SiteServer]) -> None:
    central, site = group
    wait_for(lambda: site.status()["accounts"]["problem"] is not None)  # its token's role is system, not site: it says so
    assert "role 'site'" in site.status()["accounts"]["problem"] and site.status()["accounts"]["from_central"] is None
    created = create_at(central, "Coupure")
    wait_for(lambda: site_read(site, f"Patient/{created['id']}").status_code == 200)
    central.kill()
    killed_at = time.monotonic()
    detected = wait_for(lambda: site.status()["upstream_reachable"] is False, 10)
    print(f"\nloss of the central site detected in {detected:.1f} s")
    assert time.monotonic() - killed_at < 5
    read = site_read(site, f"Patient/{created['id']}")
    assert read.status_code == 200, "reads are never interrupted"
    assert read.headers["x-rebond-upstream"].startswith("unreachable; since=")
    nurse = signed_in(site.base, "nurse")
    page = nurse.get("/")
    assert "site central injoignable depuis" in page.text and "Données à jour à" in page.text
    kept = httpx.post(f"{site.fhir}/Patient", json={"resourceType": "Patient", "name": [{"family": "Urgence"}]},
                      headers={**FHIR, **site.headers})
    assert kept.status_code == 201, "the site accepts the writes care needs while cut off"
    assert site.status()["journal_pending"] == 1

    central.start()  # the same store and port: the central site comes back
    wait_for(lambda: site.status()["upstream_reachable"] is True, 15)
    after = create_at(central, "Retour")
    wait_for(lambda: site_read(site, f"Patient/{after['id']}").status_code == 200)
    wait_for(lambda: site.status()["journal_pending"] == 0, 15)
    replayed = httpx.get(f"{central.fhir}/Patient/{kept.json()['id']}", headers=central.headers)
    assert replayed.status_code == 200 and replayed.json()["name"][0]["family"] == "Urgence"


def test_site_contacts_list_every_known_site_heard_or_not() -> None:
    from rebond.site.contacts import FORGET_AFTER, IN_CONTACT_SECONDS, SiteContacts

    now = [1_000.0]
    contacts = SiteContacts(clock=lambda: now[0])
    contacts.heard("H1", "site-h1", "10.0.1.5", behind=True)
    now[0] += 3
    listed = {s["site"]: s for s in contacts.status([("H1", "Hôpital Nord"), ("H2", "Hôpital Sud")])}
    assert listed["H1"]["in_contact"] and listed["H1"]["behind"] and listed["H1"]["seconds_since"] == 3.0
    assert listed["H1"]["name"] == "Hôpital Nord" and listed["H1"]["address"] == "10.0.1.5"
    assert listed["H2"]["name"] == "Hôpital Sud" and listed["H2"]["last_contact"] is None and not listed["H2"]["in_contact"]
    now[0] += IN_CONTACT_SECONDS
    assert [s["in_contact"] for s in contacts.status([])] == [False], "a site heard from, but not for a while"
    now[0] += FORGET_AFTER
    assert contacts.status([]) == [], "no longer a site of the group, and not heard from for a week"


def test_a_site_heard_by_one_server_process_is_in_contact_for_all(store: Store) -> None:
    """A site node polls over one kept connection: the process that holds it shares what it hears through the store."""
    from rebond.site.contacts import SiteContacts

    now = [1_000.0]
    hearing, other = SiteContacts(store, clock=lambda: now[0]), SiteContacts(store, clock=lambda: now[0])
    hearing.heard("H1", "site-h1", "10.0.1.5", behind=False)
    assert not other.status([("H1", "Hôpital Nord")])[0]["in_contact"], "not shared yet"
    assert hearing.share() == 1 and hearing.share() == 0, "what was heard since, once"
    now[0] += 2
    [shown] = other.status([("H1", "Hôpital Nord")])
    assert shown["in_contact"] and shown["address"] == "10.0.1.5" and shown["seconds_since"] == 2.0
    other.heard("H1", "site-h1", "10.0.1.6", behind=True)  # the site reconnected, to the other process: its news wins
    now[0] += 1
    assert hearing.status([])[0]["address"] == "10.0.1.5", "not shared yet"
    other.share()
    assert hearing.status([])[0]["address"] == "10.0.1.6" and hearing.status([])[0]["behind"]


def test_with_two_server_processes_every_status_answer_says_the_site_is_in_contact(demo_db: str, tmp_path: Path) -> None:
    """`rebond serve --workers 2`: the site node's polls reach one process; the status, asked anew each time (a new
    connection, so either process answers), says it is in contact every time."""
    central = RebondServer(demo_db, "--workers", "2").start()
    site = start_site(central, tmp_path, ("nurse", "nurse", "LEROY Hélène"))
    try:
        time.sleep(3)  # past a share
        answers = []
        for _ in range(12):
            with httpx.Client() as fresh:  # a connection of its own: the kernel hands it to either process
                facts = fresh.get(f"{central.base}/status", headers={"Accept": "application/json"}, timeout=10).json()
            answers.append(next(s for s in facts["sites"] if s["site"] == "H1")["in_contact"])
        assert all(answers), answers
    finally:
        site.stop()
        central.stop()


def test_the_central_status_page_says_which_site_nodes_are_in_contact(group: tuple[RebondServer, SiteServer]) -> None:
    central, site = group

    def h1() -> dict[str, object]:
        return next(s for s in central.status()["sites"] if s["site"] == "H1")  # type: ignore[union-attr]

    wait_for(lambda: h1()["in_contact"] is True)
    assert h1()["name"] and h1()["polls"] and h1()["account"] == "interface-tests"
    page = httpx.get(f"{central.base}/status", headers={"Accept-Language": "fr"}).text
    assert "Nœuds des sites du groupe" in page and "en lien" in page
    site.kill()  # the hospital's link, or its server, is gone
    took = wait_for(lambda: h1()["in_contact"] is False, 20)
    print(f"\nthe central status page said the site was out of contact {took:.1f} s after its last poll stopped")
    page = httpx.get(f"{central.base}/status", headers={"Accept-Language": "fr"}).text
    assert "sans lien" in page and "il continue sur sa propre copie" in page


def test_the_staff_sign_in_at_a_cut_off_site_with_their_central_password(demo_db: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    central = RebondServer(demo_db).start()
    site: SiteServer | None = None
    try:
        monkeypatch.setenv("REBOND_PASSWORD", "urgence-2026")
        assert rebond("accounts", "add", "urgentiste", "--role", "physician", "--name", "Dr URGENCE", "--db", central.db).returncode == 0
        assert rebond("accounts", "add", "site-h1", "--role", "site", "--db", central.db).returncode == 0
        token = rebond("accounts", "token", "site-h1", "--label", "site node H1", "--db", central.db).stdout.strip()

        directory = f"{central.fhir}/$site-accounts"
        assert httpx.get(directory, timeout=10).status_code == 401
        refused = httpx.get(directory, headers=central.headers, timeout=10)  # an interface's token (role system)
        assert refused.status_code == 403 and "role 'site'" in refused.json()["issue"][0]["diagnostics"]
        shared = httpx.get(directory, headers={"Authorization": f"Bearer {token}"}, timeout=10).json()["accounts"]
        assert "urgentiste" in {a["username"] for a in shared} and {a["role"] for a in shared} <= set(PEOPLE)
        assert not {a["role"] for a in shared} & {"system", "site"}, "interfaces' and site nodes' accounts stay on the central site"

        site = SiteServer(f"sqlite:///{tmp_path}/site-H1.db", central, upstream_token=token).start()
        wait_for(lambda: site.status()["accounts"]["copied_at"] is not None, 30)
        assert site.status()["accounts"]["from_central"] == len(shared) and site.status()["accounts"]["problem"] is None
        assert signed_in(site.base, "urgentiste", "urgence-2026").get("/").status_code == 200
        made_here = httpx.post(f"{site.fhir}/Patient", json={"resourceType": "Patient", "name": [{"family": "Origine"}]},
                               headers={**FHIR, **site.headers}, timeout=10)
        assert made_here.status_code == 201
        assert feed_site_of(central, made_here.json()["id"]) == {"H1"}, "a role-site token names where its writes come from"

        central.kill()
        wait_for(lambda: site.status()["upstream_reachable"] is False, 10)
        doctor = signed_in(site.base, "urgentiste", "urgence-2026")  # the password the physician always uses, central gone
        assert "site central injoignable" in doctor.get("/").text
        assert site.status()["accounts"]["from_central"] == len(shared), "the copies stay while the central site is gone"
        page = httpx.get(f"{site.base}/status", timeout=10).text  # for people: French first
        assert f"{len(shared)} copiés ici, dernière copie le" in page
    finally:
        if site is not None:
            site.stop()
        central.stop()


def test_a_cut_off_site_keeps_making_downtime_packs_that_say_where_they_come_from(demo_db: str, tmp_path: Path) -> None:
    from rebond.downtime.library import PackLibrary
    from tests.test_downtime import pages_of

    central = RebondServer(demo_db).start()
    folder = tmp_path / "packs-H1"
    site = SiteServer(f"sqlite:///{tmp_path}/site-H1.db", central, "H1", "--downtime-dir", str(folder), "--downtime-every", "0.02")
    try:
        site.start()
        wait_for(lambda: site.status()["data_as_of"] is not None, 120)
        central.kill()
        wait_for(lambda: site.status()["upstream_reachable"] is False, 10)
        cut_at = time.time()

        def a_round_made_after_the_cut() -> bool:
            schedule = dict(site.status().get("downtime_packs") or {})  # type: ignore[call-overload]
            started, finished = float(schedule.get("last_started") or 0), float(schedule.get("last_finished") or 0)
            return started > cut_at + 0.5 and finished > started  # the round that finished is the one begun after the cut

        wait_for(a_round_made_after_the_cut, 60)
        latest = PackLibrary(folder).latest()
        assert latest and latest[0].as_of.timestamp() > cut_at
        cover = pages_of(folder / latest[0].ward_id / latest[0].filename)[0]
        assert "nœud de site H1" in cover and "site central injoignable" in cover
    finally:
        site.stop()
        central.stop()


def test_a_restarted_site_resumes_from_its_cursor_and_applies_each_change_once(group: tuple[RebondServer, SiteServer]) -> None:
    central, site = group
    site.stop()
    created = create_at(central, "Reprise")
    updated = httpx.put(f"{central.fhir}/Patient/{created['id']}", json={**created, "gender": "female"},
                        headers={**FHIR, **central.headers}).json()
    site.start()
    wait_for(lambda: site_read(site, f"Patient/{created['id']}").json().get("gender") == "female")
    history = site_read(site, f"Patient/{created['id']}/_history").json()
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    assert site_read(site, f"Patient/{created['id']}").json()["meta"] == updated["meta"]


def test_hl7_at_a_cut_off_site_is_applied_here_and_journaled(tmp_path: Path) -> None:
    from rebond.site.node import SiteNode

    store = open_store(f"sqlite:///{tmp_path}/s.db", site_id="H1")
    try:
        SiteNode(store, "http://127.0.0.1:9/fhir", "")
        answer = receive(store, oru("S1", "950000001", "F1"))
        assert answer.code == "AA"
        assert store.counts().get("Observation", 0) == 3
        pending = store.journal("pending")
        assert {e.resource_type for e in pending} == {"Patient", "ServiceRequest", "Observation", "DiagnosticReport"}
        assert all(e.method == "create" and e.base_version == 0 for e in pending)
    finally:
        store.close()


def test_a_write_at_a_connected_site_is_on_the_central_site_before_it_is_answered(group: tuple[RebondServer, SiteServer]) -> None:
    central, site = group
    for attempt in range(3):  # the first write also warms the central server up
        started = time.monotonic()
        written = httpx.post(f"{site.fhir}/Patient", json={"resourceType": "Patient", "name": [{"family": f"Connecté{attempt}"}]},
                             headers={**FHIR, **site.headers})
        took = time.monotonic() - started
    assert written.status_code == 201
    print(f"\na write at a connected site answered in {took * 1000:.0f} ms, the central site having it")
    assert httpx.get(f"{central.fhir}/Patient/{written.json()['id']}", headers=central.headers).status_code == 200
    assert site.status()["journal_pending"] == 0
    central_copy = httpx.get(f"{central.fhir}/Patient/{written.json()['id']}", headers=central.headers).json()
    wait_for(lambda: site_read(site, f"Patient/{written.json()['id']}").json() == central_copy, 5)


def feed_site_of(central: RebondServer, resource_id: str) -> set[str]:
    """The change-site of every feed entry of one resource on the central site."""
    sites: set[str] = set()
    page = httpx.get(f"{central.fhir}/$changes?_count=1000", headers=central.headers).json()
    while page["entry"]:
        for entry in page["entry"]:
            if entry["fullUrl"].endswith(f"/{resource_id}"):
                sites |= {x["valueString"] for x in entry["extension"] if x["url"].endswith("change-site")}
        page = httpx.get(page["link"][0]["url"], headers=central.headers).json()
    return sites


def test_the_central_feed_says_which_site_a_replayed_write_came_from(group: tuple[RebondServer, SiteServer]) -> None:
    central, site = group
    written = httpx.post(f"{site.fhir}/Patient", json={"resourceType": "Patient", "name": [{"family": "Origine"}]},
                         headers={**FHIR, **site.headers})
    wait_for(lambda: httpx.get(f"{central.fhir}/Patient/{written.json()['id']}", headers=central.headers).status_code == 200, 5)
    assert feed_site_of(central, written.json()["id"]) == {"H1"}
    nurse = rebond("accounts", "token", "nurse", "--db", central.db).stdout.strip()
    claimed = httpx.post(f"{central.fhir}/Patient", json={"resourceType": "Patient"},
                         headers={**FHIR, "Authorization": f"Bearer {nurse}", "X-Rebond-Site": "H9"})
    assert claimed.status_code == 201
    assert feed_site_of(central, claimed.json()["id"]) == {"central"}, "only an interface account may say where a write came from"


def history_of(server: RebondServer, path: str) -> list[dict[str, object]]:
    page = httpx.get(f"{server.fhir}/{path}/_history", headers=server.headers, timeout=10).json()
    return [entry for entry in page.get("entry", [])]


def test_writes_whose_answers_were_lost_are_settled_once_without_false_conflicts(demo_db: str, tmp_path: Path) -> None:
    """The link dies after the central site has acted on a replay but before its answer comes back. When it returns,
    the site sends the same writes again: each is found already applied. None becomes a conflict, none is applied
    twice, and a central edit made meanwhile on a record the site created is not overwritten."""
    from tests.proxy import CuttableLink

    central = RebondServer(demo_db).start()
    link = CuttableLink(central.port)
    site_url = f"sqlite:///{tmp_path}/site-H1.db"
    site = SiteServer(site_url, central, upstream=f"http://127.0.0.1:{link.port}/fhir").start()
    try:
        wait_for(lambda: site.status()["data_as_of"] is not None, 120)
        edited, removed, again = create_at(central, "Modifiée"), create_at(central, "Supprimée"), create_at(central, "Refaite")
        for record in (edited, removed):
            wait_for(lambda r=record: site_read(site, f"Patient/{r['id']}").status_code == 200)
        assert httpx.delete(f"{central.fhir}/Patient/{again['id']}", headers=central.headers).status_code == 204
        wait_for(lambda: site_read(site, f"Patient/{again['id']}").status_code == 410)

        link.lose_answers()
        created_id = "3f0d5a55-2d0c-4d5e-9b1e-7f8a1d2c3b4a"
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {**edited, "name": [{"family": "Modifiée", "given": ["au site"]}]},
             "request": {"method": "PUT", "url": f"Patient/{edited['id']}"}},
            {"resource": {"resourceType": "Patient", "id": created_id, "name": [{"family": "Créée"}]},
             "request": {"method": "PUT", "url": f"Patient/{created_id}"}},
            {"request": {"method": "DELETE", "url": f"Patient/{removed['id']}"}},
            {"resource": {"resourceType": "Patient", "id": again["id"], "name": [{"family": "Refaite", "given": ["au site"]}]},
             "request": {"method": "PUT", "url": f"Patient/{again['id']}"}}]}
        answer = httpx.post(site.fhir, json=bundle, headers={**FHIR, **site.headers}, timeout=30)
        assert answer.status_code == 200, answer.text

        def central_read(rid: str) -> httpx.Response:
            return httpx.get(f"{central.fhir}/Patient/{rid}", headers=central.headers, timeout=10)

        # the central site acted on all three; the site heard nothing back
        wait_for(lambda: central_read(removed["id"]).status_code == 410 and central_read(created_id).status_code == 200, 15)
        assert central_read(edited["id"]).json()["name"][0]["given"] == ["au site"]
        wait_for(lambda: site.status()["upstream_reachable"] is False, 15)
        assert site.status()["journal_pending"] == 4
        # on the central site, someone corrects the record the site created, before the link returns
        corrected = {**central_read(created_id).json(), "name": [{"family": "Créée", "given": ["corrigée au central"]}]}
        assert httpx.put(f"{central.fhir}/Patient/{created_id}", json=corrected, headers={**FHIR, **central.headers}).status_code == 200

        link.restore()
        wait_for(lambda: site.status()["journal_pending"] == 0, 30)
        status = site.status()
        assert status["conflicts_open"] == 0, "a write the central site already has is not a conflict"
        assert len(history_of(central, f"Patient/{edited['id']}")) == 2, "applied once"
        assert len(history_of(central, f"Patient/{removed['id']}")) == 2, "deleted once"
        assert central_read(created_id).json()["name"][0]["given"] == ["corrigée au central"], "the central correction stays"
        assert len(history_of(central, f"Patient/{created_id}")) == 2
        assert len(history_of(central, f"Patient/{again['id']}")) == 3, "made again once, after its deletion"
        wait_for(lambda: site_read(site, f"Patient/{created_id}").json().get("name", [{}])[0].get("given") == ["corrigée au central"])
    finally:
        site.stop()
        link.close()
        central.stop()


def test_a_link_gone_dark_is_detected_and_holds_up_no_one(demo_db: str, tmp_path: Path) -> None:
    """The central site's link goes dark without a reset (its provider loses power): no connection is refused or closed,
    every request just hangs. The site must notice by its own timeouts, answer the writes made meanwhile within its
    forwarding wait, keep its pages quick, and send everything once the link returns."""
    from tests.proxy import CuttableLink

    central = RebondServer(demo_db).start()
    link = CuttableLink(central.port)
    from rebond.security.accounts import Accounts

    site_url = f"sqlite:///{tmp_path}/site-H1.db"
    store = open_store(site_url)
    Accounts(store).save("nurse", "rebond-demo", "nurse", "LEROY Hélène")
    store.close()
    site = SiteServer(site_url, central, upstream=f"http://127.0.0.1:{link.port}/fhir").start()
    try:
        wait_for(lambda: site.status()["data_as_of"] is not None, 120)
        nurse = signed_in(site.base, "nurse")
        assert nurse.get("/").status_code == 200
        link.black_hole()
        went_dark = time.monotonic()
        started = time.monotonic()
        written = httpx.post(f"{site.fhir}/Patient", json={"resourceType": "Patient", "name": [{"family": "Panne"}]},
                             headers={**FHIR, **site.headers}, timeout=30)
        answered = time.monotonic() - started
        assert written.status_code == 201
        wait_for(lambda: site.status()["upstream_reachable"] is False, 15)
        detected = time.monotonic() - went_dark
        print(f"\nlink gone dark: noticed within {detected:.1f} s; a write made at that moment answered in {answered:.1f} s")
        assert detected < 10
        assert answered < SiteNode.FORWARD_WAIT + 2, "answered after the forwarding wait at most: it is durable here"
        later = []
        for n in range(5):
            started = time.monotonic()
            assert nurse.get("/").status_code == 200
            r = httpx.post(f"{site.fhir}/Patient", json={"resourceType": "Patient", "name": [{"family": f"Panne{n}"}]},
                           headers={**FHIR, **site.headers}, timeout=30)
            assert r.status_code == 201
            later.append(r.json()["id"])
            assert time.monotonic() - started < 2, "once the loss is known, nothing waits for the central site"
        assert site.status()["journal_pending"] == 6

        link.restore()
        wait_for(lambda: site.status()["journal_pending"] == 0, 60)
        for rid in [written.json()["id"], *later]:
            copy = httpx.get(f"{central.fhir}/Patient/{rid}/_history", headers=central.headers, timeout=10).json()
            assert copy["total"] == 1, "on the central site once"
        assert site.status()["conflicts_open"] == 0
    finally:
        site.stop()
        link.close()
        central.stop()


def test_a_transaction_held_open_on_the_central_site_shows_as_a_wait_not_as_fresh_data(postgres: PostgresServer,
                                                                                      tmp_path: Path) -> None:
    """On PostgreSQL a version can be numbered long before it commits (a slow transaction). The feed waits at that gap,
    so as not to skip it, and the writes after it wait too. The site must then say so: its data is complete only up to
    the gap, and it is not « à jour » once the wait lasts."""
    import threading

    from rebond.site.follower import FRESH_SECONDS

    url = postgres.create_database("site_gap")
    central = RebondServer(url).start()
    site = SiteServer(f"sqlite:///{tmp_path}/site-H1.db", central).start()
    store = open_store(url)
    created, release = threading.Event(), threading.Event()

    def slow_transaction() -> None:
        with store.transaction() as tx:
            tx.create({"resourceType": "Patient", "name": [{"family": "Lent"}]})
            created.set()
            release.wait(60)

    holder = threading.Thread(target=slow_transaction, daemon=True)
    try:
        wait_for(lambda: site.status()["data_as_of"] is not None, 60)
        holder.start()
        assert created.wait(10)
        after = create_at(central, "Après")  # committed first, numbered after the slow one
        wait_for(lambda: site.status()["feed_waiting_since"] is not None, 5)
        assert site_read(site, f"Patient/{after['id']}").status_code == 404, "held behind the gap: nothing is skipped"
        time.sleep(FRESH_SECONDS + 1.5)
        status = site.status()
        assert status["upstream_reachable"] is True and float(status["lag_seconds"]) > FRESH_SECONDS, status  # type: ignore[arg-type]
        release.set()
        holder.join(10)
        wait_for(lambda: site_read(site, f"Patient/{after['id']}").status_code == 200, 10)
        wait_for(lambda: site.status()["feed_waiting_since"] is None and float(site.status()["lag_seconds"]) < 2, 10)  # type: ignore[arg-type]
        assert len(site_read(site, "Patient?name=Lent").json().get("entry", [])) == 1
    finally:
        release.set()
        site.stop()
        central.stop()
        store.close()


def test_a_number_lost_on_the_central_site_right_after_the_sites_cursor_holds_nothing_up(postgres: PostgresServer,
                                                                                       tmp_path: Path) -> None:
    """A write rolled back on the central site (PostgreSQL) leaves its sequence number unused for ever, as does a
    failover for the numbers the lost primary had handed out. When that number comes right after the site's cursor, the
    feed's first answer is empty and ends at the gap with the horizon it took: the site must keep that cursor, or it asks
    again from before the gap, gets a new horizon each time, and never passes it."""
    url = postgres.create_database("site_lost_number")
    central = RebondServer(url).start()
    site = SiteServer(f"sqlite:///{tmp_path}/site-H1.db", central).start()
    store = open_store(url)
    try:
        first = create_at(central, "Avant")
        wait_for(lambda: site_read(site, f"Patient/{first['id']}").status_code == 200, 60)
        time.sleep(1)  # the site has read to the end: its cursor is the last number
        with pytest.raises(RuntimeError), store.transaction() as tx:  # the next number, taken and never committed
            tx.create({"resourceType": "Patient", "name": [{"family": "Perdu"}]})
            raise RuntimeError("rolled back")
        after = create_at(central, "Après")
        took = wait_for(lambda: site_read(site, f"Patient/{after['id']}").status_code == 200, 15)
        print(f"\nthe write after a lost number reached the site in {took:.1f} s")
    finally:
        site.stop()
        central.stop()
        store.close()
