"""The crisis cell's situation updates: kept as FHIR, shown on the status page and atop every page, on site nodes too."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import pytest

from rebond.clinical.recording import InvalidForm
from rebond.clinical.records import Clinician
from rebond.ops.situation import Situation, Update, communication, from_resource, module_states, publish, read_form, recent
from rebond.store.base import Store, Unavailable
from tests.server import RebondServer, rebond
from tests.test_site import start_site, wait_for
from tests.web_client import csrf_of, signed_in

CELL = Clinician("crisis", "Cellule de crise")
NOW = dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.UTC)


def said(text: str, at: dt.datetime, module: str | None = None, state: str | None = None, site: str | None = None) -> Update:
    return read_form({"text": text, "module": module or "", "state": state or "", "site": site or ""}, at)


def test_an_update_is_a_valid_communication_found_by_its_category(store: Store) -> None:
    update = read_form({"text": "Téléphonie coupée.\nTalkies canal 3.", "module": "phones", "state": "down", "site": "H1",
                        "next": "10:00"}, NOW)
    kept = publish(store, update, Clinician("crisis", "Cellule de crise", "p-1"))
    publish(store, update, Clinician("crisis", "Cellule de crise", "p-1"))  # the same form sent twice: published once
    assert (stored := store.read("Communication", update.id)) is not None and stored.version == 1
    resource = communication(kept, Clinician("crisis", "Cellule de crise", "p-1"))
    assert resource["sender"] == {"display": "Cellule de crise", "reference": "Practitioner/p-1"}
    assert resource["priority"] == "urgent" and resource["recipient"][0]["identifier"]["value"] == "H1"
    found = recent(store, NOW, site=None)
    assert [(u.id, u.text, u.module, u.state, u.site, u.author) for u in found] == [
        (update.id, "Téléphonie coupée.\nTalkies canal 3.", "phones", "down", "H1", "Cellule de crise")]
    # 10:00 in Paris is 09:00 UTC, already past at 09:30 UTC: the next update is tomorrow's
    assert found[0].next_update == dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)
    assert recent(store, NOW, site="H2") == [], "another site's update is not shown there"
    assert recent(store, NOW + dt.timedelta(days=8), site=None) == [], "a week later it is no longer listed"
    # a Communication that is not a situation update (a message between people) is never taken for one
    other = {"resourceType": "Communication", "status": "completed", "sent": "2026-12-02T09:31:00Z", "payload": [{"contentString": "Bonjour"}]}
    assert from_resource(other) is None


def test_a_correction_made_within_the_same_second_is_the_newer_word(store: Store) -> None:
    publish(store, said("Messagerie coupée", NOW, "messaging", "down"), CELL)
    publish(store, said("Fausse alerte : messagerie en service", NOW + dt.timedelta(milliseconds=3), "messaging", "operational"), CELL)
    messaging = next(m for m in module_states(recent(store, NOW, site=None)) if m.module == "messaging")
    assert messaging.state == "operational" and messaging.declared[0].text.startswith("Fausse alerte")


def test_a_form_that_cannot_be_published_says_why_field_by_field() -> None:
    with pytest.raises(InvalidForm) as refused:
        read_form({"text": " ", "module": "coffee", "state": "down", "site": "H 1", "next": "25:00"}, NOW)
    assert refused.value.problems == {"text": "required", "module": "choose-one", "site": "not-a-site", "next": "not-a-time"}
    with pytest.raises(InvalidForm) as no_module:
        read_form({"text": "Tout va mal", "state": "down"}, NOW)
    assert no_module.value.problems == {"state": "state-needs-module"}
    with pytest.raises(InvalidForm) as long:
        read_form({"text": "x" * 2001}, NOW)
    assert long.value.problems == {"text": "too-long:2000"}


def test_each_module_shows_the_newest_word_for_the_group_and_for_each_site() -> None:
    minute = dt.timedelta(minutes=1)
    updates = sorted([
        said("Labo H1 en panne : résultats par fax", NOW, "results", "down", "H1"),
        said("Messagerie lente partout", NOW + minute, "messaging", "degraded"),
        said("Messagerie rétablie à H2", NOW + 2 * minute, "messaging", "operational", "H2"),
        said("Point général", NOW + 3 * minute),
        said("H3 : messagerie coupée", NOW - minute, "messaging", "down", "H3"),  # older than the group's word: overtaken
        said("Résultats dégradés partout", NOW + 4 * minute, "results", "degraded"),
    ], key=lambda u: u.sent, reverse=True)
    states = {m.module: m for m in module_states(updates)}
    assert states["records"].state is None and states["records"].declared == []
    assert [(u.site, u.state) for u in states["messaging"].declared] == [("H2", "operational"), (None, "degraded")]
    assert states["messaging"].state == "degraded"
    assert [(u.site, u.state) for u in states["results"].declared] == [(None, "degraded")], "the group's newer word speaks for H1"
    assert states["results"].state == "degraded"


class _Failing:
    """A store that stops answering, for the cache of the situation."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = False

    def __getattr__(self, name: str) -> object:
        if self.down and name == "search":
            raise Unavailable("the store did not answer")
        return getattr(self.store, name)


def test_the_situation_is_read_at_most_every_few_seconds_and_kept_when_the_store_fails(store: Store) -> None:
    now = [0.0]
    failing = _Failing(store)
    situation = Situation(failing, site=None, ttl=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert situation.updates() == []
    situation.publish(said("Téléphonie coupée", dt.datetime.now(dt.UTC), "phones", "down"), CELL)
    assert [u.text for u in situation.updates()] == ["Téléphonie coupée"], "a publication here is shown at once"
    publish(store, said("Écrit par un autre processus", dt.datetime.now(dt.UTC), "results", "degraded"), CELL)
    assert len(situation.updates()) == 1, "within the cache's seconds"
    assert len(situation.updates(fresh=True)) == 1, "fresh, but read within the second: one search a second at most"
    now[0] = 1.5
    assert len(situation.updates(fresh=True)) == 2, "the page that follows a publication reads at once"
    now[0] = 6.0
    publish(store, said("Point général", dt.datetime.now(dt.UTC)), CELL)
    now[0] = 12.0
    assert len(situation.updates()) == 3
    failing.down = True
    now[0] = 18.0
    assert len(situation.updates()) == 3 and situation.status()["problem"] == "the store did not answer"
    assert [m.module for m in situation.headline()] == ["phones", "results"], "the modules down first, then the degraded ones"


def communications(server: RebondServer) -> int:
    bundle = httpx.get(f"{server.fhir}/Communication?_summary=count", headers=server.headers, timeout=30).json()
    return int(bundle["total"])


def test_the_crisis_cell_publishes_and_everyone_sees_it(web: RebondServer) -> None:
    anonymous = httpx.get(f"{web.base}/status/situation", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")
    nurse = signed_in(web.base, "nurse")
    assert nurse.get("/status/situation").status_code == 403, "a nurse reads the situation, the crisis cell writes it"

    cell = signed_in(web.base, "crisis")
    form = cell.get("/status/situation")
    assert form.status_code == 200 and "Publier un point de situation" in form.text
    assert '<option value="H1">Hôpital' in form.text, "the group's sites to choose from (the small demo has one)"
    before = communications(web)
    refused = cell.post("/status/situation", data={"csrf": csrf_of(form.text), "text": "", "state": "down", "next": "9h"})
    assert refused.status_code == 422
    assert "a été publié : corrigez" in refused.text and "Choisissez le module" in refused.text and "HH:MM" in refused.text
    assert communications(web) == before, "nothing was kept"

    published = cell.post("/status/situation", data={
        "csrf": csrf_of(form.text), "text": "Téléphonie coupée dans tout le groupe : talkies canal 3, coursiers pour les bons.",
        "module": "phones", "state": "down", "site": "", "next": "23:45"})
    assert published.status_code == 303 and published.headers["location"] == "/status?published=1"
    assert communications(web) == before + 1

    page = httpx.get(f"{web.base}/status?published=1")  # the status page needs no sign-in
    assert page.status_code == 200 and "Votre point de situation est publié" in page.text
    assert "talkies canal 3" in page.text and "Téléphones" in page.text and "indisponible" in page.text
    assert "Prochain point à" in page.text and "tout le groupe" in page.text
    facts = httpx.get(f"{web.base}/status", headers={"Accept": "application/json"}).json()["situation"]
    phones = next(m for m in facts["modules"] if m["module"] == "phones")
    assert phones["state"] == "down" and phones["declared"][0]["site"] is None
    assert facts["updates"][0]["author"] == "Cellule de crise (démo)" and facts["updates"][0]["next_update"].endswith("Z")

    # named atop every staff page, within the few seconds each server process keeps what it read
    took = wait_for(lambda: "Cellule de crise : Téléphones : indisponible" in nurse.get("/").text, 10)
    print(f"\nthe banner named the module {took:.1f} s after the publication")

    back = cell.post("/status/situation", data={"csrf": csrf_of(form.text), "text": "Téléphonie rétablie.", "module": "phones",
                                                "state": "operational"})
    assert back.status_code == 303
    wait_for(lambda: "Cellule de crise" not in nurse.get("/").text, 10)  # once it works again, the banner goes
    assert "opérationnel" in httpx.get(f"{web.base}/status").text


def test_through_the_fhir_api_a_nurses_token_cannot_publish_change_or_remove_a_situation_update(web: RebondServer) -> None:
    nurse = {"Authorization": "Bearer " + rebond("accounts", "token", "nurse", "--label", "tests", "--db", web.db).stdout.strip()}
    update = communication(said("Messagerie coupée", dt.datetime.now(dt.UTC), "messaging", "down"), CELL)
    refused = httpx.post(f"{web.fhir}/Communication", json=update, headers=nurse)
    assert refused.status_code == 403 and "crisis cell" in refused.json()["issue"][0]["diagnostics"], refused.text
    in_a_bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Communication", "status": "completed"}, "request": {"method": "POST", "url": "Communication"}},
        {"resource": update, "request": {"method": "POST", "url": "Communication"}}]}
    assert httpx.post(web.fhir, json=in_a_bundle, headers=nurse).status_code == 403, "the whole transaction is refused"
    # an interface (a monitoring system) may publish one; the nurse can then neither change nor remove it
    kept = httpx.post(f"{web.fhir}/Communication", json=update, headers=web.headers)
    assert kept.status_code == 201, kept.text
    url = f"{web.fhir}/Communication/{kept.json()['id']}"
    plain = {**kept.json(), "category": [{"text": "note"}]}
    assert httpx.put(url, json=plain, headers=nurse).status_code == 403, "not even by taking the category away"
    assert httpx.delete(url, headers=nurse).status_code == 403
    assert httpx.get(url, headers=nurse).json()["meta"]["versionId"] == "1"
    message = httpx.post(f"{web.fhir}/Communication", json={"resourceType": "Communication", "status": "completed"}, headers=nurse)
    assert message.status_code == 201, "other Communications stay the nurse's to write"


def test_a_site_node_shows_the_groups_and_its_own_updates_and_keeps_publishing_when_cut_off(demo_db: str, tmp_path: Path) -> None:
    central = RebondServer(demo_db).start()
    site = start_site(central, tmp_path, ("crisis", "crisis", "Cellule de crise H1"))
    try:
        cell = signed_in(central.base, "crisis")
        form = cell.get("/status/situation").text
        for text, where in (("Labo central : résultats retardés", ""), ("H2 : scanner en panne", "H2"), ("H1 : messagerie coupée", "H1")):
            module = "messaging" if where == "H1" else "results"
            assert cell.post("/status/situation", data={"csrf": csrf_of(form), "text": text, "module": module,
                                                        "state": "degraded", "site": where}).status_code == 303
        took = wait_for(lambda: "H1 : messagerie coupée" in httpx.get(f"{site.base}/status").text, 10)
        print(f"\na situation update published centrally was on the site's status page in {took:.2f} s")
        shown = httpx.get(f"{site.base}/status").text
        assert "Labo central" in shown and "H2 : scanner" not in shown, "the group's and its own, not another site's"

        central.kill()
        wait_for(lambda: site.status()["upstream_reachable"] is False, 10)
        local = signed_in(site.base, "crisis")
        site_form = local.get("/status/situation").text
        assert '<option value="H1" selected>' in site_form, "at a site node, its own site by default"
        assert local.post("/status/situation", data={"csrf": csrf_of(site_form), "text": "Coupure du site central : passez au papier.",
                                                     "module": "records", "state": "down", "site": "H1"}).status_code == 303
        assert "passez au papier" in httpx.get(f"{site.base}/status").text, "shown at the site at once, cut off as it is"
        assert site.status()["journal_pending"] == 1

        central.start()
        wait_for(lambda: site.status()["journal_pending"] == 0, 20)
        facts = httpx.get(f"{central.base}/status", headers={"Accept": "application/json"}).json()["situation"]
        records = next(m for m in facts["modules"] if m["module"] == "records")
        assert records["state"] == "down" and records["declared"][0]["site"] == "H1", "replayed on the central site"
    finally:
        site.stop()
        central.stop()

