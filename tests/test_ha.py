"""The central site on a highly available PostgreSQL: what the store says of it, and a failover drill.

The drill runs etcd and two PostgreSQL servers under Patroni (tests/ha_harness.py), Rebond on both (one URL, libpq
keeps the primary), FHIR clients and an analyzer chain writing all along; then the primary's server is lost at once
(Patroni and PostgreSQL killed -9). Patroni promotes the synchronous standby; Rebond carries on there by itself, and
every write it had acknowledged is on the new primary, once. Other drills: a planned switchover (also behind HAProxy),
and a primary cut off the network that must stop taking writes before the standby is promoted (no split brain).
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from rebond.fhir.search import parse_search
from rebond.hl7.intake import CHANNEL
from rebond.store import open_store
from rebond.store.postgres import PostgresStore, connection_string
from tests.ha_harness import HAProxy, PatroniCluster, PatroniNode
from tests.hl7_messages import Sender
from tests.infrastructure import started
from tests.pg_harness import PostgresServer, free_port
from tests.server import RebondServer, SiteServer

DRILL = "urn:rebond:drill"


def test_connection_string_defaults() -> None:
    """What a lost server needs (timeouts, keepalives) is added unless the URL says it; several hosts keep the primary."""
    one = connection_string("postgresql://rebond@db:5432/rebond?connect_timeout=2")
    assert "connect_timeout=2" in one and "tcp_user_timeout=15000" in one and "keepalives_idle=10" in one
    assert "target_session_attrs" not in one
    two = connection_string("postgresql://rebond@db1:5432,db2:5432/rebond")
    assert "target_session_attrs=read-write" in two and "host=db1,db2" in two
    assert "target_session_attrs=any" in connection_string("postgresql://rebond@db1,db2/rebond?target_session_attrs=any")


def test_database_facts_without_a_standby(postgres: PostgresServer, tmp_path: Path) -> None:
    """A lone PostgreSQL is said to be one: no standby, commits on one server only."""
    store = open_store(postgres.create_database(f"ha{os.getpid()}"))
    try:
        facts = store.database()
    finally:
        store.close()
    assert facts == {"engine": "postgresql", "server": f"127.0.0.1:{postgres.port}", "role": "primary", "standbys": [],
                     "synchronous": False, "problem": None}
    sqlite = open_store(f"sqlite:///{tmp_path}/one.db")
    try:
        assert sqlite.database() == {"engine": "sqlite", "file": f"{tmp_path}/one.db", "problem": None}
    finally:
        sqlite.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[PatroniCluster]:
    cluster = started(lambda: PatroniCluster().start(), "A Patroni cluster (etcd-server, patroni)")
    yield cluster
    cluster.stop()


class FhirWriter(threading.Thread):
    """A FHIR client creating patients, each with its own identifier and If-None-Exist, so that a create re-sent after
    an error (whose outcome the client cannot know) is not made twice; re-sent until acknowledged (200 or 201)."""

    def __init__(self, server: RebondServer, n: int) -> None:
        super().__init__(daemon=True)
        self.server, self.n = server, n
        self.acked: list[str] = []
        self.acked_at: list[float] = []
        self.answers: Counter[str] = Counter()
        self.unclear: list[str] = []  # 503s without a transient OperationOutcome and Retry-After
        self.stop = threading.Event()

    def run(self) -> None:
        with self.server.client(timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                value = f"{self.n}-{i}"
                patient = {"resourceType": "Patient", "identifier": [{"system": DRILL, "value": value}],
                           "name": [{"family": "EXERCICE", "given": [value]}], "gender": "unknown"}
                try:
                    response = client.post("/Patient", json=patient, headers={"If-None-Exist": f"identifier={DRILL}|{value}"})
                    self.answers[str(response.status_code)] += 1
                    if response.status_code == 503 and not (response.headers.get("Retry-After") == "5"
                                                             and response.json()["issue"][0]["code"] == "transient"):
                        self.unclear.append(response.text)
                    if response.status_code in (200, 201):
                        self.acked.append(value)
                        self.acked_at.append(time.monotonic())
                        i += 1
                        continue
                except httpx.HTTPError as err:
                    self.answers[type(err).__name__] += 1
                time.sleep(0.2)


class FhirReader(threading.Thread):
    """A FHIR client reading one patient again and again, as a chart left open would."""

    def __init__(self, server: RebondServer, patient_id: str) -> None:
        super().__init__(daemon=True)
        self.server, self.patient_id = server, patient_id
        self.read_at: list[float] = []
        self.answers: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        with self.server.client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    response = client.get(f"/Patient/{self.patient_id}")
                    self.answers[str(response.status_code)] += 1
                    if response.status_code == 200:
                        self.read_at.append(time.monotonic())
                except httpx.HTTPError as err:
                    self.answers[type(err).__name__] += 1
                time.sleep(0.1)


def _switch_over(cluster: PatroniCluster, server: RebondServer, writers: list[FhirWriter], leader: PatroniNode,
                 standby: PatroniNode, how: str) -> None:
    """The writers and a reader under way, the primary moved to the standby as `patronictl switchover` does (Patroni's
    REST API), and every writer acknowledged again after it; the pauses printed."""
    reader = _under_way(server, writers)
    asked_at = time.monotonic()
    answer = httpx.post(f"http://127.0.0.1:{leader.api_port}/switchover", json={"leader": leader.name, "candidate": standby.name},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    cluster.wait_for(lambda: cluster.leader() is standby, 60, "the switchover did not happen")
    back, pauses, unread, answers = _resumed(writers, reader, asked_at)
    print(f"\n{how}switchover {leader.name} → {standby.name}: longest pause in acknowledgements per client "
          f"{', '.join(f'{p:.1f}' for p in pauses)} s, in reads {unread:.1f} s; answers {dict(answers)}")
    assert all(n >= 50 for n in back), f"writes resumed: {back}"


def _under_way(server: RebondServer, writers: list[FhirWriter | Sender] | list[FhirWriter]) -> FhirReader:
    """The writers started and 50 writes into their stream each; then a reader of the first patient written, started."""
    for w in writers:
        w.start()
    while min(len(w.acked) for w in writers) < 50:
        time.sleep(0.05)
    reader = FhirReader(server, server.client().get(f"/Patient?identifier={DRILL}|0-0").json()["entry"][0]["resource"]["id"])
    reader.start()
    return reader


def _resumed(writers: list[FhirWriter | Sender] | list[FhirWriter], reader: FhirReader,
             since: float) -> tuple[list[int], list[float], float, Counter[str]]:
    """Once every writer has had 50 more writes acknowledged (60 s at most), everyone stopped: how many each had, the
    longest pause in each writer's acknowledgements and in the reads since `since`, and the answers the writers got."""
    baseline = [len(w.acked) for w in writers]
    deadline = time.monotonic() + 60
    while any(len(w.acked) < b + 50 for w, b in zip(writers, baseline, strict=True)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for t in (*writers, reader):
        t.stop.set()
    for t in (*writers, reader):
        t.join(60)
    back = [len(w.acked) - b for w, b in zip(writers, baseline, strict=True)]
    answers = sum((w.answers for w in writers), Counter())
    return back, [_longest_pause(w.acked_at, since) for w in writers], _longest_pause(reader.read_at, since), answers


def _feed_facts(central_db: str, site_db: str) -> str:
    """Where the site's cursor stands against the central feed: the cursor, the central seqs around it, and the feed's
    next page from it (how many changes, and the cursor it gives back)."""
    import psycopg

    from rebond.site.follower import STATE

    site_store = open_store(site_db)
    try:
        cursor = site_store.get_state(STATE, "cursor")
    finally:
        site_store.close()
    seq = int(str(cursor).split("~")[0]) if cursor else 0
    with psycopg.connect(central_db.replace("target_session_attrs=read-write", "target_session_attrs=primary")) as conn:
        low, high, total, above, snapshot = conn.execute(
            "SELECT min(seq), max(seq), count(*), count(*) FILTER (WHERE seq > %s), pg_current_snapshot()::text FROM versions",
            (seq,)).fetchone()
        after = [row[0] for row in conn.execute("SELECT seq FROM versions WHERE seq > %s ORDER BY seq LIMIT 5", (seq,))]
        holders = [tuple(str(v) for v in row) for row in conn.execute(  # what holds the oldest running xid, if anything
            "SELECT backend_xid, state, wait_event, round(extract(epoch FROM now() - xact_start)), left(query, 60)"
            " FROM pg_stat_activity WHERE backend_xid IS NOT NULL ORDER BY xact_start")]
    central = open_store(central_db)
    try:
        page = central.changes(str(cursor) if cursor else None, 100)
    finally:
        central.close()
    return (f"site cursor {cursor!r}; central versions seq {low}..{high} ({total}), {above} above the cursor, the first {after}; "
            f"snapshot {snapshot}, transactions holding an xid {holders}; "
            f"the feed from the cursor: {len(page.changes)} changes, next cursor {page.next_cursor!r}")


def _longest_pause(times: list[float], after: float) -> float:
    """The longest time without an acknowledgement, from `after` on."""
    later = sorted(t for t in times if t >= after)
    marks = [after, *later]
    return max((b - a for a, b in zip(marks, marks[1:], strict=False)), default=0.0)


@pytest.mark.slow
def test_failover_loses_no_acknowledged_write(cluster: PatroniCluster, tmp_path: Path) -> None:
    db = cluster.create_database("drill")
    port = free_port()
    server = RebondServer(db, "--mllp-port", str(port)).start()
    first = cluster.leader()
    assert first is not None
    site = SiteServer(f"sqlite:///{tmp_path}/site-H1.db", server).start()  # a hospital's site node follows all along
    try:
        database = server.status()["database"]
        assert isinstance(database, dict)
        assert database["role"] == "primary" and database["server"] == first.listening and database["synchronous"], database
        writers: list[FhirWriter | Sender] = [FhirWriter(server, n) for n in range(2)]
        writers += [Sender(n, port, 5000, seconds=300) for n in range(2)]
        reader = _under_way(server, writers)

        lost_at = time.monotonic()
        first.lose()
        # until the standby is promoted, it serves the reads, and every page says that nothing can be saved
        cluster.wait_for(lambda: _reading_from_the_standby(server), 15, "the standby did not serve the reads")
        standby_seen_after = time.monotonic() - lost_at
        second = cluster.wait_for(lambda: cluster.leader() not in (None, first) and cluster.leader(), 60, "no failover")
        promoted_after = time.monotonic() - lost_at
        # Rebond carries on on the new primary by itself: each client has its writes acknowledged again
        back, pauses, unread, answers = _resumed(writers, reader, lost_at)
        print(f"\nprimary {first.name} lost; reads served by the standby after {standby_seen_after:.1f} s; {second.name} "
              f"promoted after {promoted_after:.1f} s; longest pause in acknowledgements per client "
              f"{', '.join(f'{p:.1f}' for p in pauses)} s; longest pause in reads {unread:.1f} s ({dict(reader.answers)}); "
              f"answers {dict(answers)}")
        assert unread < min(pauses), "reads go on while writes wait for the new primary"
        assert all(n >= 50 for n in back), f"every client's writes are acknowledged again after the failover: {back}"
        assert not [w.unclear for w in writers if isinstance(w, FhirWriter) and w.unclear], "a 503 says: transient, retry after 5 s"

        database = server.status()["database"]
        assert isinstance(database, dict)
        assert database["server"] == second.listening and database["role"] == "primary", database
        assert not database["synchronous"], "the lost server is no standby any more"
        page = httpx.get(f"{server.base}/status", headers={"Accept-Language": "fr"}).text
        assert "aucune réplique synchrone" in page

        # the site node's copy: every write reaches it through the change feed, across the failover
        def counts(client: httpx.Client) -> tuple[int, int]:
            patients = client.get("/Patient", params={"identifier": f"{DRILL}|", "_summary": "count"}).json()["total"]
            reports = client.get("/DiagnosticReport", params={"_summary": "count"}).json()["total"]
            return int(patients), int(reports)

        stopped = time.monotonic()
        with server.client() as central, site.client() as copy:
            here = counts(central)
            assert here[0] >= sum(len(w.acked) for w in writers if isinstance(w, FhirWriter)), here
            try:
                cluster.wait_for(lambda: counts(copy) == here, 60, f"the site node's copy is not the central data ({here})")
            except RuntimeError as err:  # what the site holds, and where its feed stands, for whoever reads the failure
                raise AssertionError(f"central (patients, reports) {here}, site {counts(copy)}; "
                                     f"{_feed_facts(db, site.db)}; site status {site.status()}") from err
        print(f"the site node held the central data {time.monotonic() - stopped:.1f} s after the writes stopped; "
              f"{_feed_facts(db, site.db)}")
    finally:
        site.stop()
        server.stop()

    _every_acknowledged_write_once_in(db, writers)

    # the lost server comes back: Patroni makes it the new primary's synchronous standby (pg_rewind if needed)
    first.start()
    cluster.wait_for(lambda: cluster.synchronous() is first, 120, "the lost server did not come back as a standby")
    store = open_store(db)
    try:
        facts = store.database()
        assert facts["synchronous"] and [s["name"] for s in facts["standbys"]] == [first.name], facts
    finally:
        store.close()


@pytest.mark.slow
def test_a_planned_switchover_pauses_writes_for_seconds_and_loses_nothing(cluster: PatroniCluster) -> None:
    """IT moves the primary to the other server (an operating system to patch): `patronictl switchover`, here through
    Patroni's REST API as patronictl does. Writes pause while the old primary stops and the standby is promoted."""
    leader = cluster.wait_for(cluster.leader, 60, "no primary")
    standby = cluster.wait_for(cluster.healed().synchronous, 120, "no synchronous standby")
    db = cluster.create_database("switchover")
    server = RebondServer(db).start()
    try:
        writers = [FhirWriter(server, n) for n in range(2)]
        _switch_over(cluster, server, writers, leader, standby, "")
        assert not [w.unclear for w in writers if w.unclear], "a 503 says: transient, retry after 5 s"
        database = server.status()["database"]
        assert isinstance(database, dict) and database["server"] == standby.listening, database
        # the old primary follows the new one: a commit waits for it again
        cluster.wait_for(lambda: cluster.synchronous() is leader, 120, "the old primary did not become the standby")
        cluster.wait_for(lambda: server.status()["database"]["synchronous"], 30, "the status did not see the standby")  # type: ignore[index]
    finally:
        server.stop()
    _every_acknowledged_write_once_in(db, list(writers))


@pytest.mark.slow
def test_behind_haproxy_rebond_follows_a_switchover(cluster: PatroniCluster) -> None:
    """deploy/haproxy.cfg's way: Rebond given one address, HAProxy asking each Patroni which one leads."""
    proxy = HAProxy(cluster).start()
    leader = cluster.wait_for(cluster.leader, 60, "no primary")
    standby = cluster.wait_for(cluster.healed().synchronous, 120, "no synchronous standby")
    cluster.create_database("behind_haproxy")
    server = RebondServer(proxy.url("behind_haproxy")).start()
    try:
        writers = [FhirWriter(server, n) for n in range(2)]
        _switch_over(cluster, server, writers, leader, standby, "behind HAProxy, ")
        database = server.status()["database"]
        assert isinstance(database, dict) and database["role"] == "primary", database
    finally:
        server.stop()
    try:
        _every_acknowledged_write_once_in(proxy.url("behind_haproxy"), list(writers))
    finally:
        proxy.stop()


@pytest.mark.slow
def test_a_primary_cut_off_from_the_network_steps_down_before_another_is_promoted_and_nothing_acknowledged_is_lost(
        cluster: PatroniCluster) -> None:
    """The split-brain drill: the primary's server loses its network and keeps running (a switch, the uplink of its data
    centre), with Rebond's writers under way. Its Patroni, cut from etcd, cannot renew its leader key: it must make its
    PostgreSQL stop taking writes by itself, before the leader key lapses and the standby is promoted, so that never two
    servers take writes. Rebond carries on on the new primary; when the network returns, the old primary follows it
    (pg_rewind), and every acknowledged write is there, once."""
    leader, standby, db, server, writers = _primary_and_standby_with_rebond(cluster, "partition")
    try:
        reader = _under_way(server, writers)
        cut_at = time.monotonic()
        leader.isolate()
        # seen from the isolated server's own console, not through its network
        cluster.wait_for(lambda: not _takes_writes(leader, "partition"), 30, "the isolated primary still takes writes")
        stepped_down_after = time.monotonic() - cut_at
        promoted_after, how = _carried_on_by(cluster, standby, "partition", writers, reader, cut_at)
        print(f"\n{leader.name} cut off the network: it stopped taking writes after {stepped_down_after:.1f} s, {how}")
        assert stepped_down_after < promoted_after, "never two servers taking writes"
        assert _takes_writes(standby, "partition") and not _takes_writes(leader, "partition"), "still one server taking writes"
    finally:
        server.stop()
        leader.reconnect()
    _every_acknowledged_write_once_in(db, list(writers))
    cluster.wait_for(lambda: cluster.synchronous() is leader, 120, "the isolated server did not come back as the standby")


@pytest.mark.slow
def test_with_both_servers_in_the_url_a_primary_whose_patroni_died_is_left_for_the_newer(cluster: PatroniCluster) -> None:
    """The same without HAProxy: libpq keeps the old primary, which takes connections as a primary, and every commit
    waits there for a standby that has left. Rebond watches the servers of its URL: when two take writes, it follows the
    newest timeline (the promoted standby) and ends its own sessions on the old one, whose requests get 503 and are sent
    again. Nothing acknowledged is lost, nothing is there twice. Twice, so that the old primary is once first in the URL
    (libpq would choose it for new connections) and once second (Rebond's connections were opened there before)."""
    for round_ in (1, 2):
        dbname = f"patroni_dies_url_{round_}"
        leader, standby, db, server, writers = _primary_and_standby_with_rebond(cluster, dbname)
        try:
            reader = _under_way(server, writers)
            died_at = time.monotonic()
            leader.lose_patroni()
            _promoted_after, how = _carried_on_by(cluster, standby, dbname, writers, reader, died_at)
            print(f"\nboth servers in the URL, {leader.name}'s Patroni killed: {how}")
            assert not sum((w.answers for w in writers), Counter())["ReadTimeout"], "no request left waiting on the old primary"
            assert _takes_writes(leader, dbname), "the old primary still takes writes: Rebond left it, no one stopped it"
            database = server.status()["database"]
            assert isinstance(database, dict) and database["server"] == standby.listening, database
        finally:
            server.stop()
        _every_acknowledged_write_once_in(db, list(writers))
        leader.start()
        cluster.wait_for(lambda node=leader: cluster.synchronous() is node, 120, "the old primary did not come back as the standby")


def _primary_and_standby_with_rebond(cluster: PatroniCluster, dbname: str) -> tuple[PatroniNode, PatroniNode, str, RebondServer,
                                                                                     list[FhirWriter]]:
    """A drill's start: the primary, its synchronous standby, a database on them, Rebond serving it with both servers in
    its URL, and two FHIR writers (not started)."""
    leader = cluster.wait_for(cluster.leader, 60, "no primary")
    standby = cluster.wait_for(cluster.healed().synchronous, 120, "no synchronous standby")
    db = cluster.create_database(dbname)
    server = RebondServer(db).start()
    return leader, standby, db, server, [FhirWriter(server, n) for n in range(2)]


def _carried_on_by(cluster: PatroniCluster, standby: PatroniNode, dbname: str, writers: list[FhirWriter], reader: FhirReader,
                   since: float) -> tuple[float, str]:
    """The standby promoted, and every writer acknowledged again on it (each 503 said transient): when it was promoted
    (seconds after `since`), and the pauses and answers, said."""
    cluster.wait_for(lambda: _takes_writes(standby, dbname), 60, "the standby was not promoted")
    promoted_after = time.monotonic() - since
    back, pauses, unread, answers = _resumed(list(writers), reader, since)
    assert all(n >= 50 for n in back), f"every client's writes are acknowledged again on the new primary: {back}"
    assert not [w.unclear for w in writers if w.unclear], "a 503 says: transient, retry after 5 s"
    return promoted_after, (f"{standby.name} was promoted after {promoted_after:.1f} s; longest pause in acknowledgements per "
                            f"client {', '.join(f'{p:.1f}' for p in pauses)} s, in reads {unread:.1f} s; answers {dict(answers)}")


def _takes_writes(node: PatroniNode, dbname: str) -> bool:
    """Whether a server's PostgreSQL takes writes, asked on the server itself (False when it does not answer)."""
    import psycopg

    try:
        with psycopg.connect(node.local_url(dbname), connect_timeout=2) as conn:
            return not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]  # type: ignore[index]
    except psycopg.Error:
        return False


@pytest.mark.slow
def test_a_busy_pool_is_no_failover(cluster: PatroniCluster) -> None:
    """Every connection of the pool in use for longer than a read waits: the read gets a connection of its own to the
    primary, not the standby's, and no page says the database is changing servers."""
    store = PostgresStore(cluster.create_database("busy"), "central", pool_size=2)
    held, release = threading.Barrier(3), threading.Event()

    def hold() -> None:
        with store.transaction():
            held.wait()
            release.wait(30)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    try:
        for t in holders:
            t.start()
        held.wait(30)
        started = time.monotonic()
        facts = store.database()
        waited = time.monotonic() - started
        assert facts["role"] == "primary" and not facts["problem"] and not store.writes_refused(), facts
        assert 1.5 < waited < 6, f"waited {waited:.1f} s for the pool, then read on a connection of its own"
    finally:
        release.set()
        for t in holders:
            t.join(30)
        store.close()


@pytest.mark.slow
def test_behind_haproxy_a_primary_whose_patroni_died_is_left_for_the_promoted_standby(cluster: PatroniCluster) -> None:
    """Patroni alone dies on the primary's server; its PostgreSQL runs on, still a primary, with no watchdog here to reset
    the machine. The standby is promoted when the leader key lapses. HAProxy asks each Patroni which one leads: the dead one
    answers nothing, so HAProxy cuts the connections to the old primary and leads Rebond to the new one. (With both servers
    in Rebond's URL instead, Rebond itself leaves it: the next drill.)"""
    proxy = HAProxy(cluster).start()
    leader = cluster.wait_for(cluster.leader, 60, "no primary")
    standby = cluster.wait_for(cluster.healed().synchronous, 120, "no synchronous standby")
    cluster.create_database("patroni_dies")
    server = RebondServer(proxy.url("patroni_dies")).start()
    writers = [FhirWriter(server, n) for n in range(2)]
    try:
        reader = _under_way(server, writers)
        died_at = time.monotonic()
        leader.lose_patroni()
        assert _takes_writes(leader, "patroni_dies"), "its PostgreSQL runs on as a primary"
        _promoted_after, how = _carried_on_by(cluster, standby, "patroni_dies", writers, reader, died_at)
        print(f"\nbehind HAProxy, {leader.name}'s Patroni killed: {how}")
    finally:
        server.stop()
    try:
        _every_acknowledged_write_once_in(proxy.url("patroni_dies"), list(writers))
    finally:
        proxy.stop()
    # Patroni started again finds its PostgreSQL a primary on an old timeline: it demotes it and makes it follow (pg_rewind)
    leader.start()
    cluster.wait_for(lambda: cluster.synchronous() is leader, 120, "the old primary did not come back as the standby")


def _reading_from_the_standby(server: RebondServer) -> bool:
    page = httpx.get(f"{server.base}/status", headers={"Accept-Language": "fr"}, timeout=30).text
    return "La base de données centrale change de serveur" in page and "pas de serveur principal" in page


def _every_acknowledged_write_once_in(db: str, writers: list[FhirWriter | Sender]) -> None:
    store = open_store(db)
    try:
        fhir = [v for w in writers if isinstance(w, FhirWriter) for v in w.acked]
        query = parse_search("Patient", [("identifier", f"{DRILL}|")])
        query.count = 100_000
        found = Counter(i["value"] for p in store.search(query).matches
                        for i in orjson.loads(p.body or b"{}")["identifier"] if i["system"] == DRILL)
        assert not [v for v in fhir if found[v] != 1], "every acknowledged patient is there, once"
        assert all(n == 1 for n in found.values()), "no patient twice"

        hl7 = [c for w in writers if isinstance(w, Sender) for c in w.acked]
        if not hl7:
            return
        kept = {m.control_id: m for m in store.messages(CHANNEL, limit=100_000)}
        assert all(kept[c].status == "applied" for c in hl7), "every acknowledged result was applied"
        reports = parse_search("DiagnosticReport", [("identifier", ",".join(f"F{c}" for c in hl7))])
        reports.count = 100_000
        matches = store.search(reports).matches
        assert len(matches) == len(hl7) and all(r.version == 1 for r in matches), "each acknowledged result once, applied once"
    finally:
        store.close()
