"""The `rebond` command."""
from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from rebond.clinical.conventions import ESCALATE_MINUTES
from rebond.store import DEFAULT_DB, open_store
from rebond.store.base import StoreError

if TYPE_CHECKING:
    from rebond.clinical.imaging import Orthanc
    from rebond.downtime.schedule import PackScheduler
    from rebond.hl7.mllp import MllpServer
    from rebond.security.accounts import Accounts
    from rebond.store import StoreFacts
    from rebond.store.base import Store

app = typer.Typer(help="Rebond: the hospital information system that keeps care going when the IT fails.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err_console = Console(stderr=True, soft_wrap=True)  # an error is one line, however long, in a terminal or a log
out_console = Console()
#: the commands that run a server and keep a log; the others are one-shot, and an error is one line
SERVERS = ("serve", "site")


@app.callback()
def _one_line_errors(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand not in SERVERS:
        # the PostgreSQL pool's own retries would be written to the terminal before the error line says it all
        logging.getLogger("psycopg").setLevel(logging.CRITICAL)


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]rebond:[/] {message}", highlight=False)
    return typer.Exit(code)


ESCALATE_HELP = ("minutes after which the lab's call for a critical result that no one on the ward has taken in hand is passed "
                 "on to the physician on call (0: never)")
POLL_WHEN_BUSY_HELP = ("while MLLP messages come in at 100 a second or more, ask Linux to keep idle CPUs polling instead of "
                       "halting (/dev/cpu_dma_latency, which Rebond's account must be able to open): a halted CPU wakes "
                       "late to each message, on a virtual machine above all")


@app.command()
def serve(
    db: Annotated[str, typer.Option(help="sqlite:///path/file.db or postgresql://user@host:port/dbname")] = DEFAULT_DB,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8080,
    site_id: Annotated[str, typer.Option("--site-id", help="name of this server in the change feed")] = "central",
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    workers: Annotated[int, typer.Option(help="server processes sharing the port (one per core)")] = 1,
    session_idle_minutes: Annotated[float, typer.Option(help="sign-in sessions close after this long without use")] = 30,
    mllp_port: Annotated[int | None, typer.Option(help="also take HL7 v2 messages over MLLP on this port (2575 is usual)")] = None,
    mllp_workers: Annotated[int | None, typer.Option(help="processes working out MLLP messages (default: 0 on two cores, "
                                                          "the server process does it; cores less one above)")] = None,
    poll_when_busy: Annotated[bool, typer.Option(help=POLL_WHEN_BUSY_HELP)] = True,
    downtime_dir: Annotated[str | None, typer.Option(help="where the downtime packs are kept (default: var/downtime)")] = None,
    downtime_every: Annotated[float, typer.Option(help="minutes between two rounds of downtime packs (0: none)")] = 10,
    downtime_keep: Annotated[int, typer.Option(help="downtime packs kept per ward")] = 6,
    orthanc: Annotated[str | None, typer.Option(help="the PACS's Orthanc REST API, e.g. http://pacs:8042: imaging reports "
                                                     "link to their images there")] = None,
    follow_pacs: Annotated[bool, typer.Option(help="make the ImagingStudies of the PACS's new studies (one node per PACS)")] = True,
    escalate_after: Annotated[float, typer.Option(help=ESCALATE_HELP)] = ESCALATE_MINUTES,
) -> None:
    """Serve the web app at http://HOST:PORT/ and the FHIR API at http://HOST:PORT/fhir."""
    import uvicorn

    from rebond.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    pacs = _pacs(orthanc)
    if mllp_port is not None and workers > 1:
        raise fail("--mllp-port runs in a single server process: leave out --workers, or run the listener on its own")
    if mllp_workers is not None and mllp_workers < 0:
        raise fail(f"--mllp-workers must be 0 or more, not {mllp_workers}")
    escalation = _escalate_after(escalate_after)
    try:
        store = open_store(db, site_id=site_id)
    except StoreError as err:
        raise fail(str(err)) from None
    out_console.print(f"Rebond serving the web app at http://{host}:{port}/ and FHIR R4 at http://{host}:{port}/fhir"
                      f" (store: {_redact(db)}, site: {site_id})")
    # what start-up loaded (FHIR definitions, templates) lives as long as the process: keep the collector off it
    gc.freeze()
    # uvicorn's access log prints request paths, which carry patient identifiers in searches: it stays off
    if workers > 1:
        from rebond.site.node import Node

        # the packs are made once, on a schedule run by this parent process; every web process lists them
        packs = _pack_scheduler(db, site_id, downtime_dir or "var/downtime", downtime_every, downtime_keep, Node(store).status)
        store.close()  # each worker opens its own
        os.environ["REBOND_DB"] = db
        os.environ["REBOND_SITE_ID"] = site_id
        os.environ["REBOND_SESSION_IDLE"] = str(session_idle_minutes * 60)
        os.environ["REBOND_ESCALATE_AFTER"] = str(escalate_after)
        if orthanc:
            os.environ["REBOND_ORTHANC"] = orthanc
            os.environ["REBOND_FOLLOW_PACS"] = "1" if follow_pacs else ""
        if packs is not None:
            os.environ["REBOND_DOWNTIME_DIR"] = str(packs.library.root)
            os.environ["REBOND_DOWNTIME_KEEP"] = str(packs.library.keep)
        stop_packs = packs.run_in_thread() if packs is not None else None
        try:
            uvicorn.run("rebond.app:app_from_environment", factory=True, host=host, port=port, workers=workers,
                        log_level=log_level, access_log=False)
        finally:
            if stop_packs is not None:
                stop_packs()
        return
    mllp = _mllp_listener(store, db, site_id, host, mllp_port, mllp_workers, poll_when_busy=poll_when_busy)
    if mllp is not None:
        out_console.print(f"HL7 v2 over MLLP on {host}:{mllp_port}")
    from rebond.site.node import Node

    node = Node(store)
    downtime = _pack_scheduler(db, site_id, downtime_dir or "var/downtime", downtime_every, downtime_keep, node.status)
    uvicorn.run(create_app(store, session_idle=session_idle_minutes * 60, mllp=mllp, node=node, downtime=downtime,
                           pacs=pacs, follow_pacs=follow_pacs, escalate_after=escalation),
                host=host, port=port, log_level=log_level, access_log=False)


def _escalate_after(minutes: float) -> dt.timedelta | None:
    from rebond.clinical.escalation import escalate_delay

    try:
        return escalate_delay(minutes)
    except ValueError as err:
        raise fail(str(err)) from None


def _pacs(url: str | None) -> Orthanc | None:
    from rebond.clinical.imaging import Orthanc

    if url and not url.startswith(("http://", "https://")):
        raise fail(f"--orthanc takes the URL of Orthanc's REST API, e.g. http://pacs:8042, not '{url}'")
    return Orthanc(url) if url else None


@app.command()
def site(
    upstream: Annotated[str, typer.Option(help="the central site's FHIR base, e.g. http://central:8080/fhir")],
    site_id: Annotated[str, typer.Option("--site-id", help="this hospital's name in the group, e.g. H1")],
    db: Annotated[str | None, typer.Option(help="this site's own store (default: sqlite:///var/site-SITE_ID.db)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8081,
    mllp_port: Annotated[int | None, typer.Option(help="also take HL7 v2 messages over MLLP on this port")] = None,
    poll_when_busy: Annotated[bool, typer.Option(help=POLL_WHEN_BUSY_HELP)] = True,
    token: Annotated[str, typer.Option(envvar="REBOND_UPSTREAM_TOKEN", help="API token of this site's account on the central site (role site)")] = "",
    ipp_range: Annotated[str, typer.Option(help="FIRST-LAST: patient numbers allocated to this site for emergency admissions")] = "",
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    session_idle_minutes: Annotated[float, typer.Option(help="sign-in sessions close after this long without use")] = 30,
    downtime_dir: Annotated[str | None, typer.Option(help="where the downtime packs are kept (default: var/downtime)")] = None,
    downtime_every: Annotated[float, typer.Option(help="minutes between two rounds of downtime packs (0: none)")] = 10,
    downtime_keep: Annotated[int, typer.Option(help="downtime packs kept per ward")] = 6,
    orthanc: Annotated[str | None, typer.Option(help="this hospital's PACS (Orthanc REST API, e.g. http://pacs-h1:8042): "
                                                     "imaging reports link to their images there")] = None,
    follow_pacs: Annotated[bool, typer.Option(help="make the ImagingStudies of the PACS's new studies (one node per PACS)")] = True,
    escalate_after: Annotated[float, typer.Option(help=ESCALATE_HELP)] = ESCALATE_MINUTES,
) -> None:
    """Run a site node: a live copy of the central data that keeps serving when the central site is gone."""
    import uvicorn

    from rebond.app import create_app
    from rebond.site.node import SiteNode

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    pacs = _pacs(orthanc)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll of the feed says nothing
    if not upstream.startswith(("http://", "https://")):
        raise fail(f"--upstream must be the central FHIR base URL (http://host:port/fhir), not '{upstream}'")
    db = db or f"sqlite:///var/site-{site_id}.db"
    escalation = _escalate_after(escalate_after)
    try:
        store = open_store(db, site_id=site_id)
    except StoreError as err:
        raise fail(str(err)) from None
    if ipp_range:
        from rebond.clinical.admission import set_ipp_range

        first, _, last = ipp_range.partition("-")
        if not (first.isdigit() and last.isdigit()):
            raise fail(f"--ipp-range must be FIRST-LAST, digits only, not '{ipp_range}'")
        try:
            set_ipp_range(store, int(first), int(last))
        except ValueError as err:
            raise fail(str(err)) from None
    node = SiteNode(store, upstream, token)
    # a site node takes its messages in this process, where its writes are journaled for the central site (a hospital's
    # own traffic); the worker and writer processes are for the central site
    mllp = _mllp_listener(store, db, site_id, host, mllp_port, None, in_this_process=True, poll_when_busy=poll_when_busy)
    out_console.print(f"Rebond site node {site_id} at http://{host}:{port}/ (FHIR: /fhir, status: /status), "
                      f"following {upstream} (store: {_redact(db)})")
    downtime = _pack_scheduler(db, site_id, downtime_dir or f"var/downtime-{site_id}", downtime_every, downtime_keep, node.status)
    gc.freeze()
    uvicorn.run(create_app(store, session_idle=session_idle_minutes * 60, mllp=mllp, node=node, downtime=downtime,
                           pacs=pacs, follow_pacs=follow_pacs, escalate_after=escalation),
                host=host, port=port, log_level=log_level, access_log=False)


def _mllp_listener(store: Store, db: str, site_id: str, host: str, port: int | None, workers: int | None, *,
                   in_this_process: bool = False, poll_when_busy: bool = True) -> MllpServer | None:
    """The MLLP listener beside the web server: the messages' writes worked out by worker processes (or this one) and
    committed by the intake writer process; or everything in this process (`in_this_process`)."""
    if port is None:
        return None
    from rebond.hl7.mllp import MllpServer
    from rebond.hl7.workers import DraftWorkers
    from rebond.ops.awake import AwakeWhileBusy

    awake = AwakeWhileBusy() if poll_when_busy else None
    if in_this_process or ":memory:" in db:  # a store in this process's memory: no other process can write to it
        return MllpServer(store, host, port, awake=awake)
    if workers is None:
        # the intake writer is a process of its own, busy on every message; on two cores the server process drafts
        # (hl7/workers.py says why), on more the workers share the cores left
        cores = os.cpu_count() or 1
        workers = 0 if cores <= 2 else min(cores - 1, 4)
    return MllpServer(store, host, port, drafts=DraftWorkers(db, site_id, workers, here=store), awake=awake)


def _pack_scheduler(db: str, site_id: str, folder: str, every: float, keep: int,
                    source: Callable[[], dict[str, Any]]) -> PackScheduler | None:
    """The downtime packs' schedule beside a server; none when asked for none, or for a store only this process can see."""
    from rebond.downtime.library import PackLibrary
    from rebond.downtime.schedule import PackScheduler

    if every <= 0 or ":memory:" in db:
        return None
    if keep < 1:
        raise fail("--downtime-keep must be 1 or more")
    out_console.print(f"downtime packs every {every:g} min into {folder} (the last {keep} kept per ward)")
    return PackScheduler(db, site_id, PackLibrary(Path(folder), keep), every, source)


def _progress() -> Progress:
    """A progress bar on stderr, cleared at the end when stderr is not a terminal (CI logs stay short)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=not sys.stderr.isatty())


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, _, hostpart = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}@{hostpart}"
    return url


@app.command("import")
def import_(
    paths: Annotated[list[str], typer.Argument(help="Bundle (.json, .json.bz2) or NDJSON files, or folders of them")],
    db: Annotated[str | None, typer.Option(help="load straight into this database")] = None,
    url: Annotated[str | None, typer.Option(help="load through a running server's FHIR base URL")] = None,
    token: Annotated[str, typer.Option(envvar="REBOND_TOKEN", help="API token for --url (rebond accounts token USER)")] = "",
    jobs: Annotated[int, typer.Option(help="transaction Bundles loaded side by side (default: 1 on SQLite, 2 otherwise)")] = 0,
) -> None:
    """Load FHIR Bundles (batch, transaction) and NDJSON files; re-importing creates no duplicates."""
    from rebond.importer import ServerTarget, StoreTarget, Target, expand, import_files

    if db and url:
        raise fail("give --db or --url, not both")
    files = expand(paths)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise fail(f"no such file: {missing[0]}")
    target: Target
    store = None
    try:
        if url:
            target = ServerTarget(url, token)
        else:
            store = open_store(db or DEFAULT_DB, site_id="import")
            target = StoreTarget(store)
    except StoreError as err:
        raise fail(str(err)) from None
    if jobs <= 0:
        jobs = 1 if (db or DEFAULT_DB).startswith("sqlite") and not url else 2
    started = time.monotonic()
    try:
        with _progress() as progress:
            task = progress.add_task("importing", total=len(files))

            def done(report: object) -> None:
                progress.advance(task)

            reports = import_files(files, target, jobs=jobs, on_done=done)
        if store is not None:
            store.optimize()
    except StoreError as err:
        raise fail(f"the store failed: {err}") from None
    finally:
        if store is not None:
            store.close()
    elapsed = time.monotonic() - started
    table = Table(title="Import summary")
    table.add_column("file")
    table.add_column("loaded", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("reasons")
    for r in reports:
        table.add_row(r.path, str(r.loaded), str(r.failed), "; ".join(r.reasons[:3]))
    out_console.print(table)
    loaded = sum(r.loaded for r in reports)
    failed = sum(r.failed for r in reports)
    rate = loaded / elapsed if elapsed > 0 else 0.0
    out_console.print(f"{loaded} resources loaded, {failed} failed, in {elapsed:.1f} s ({rate:.0f} resources/s)")
    if failed:
        raise typer.Exit(1)


@app.command()
def seed(
    demo: Annotated[bool, typer.Option("--demo", help="generate the demo hospital group")] = False,
    formulary: Annotated[bool, typer.Option("--formulary", help="add the demo formulary's medicines where missing")] = False,
    db: Annotated[str, typer.Option(help="database to fill")] = DEFAULT_DB,
    seed_value: Annotated[int, typer.Option("--seed", help="same seed, same group")] = 1,
    hospitals: Annotated[int, typer.Option(help="hospitals in the group")] = 3,
    wards: Annotated[int, typer.Option("--wards-per-hospital", help="wards per hospital")] = 6,
    beds: Annotated[int, typer.Option("--beds-per-ward", help="beds per ward")] = 24,
) -> None:
    """Fill a store with generated data: --demo, a French hospital group and its demo accounts; --formulary, only the
    demo formulary (for a store seeded before it existed, or a hospital's store to try prescribing on)."""
    from rebond.security.accounts import Accounts
    from rebond.seed.demo import DEMO_PASSWORD, DemoSize, add_formulary, demo_accounts, seed_demo

    if formulary and not demo:
        try:
            store = open_store(db, site_id="seed")
            try:
                added = add_formulary(store)
            finally:
                store.close()
        except StoreError as err:
            raise fail(f"the store failed: {err}") from None
        out_console.print(f"formulary: {added} medicines added" + ("" if added else " (all there already)"))
        return
    if not demo:
        raise fail("say what to generate: --demo, or --formulary")
    if min(hospitals, wards, beds) < 1:
        raise fail("--hospitals, --wards-per-hospital and --beds-per-ward must be at least 1")
    try:
        store = open_store(db, site_id="seed")
    except StoreError as err:
        raise fail(str(err)) from None
    started = time.monotonic()
    try:
        with _progress() as progress:
            task = progress.add_task("wards", total=hospitals * wards)
            report = seed_demo(store, seed=seed_value, size=DemoSize(hospitals, wards, beds),
                               progress=lambda done, total: progress.update(task, completed=done))
        accounts = demo_accounts(Accounts(store), report)
        store.optimize()
    except StoreError as err:
        raise fail(f"the store failed: {err}") from None
    finally:
        store.close()
    out_console.print(f"{report.resources} resources: {hospitals} hospitals, {report.wards} wards, {report.beds} beds, "
                      f"{report.patients} inpatients, in {time.monotonic() - started:.1f} s")
    out_console.print("demo accounts (password " + DEMO_PASSWORD + "): "
                      + ", ".join(f"{a.username} ({a.role})" for a in accounts))


@app.command("downtime-pack")
def downtime_pack(
    ward: Annotated[str | None, typer.Option(help="the ward's Location id")] = None,
    out: Annotated[str | None, typer.Option(help="the PDF to write, for --ward")] = None,
    all_wards: Annotated[bool, typer.Option("--all", help="every ward of the group, one PDF each, into --out-dir")] = False,
    out_dir: Annotated[str | None, typer.Option(help="folder for --all")] = None,
    db: Annotated[str | None, typer.Option(help="read this database directly")] = None,
    server: Annotated[str | None, typer.Option(help="or ask a running server, e.g. http://127.0.0.1:8080")] = None,
    token: Annotated[str, typer.Option(envvar="REBOND_TOKEN", help="API token for --server (rebond accounts token USER)")] = "",
    lang: Annotated[str, typer.Option(help="fr or en")] = "fr",
) -> None:
    """Write a ward's downtime pack (or every ward's) as PDF: census, patients, 24-hour grids, on-call, procedures, forms."""
    if all_wards == bool(ward):
        raise fail("give --ward ID with --out FILE.pdf, or --all with --out-dir DIR")
    if ward and not out:
        raise fail("--ward needs --out FILE.pdf")
    if all_wards and not out_dir:
        raise fail("--all needs --out-dir DIR")
    if db and server:
        raise fail("give --db or --server, not both")
    if lang not in ("fr", "en"):
        raise fail(f"--lang is fr or en, not '{lang}'")
    targets = [(ward, Path(out))] if ward and out else []
    started = time.monotonic()
    if server:
        written = _packs_from_server(server.rstrip("/"), token, targets, Path(out_dir) if out_dir else None, lang)
    else:
        written = _packs_from_store(db or DEFAULT_DB, targets, Path(out_dir) if out_dir else None, lang)
    for path, pages in written:
        out_console.print(f"{path} ({pages} pages)", highlight=False)
    out_console.print(f"{len(written)} downtime pack{'s' if len(written) != 1 else ''} written in {time.monotonic() - started:.1f} s")


def _packs_from_store(db: str, targets: list[tuple[str, Path]], out_dir: Path | None, lang: str) -> list[tuple[Path, int]]:
    import datetime as dt

    from rebond.downtime.library import page_count, read_facts, save_pack, ward_ids
    from rebond.downtime.pack import Source, ward_pack
    from rebond.downtime.render import render_pdf
    from rebond.site.follower import STATE
    from rebond.store.base import NotFound
    from rebond.web.i18n import translator

    try:
        store = open_store(db, site_id="downtime-pack")
    except StoreError as err:
        raise fail(str(err)) from None
    try:
        follower = store.get_state(STATE, "follower")
        if follower:  # a site node's database: say how fresh its copy was
            seen = follower.get("caught_up_at") or follower.get("last_change_applied_at")
            source = Source("site", "", dt.datetime.fromtimestamp(seen, dt.UTC) if seen else None)
        else:
            source = Source("central", "", dt.datetime.now(dt.UTC))
        if out_dir is not None:
            targets = [(ward_id, out_dir / f"{ward_id}.pdf") for ward_id in ward_ids(store)]
            if not targets:
                raise fail("this database has no ward")
        written = []
        for ward_id, path in targets:
            try:
                pack = ward_pack(store, ward_id, dt.datetime.now(dt.UTC), translator(lang), source, previous=read_facts(path))
            except NotFound:
                raise fail(f"no ward '{ward_id}' in this database") from None
            pdf = render_pdf(pack.data)
            try:
                save_pack(path, pack, pdf)
            except OSError as err:
                raise fail(f"cannot write {path}: {err.strerror}") from None
            written.append((path, page_count(pdf)))
        return written
    except StoreError as err:
        raise fail(f"the store failed: {err}") from None
    finally:
        store.close()


def _packs_from_server(server: str, token: str, targets: list[tuple[str, Path]], out_dir: Path | None,
                       lang: str) -> list[tuple[Path, int]]:
    import httpx

    from rebond.downtime.library import page_count
    from rebond.durable import write_atomically

    headers = {"Authorization": f"Bearer {token}", "Accept-Language": lang}
    written = []
    try:
        with httpx.Client(base_url=server, headers=headers, timeout=120) as client:
            if out_dir is not None:
                listing = client.get("/downtime", headers={"Accept": "application/json"})
                if listing.status_code != 200:
                    raise fail(f"{server} answered {listing.status_code} for the list of wards: {listing.text[:200]}")
                targets = [(w["ward_id"], out_dir / f"{w['ward_id']}.pdf") for w in listing.json()["wards"]]
            for ward_id, path in targets:
                answer = client.get(f"/downtime/wards/{ward_id}.pdf", params={"lang": lang})
                if answer.status_code != 200 or not answer.content.startswith(b"%PDF"):
                    raise fail(f"{server} answered {answer.status_code} for ward '{ward_id}': {answer.text[:200]}")
                write_atomically(path, answer.content)
                written.append((path, page_count(answer.content)))
    except httpx.HTTPError as err:
        raise fail(f"cannot reach {server}: {err}") from None
    except OSError as err:
        raise fail(f"cannot write: {err}") from None
    return written


@app.command()
def backup(
    out: Annotated[Path, typer.Argument(help="the file to write, e.g. /backups/rebond-20261202.db")],
    db: Annotated[str, typer.Option(help="the node's SQLite store (it may be serving)")] = DEFAULT_DB,
    replace: Annotated[bool, typer.Option("--replace", help="overwrite OUT if it exists")] = False,
) -> None:
    """Copy a SQLite store, consistent to its last commit, while it serves; a site node's copy holds its unsent writes."""
    if not db.startswith("sqlite:///"):
        raise fail("rebond backup copies a SQLite store; back up PostgreSQL with its own tools (pg_basebackup, "
                   "pgBackRest under Patroni, pg_dump): see docs/operations.md")
    source = Path(db[len("sqlite:///"):])
    if not source.is_file():
        raise fail(f"no SQLite store at {source}")
    if out.exists() and not replace:
        raise fail(f"{out} exists: choose another name, or --replace")
    if out.resolve() == source.resolve():
        raise fail("the backup cannot be the store itself")
    if not out.parent.is_dir():
        raise fail(f"no folder {out.parent} to write the backup in")
    started = time.monotonic()
    from rebond.store.sqlite import SQLiteStore

    with _store_of(db) as store:
        assert isinstance(store, SQLiteStore)
        try:
            counts = store.backup(str(out))
        except (StoreError, OSError) as err:
            raise fail(f"backup failed ({err}): {out} is as it was") from None
    out_console.print(
        f"backup {out}: {counts['resources']:,} resources, {counts['versions']:,} versions, {counts['messages']:,} HL7 messages, "
        f"{counts['journal_pending']:,} site writes not yet on the central site; {counts['bytes'] / 1e6:.1f} MB, "
        f"checked, in {time.monotonic() - started:.1f} s", highlight=False, soft_wrap=True)


db_app = typer.Typer(help="The store itself: its schema, and bringing it to this Rebond's ahead of a start.", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _facts(db: str) -> StoreFacts:
    from rebond.store import inspect_store

    try:
        facts = inspect_store(db)
    except StoreError as err:
        raise fail(str(err)) from None
    if facts.schema is None:
        raise fail(f"no Rebond store at {facts.where}")
    return facts


@db_app.command("status")
def db_status(db: Annotated[str, typer.Option(help="the store: sqlite:///file.db or postgresql://…")] = DEFAULT_DB) -> None:
    """The store's engine, size and schema, and whether this Rebond must upgrade it; nothing is written.
    Exit 1 if there is no store, or one this Rebond cannot open (made by a later one)."""
    from rebond.store.schema import SCHEMA_VERSION
    from rebond.store.upgrade import LaterSchema, check_schema

    facts = _facts(db)
    pages = f", pages of {facts.page_size // 1024} KiB" if facts.page_size else ""
    out_console.print(f"{facts.engine} {facts.where}: {facts.size / 1e6:.1f} MB{pages}; schema {facts.schema}", highlight=False, soft_wrap=True)
    try:
        check_schema(facts.schema)
    except LaterSchema as err:
        raise fail(str(err)) from None
    if facts.schema == SCHEMA_VERSION:
        out_console.print(f"up to date: this Rebond's schema is {SCHEMA_VERSION}", highlight=False, soft_wrap=True)
    else:
        out_console.print(f"this Rebond (schema {SCHEMA_VERSION}) upgrades it when it opens it; to do it ahead, in a quiet moment: "
                          "rebond db upgrade, with the same --db", highlight=False, soft_wrap=True)  # a URL may hold a password


@db_app.command("upgrade")
def db_upgrade(db: Annotated[str, typer.Option(help="the store: sqlite:///file.db or postgresql://…")] = DEFAULT_DB) -> None:
    """Bring the store to this Rebond's schema now, rather than when a server next opens it: in one transaction, all or
    nothing; processes opening it meanwhile wait. Run it before starting this version, in a quiet moment."""
    from rebond.store.schema import SCHEMA_VERSION

    facts = _facts(db)
    if facts.schema == SCHEMA_VERSION:
        out_console.print(f"{facts.where}: already of schema {SCHEMA_VERSION}, nothing to do", highlight=False, soft_wrap=True)
        return
    started = time.monotonic()
    upgrading = out_console.status(f"upgrading {facts.where} from schema {facts.schema} to {SCHEMA_VERSION} (one transaction)…")
    with upgrading, _store_of(db) as store:
        found = store.schema_found
    if found == SCHEMA_VERSION:  # another process did it between the two looks
        out_console.print(f"{facts.where}: upgraded meanwhile by another Rebond process, of schema {SCHEMA_VERSION}", highlight=False, soft_wrap=True)
        return
    out_console.print(f"{facts.where}: schema {found} → {SCHEMA_VERSION} in {time.monotonic() - started:.1f} s", highlight=False, soft_wrap=True)


accounts_app = typer.Typer(help="Sign-in accounts of this node: nurses, physicians, lab staff, IT.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")


@contextmanager
def _store_of(db: str) -> Iterator[Store]:
    """The node's store; an unreachable one is one line and exit 1."""
    try:
        store = open_store(db)
    except StoreError as err:
        raise fail(str(err)) from None
    try:
        yield store
    finally:
        store.close()


@contextmanager
def _accounts_of(db: str) -> Iterator[Accounts]:
    """The accounts of the node whose database is `db`; a refused change is one line and exit 1."""
    from rebond.security.accounts import AccountError, Accounts

    with _store_of(db) as store:
        try:
            yield Accounts(store)
        except AccountError as err:
            raise fail(str(err)) from None


@accounts_app.command("add")
def accounts_add(
    username: Annotated[str, typer.Argument(help="the sign-in name")],
    role: Annotated[str, typer.Option(help="nurse, physician, lab, pharmacist, admin, crisis (the crisis cell); system (an interface); "
                                           "site (a site node)")],
    name: Annotated[str, typer.Option(help="the name shown on records, e.g. 'Dr Marie DUPONT'")] = "",
    practitioner: Annotated[str, typer.Option(help="id of the Practitioner this account stands for")] = "",
    service: Annotated[str, typer.Option(help="code of the service it works for, e.g. H1-LAB (the lab's bench): its "
                                              "messages' box is the account's (rebond messaging services)")] = "",
    db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB,
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True,
                                          envvar="REBOND_PASSWORD", help="asked for when not given")] = "",
) -> None:
    """Create an account (or replace it: a new password, a new role)."""
    from rebond.clinical.messaging import service_of

    with _accounts_of(db) as accounts:
        if service and service_of(accounts.store, service.strip().upper()) is None:
            raise fail(f"no active service with the code '{service}' in this store (a hospital's lab is H1-LAB, its pharmacy "
                       "H1-PHARMA, a ward's team the ward's code: rebond messaging services --list)")
        account = accounts.save(username, password, role, name or username, practitioner or None, service or None)
    out_console.print(f"account {account.username} ({account.role}{', ' + account.service if account.service else ''}) saved")


@accounts_app.command("token")
def accounts_token(
    username: Annotated[str, typer.Argument(help="the account the token acts as")],
    label: Annotated[str, typer.Option(help="what the token is for, e.g. 'lab interface'")] = "",
    db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB,
) -> None:
    """Print a new API token (Authorization: Bearer …) for an account; it is shown only this once."""
    with _accounts_of(db) as accounts:
        token = accounts.issue_token(username, label)
    print(token)


@accounts_app.command("client")
def accounts_client(
    username: Annotated[str, typer.Argument(help="the account (an interface's, role system) the client acts as")],
    jwks: Annotated[Path, typer.Option(help="the client's public keys, a JWK Set (JSON), RSA or EC (for RS384 or ES384)")],
    scope: Annotated[str, typer.Option(help="what it may ask for, e.g. 'system/Observation.cu system/Patient.rs'")],
    label: Annotated[str, typer.Option(help="what the client is, e.g. 'lab middleware'")] = "",
    client_id: Annotated[str, typer.Option("--client-id", help="its id (default: a new UUID)")] = "",
    db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB,
) -> None:
    """Register a SMART backend client: it gets short-lived tokens at /auth/token with a JWT signed by its private key.
    Prints its client id (the iss and sub of its assertions)."""
    import orjson

    from rebond.security.smart import SmartClients, SmartError

    try:
        keys = orjson.loads(jwks.read_bytes())
    except (OSError, orjson.JSONDecodeError) as err:
        raise fail(f"cannot read the keys in {jwks}: {err}") from None
    with _accounts_of(db) as accounts:
        try:
            client = SmartClients(accounts.store, accounts).register(username, keys, scope, label, client_id or None)
        except (SmartError, ValueError) as err:
            raise fail(str(err)) from None
    print(client.client_id)


@accounts_app.command("app")
def accounts_app_add(
    client_id: Annotated[str, typer.Argument(help="the app's client id, as it will ask for it")],
    redirect_uri: Annotated[list[str], typer.Option("--redirect-uri", help="where the app is sent back (https; several allowed)")],
    scope: Annotated[str, typer.Option(help="what it may ask for, e.g. 'user/Patient.rs user/Observation.cruds'")],
    label: Annotated[str, typer.Option(help="the app's name, shown to the person asked")] = "",
    db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB,
) -> None:
    """Register an app people use (SMART App Launch, standalone, a public client with PKCE): signed in, a person lets it
    act for them, with the rights of their own role."""
    from rebond.security.smart import SmartClients, SmartError

    with _accounts_of(db) as accounts:
        try:
            app_ = SmartClients(accounts.store, accounts).register_app(client_id, label, redirect_uri, scope)
        except (SmartError, ValueError) as err:
            raise fail(str(err)) from None
    out_console.print(f"app {app_.client_id} registered ({app_.label})")


@accounts_app.command("clients")
def accounts_clients(
    revoke: Annotated[str, typer.Option(help="remove this client or app, and its tokens")] = "",
    db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB,
) -> None:
    """The SMART backend clients and apps of this node (or remove one, with its tokens)."""
    from rebond.security.smart import SmartClients

    with _accounts_of(db) as accounts:
        clients = SmartClients(accounts.store, accounts)
        if revoke:
            if not clients.revoke(revoke):
                raise fail(f"no client '{revoke}'")
            out_console.print(f"client {revoke} removed, with its tokens")
            return
        table = Table("client id", "acts as", Column("scopes", overflow="fold"), "label",
                      Column("keys or redirect URIs", overflow="fold"))  # folded, never cut: IT copies them
        for c in clients.all():
            table.add_row(c.client_id, c.username, " ".join(c.scopes), c.label, f"{len(c.jwks['keys'])} key(s)")
        for a in clients.apps():
            table.add_row(a.client_id, "the person who lets it", " ".join(a.scopes), a.label, " ".join(a.redirect_uris))
    out_console.print(table)


@accounts_app.command("list")
def accounts_list(db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB) -> None:
    """The accounts of this node."""
    table = Table("user", "name", "role", "works for", "active", "made")
    with _accounts_of(db) as accounts:
        for a in accounts.all():
            table.add_row(a.username, a.display, a.role, a.service or "", "yes" if a.active else "no",
                          "on the central site (copy)" if a.origin else "here")
    out_console.print(table)


audit_app = typer.Typer(help="The audit trail: who reached whose data, through the API and the web app.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
#: the shortest period the audit trail is kept for: a slip of the finger must not wipe what an inquiry needs
AUDIT_MIN_DAYS = 30


def _on_the_trail(store: Store, what: str, entity: str, patients: tuple[str, ...] = (), action: str = "R") -> None:
    """What the command line did with the trail is on it too: the machine's user, the host, the command."""
    import getpass
    import socket

    from rebond.security.audit import AuditTrail

    trail = AuditTrail(store)
    trail.record(agent=getpass.getuser(), role="command line", source=socket.gethostname(), channel="cli", action=action,
                 what=what, entity=entity, patients=patients)
    trail.flush()


@audit_app.command("list")
def audit_list(
    patient: Annotated[str | None, typer.Option(help="a patient's IPP or Patient id")] = None,
    user: Annotated[str | None, typer.Option(help="an account")] = None,
    since: Annotated[str | None, typer.Option(help="from this day (yyyy-mm-dd or dd/mm/yyyy), hospital time")] = None,
    limit: Annotated[int, typer.Option(help="how many at most, newest first")] = 100,
    db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line, for scripts")] = False,
) -> None:
    """The accesses recorded on this node, newest first: when, who, from where, what, the outcome, whose data."""
    import datetime as dt
    import json

    from rebond.clinical.conventions import HOSPITAL_TZ
    from rebond.clinical.patients import parse_day, patient_by_ipp_or_id
    from rebond.security.audit import READ_TRAIL

    query: dict[str, Any] = {"limit": limit, "agent": user}
    if since is not None:
        try:
            query["since"] = dt.datetime.combine(parse_day(since), dt.time(), HOSPITAL_TZ).timestamp()
        except ValueError:
            raise fail(f"--since: '{since}' is not a day (yyyy-mm-dd or dd/mm/yyyy)") from None
    with _store_of(db) as store:
        if patient is not None:
            query["patient"] = patient_by_ipp_or_id(store, patient)
            if query["patient"] is None:
                raise fail(f"no patient has the IPP or id '{patient}' on this node")
        accesses = store.accesses(**query)
        _on_the_trail(store, READ_TRAIL, "rebond audit list " + " ".join(f"--{k} {v}" for k, v in
                                                                             (("patient", patient), ("user", user), ("since", since)) if v),
                      (query["patient"],) if patient is not None else ())
    if as_json:
        for a in accesses:
            print(json.dumps({"id": a.id, "recorded": a.recorded, "agent": a.agent, "role": a.role, "source": a.source,
                              "channel": a.channel, "action": a.action, "what": a.what, "entity": a.entity, "outcome": a.outcome,
                              "patients": a.patient_count, "listed": list(a.patients)}, ensure_ascii=False))
        return
    table = Table("when", "who", "from", "what", "request", "outcome", "patients")
    for a in accesses:
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.recorded)), f"{a.agent} ({a.role})", f"{a.source} {a.channel}",
                      a.what, a.entity[:120], str(a.outcome), str(a.patient_count))
    out_console.print(table)
    out_console.print(f"{len(accesses)} access(es)")


@audit_app.command("prune")
def audit_prune(
    older_than: Annotated[float, typer.Option("--older-than", help=f"days: accesses recorded longer ago are removed ({AUDIT_MIN_DAYS} at least)")],
    db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB,
) -> None:
    """Remove the accesses recorded more than N days ago, for the period the hospital keeps its trail. Run it from cron."""
    from rebond.security.audit import PRUNE_TRAIL

    if not older_than >= AUDIT_MIN_DAYS:
        raise fail(f"--older-than must be {AUDIT_MIN_DAYS} days or more, not {older_than:g}: the trail is what an inquiry reads")
    before = time.time() - older_than * 86400
    with _store_of(db) as store:
        try:
            count = store.write(lambda tx: tx.prune_accesses(before))
        except StoreError as err:
            raise fail(f"pruning stopped: {err}") from None
        _on_the_trail(store, PRUNE_TRAIL, f"rebond audit prune --older-than {older_than:g}", action="D")
    out_console.print(f"removed {count:,} access(es) recorded before {time.strftime('%Y-%m-%d %H:%M', time.localtime(before))}",
                      soft_wrap=True)


messaging_app = typer.Typer(help="Internal messaging between the wards, the labs, the pharmacies and the staff.", no_args_is_help=True)
app.add_typer(messaging_app, name="messaging")


@messaging_app.command("services")
def messaging_services(
    db: Annotated[str, typer.Option(help="database of the central site")] = DEFAULT_DB,
    show: Annotated[bool, typer.Option("--list", help="then list every service: its code (for accounts add --service), "
                                                      "name and hospital")] = False,
) -> None:
    """Give every ward a service messages are sent to, and every hospital its lab and pharmacy, where the store lacks
    them (run it on the central site after loading the hospital's structure; running it again makes nothing)."""
    from rebond.clinical.messaging import add_services, services

    with _store_of(db) as store:
        try:
            made = add_services(store)
            listed = services(store) if show else []
        except StoreError as err:
            raise fail(f"the store failed: {err}") from None
    out_console.print(f"made {made} service(s)" if made else "every ward, lab and pharmacy has its service already")
    if show:
        table = Table("code", "service", "hospital")
        for service in listed:
            table.add_row(service.code or "—", service.name, service.hospital)
        out_console.print(table)


hl7_app = typer.Typer(help="HL7 v2 messages: dead letters, replay, a traffic simulator.", no_args_is_help=True)
app.add_typer(hl7_app, name="hl7")


@hl7_app.command("dead-letters")
def hl7_dead_letters(
    db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB,
    limit: Annotated[int, typer.Option(help="how many at most")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line, for scripts")] = False,
) -> None:
    """Messages refused (AR) and kept: id, when, sender, control id, type, why."""
    import json

    from rebond.hl7.intake import CHANNEL, describe

    with _store_of(db) as store:
        letters = store.messages(CHANNEL, "rejected", limit=limit)
    if as_json:
        for letter in letters:
            print(json.dumps({"id": letter.id, "received": letter.received, "sender": letter.sender, "control_id": letter.control_id,
                              "type": describe(letter.raw)[0], "reason": letter.detail}, ensure_ascii=False))
        return
    table = Table("id", "received", "sender", "control id", "type", "reason")
    for letter in letters:
        kind, _ = describe(letter.raw)
        table.add_row(str(letter.id), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter.received)), letter.sender,
                      letter.control_id, kind, letter.detail)
    out_console.print(table)
    out_console.print(f"{len(letters)} dead letter(s)")


@hl7_app.command("replay")
def hl7_replay(
    message_id: Annotated[int, typer.Argument(help="the dead letter's id (rebond hl7 dead-letters)")],
    file: Annotated[str | None, typer.Option(help="the corrected message, to process instead of the one kept")] = None,
    db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB,
) -> None:
    """Process a kept message again, after what made it fail was fixed (or with --file, its corrected text)."""
    from pathlib import Path

    from rebond.hl7.intake import replay

    corrected = None
    if file is not None:
        try:
            corrected = Path(file).read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        except OSError as err:
            raise fail(f"cannot read {file}: {err.strerror}") from None
    with _store_of(db) as store:
        try:
            answer = replay(store, message_id, corrected)
        except LookupError as err:
            raise fail(str(err)) from None
        kept = store.message(message_id)
    if answer.code not in ("AA", "CA"):
        raise fail(f"message {message_id} still refused: {kept.detail if kept else answer.code}")
    out_console.print(f"message {message_id} applied: {kept.detail if kept else ''}")


@hl7_app.command("prune")
def hl7_prune(
    older_than: Annotated[float, typer.Option("--older-than", help="days: applied messages received longer ago lose their content")],
    db: Annotated[str, typer.Option(help="database of the node")] = DEFAULT_DB,
) -> None:
    """Clear the content of applied messages older than N days, keeping a digest that still recognises a re-send.
    Dead letters and messages not yet applied are kept whole. Run it from cron with the period the hospital keeps."""
    from rebond.hl7.intake import prune

    if not older_than >= 1:
        raise fail(f"--older-than must be 1 day or more, not {older_than:g}")
    before = time.time() - older_than * 86400
    with _store_of(db) as store:
        try:
            count, size = prune(store, before)
        except StoreError as err:
            raise fail(f"pruning stopped: {err}") from None
    out_console.print(f"cleared the content of {count:,} applied HL7 message(s) received before "
                      f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(before))} ({size / 1e6:.1f} MB); their digests are kept",
                      soft_wrap=True)  # one line in the cron log


@hl7_app.command("simulate")
def hl7_simulate(
    target: Annotated[str, typer.Option(help="HOST:PORT of an MLLP listener (rebond serve --mllp-port)")],
    rate: Annotated[float, typer.Option(help="messages per second (0: as fast as acknowledged)")] = 5.0,
    count: Annotated[int, typer.Option(help="how many messages")] = 100,
    seed: Annotated[int, typer.Option(help="same seed, same traffic")] = 1,
) -> None:
    """Send admissions and lab results for the demo group, as an admissions system and an analyzer chain would."""
    from rebond.hl7.mllp import send_messages
    from rebond.hl7.simulate import Traffic

    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise fail(f"--target must be HOST:PORT, not '{target}'")
    try:
        codes = send_messages(host, int(port), (m.encode() for m in Traffic(seed).messages(count)), rate=rate)
    except OSError as err:
        raise fail(f"cannot reach {target}: {err.strerror or err}") from None
    out_console.print(f"{sum(codes.values())} messages sent: " + ", ".join(f"{n} {c}" for c, n in sorted(codes.items())))
    if set(codes) - {"AA", "CA"}:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
