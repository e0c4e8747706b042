"""The Rebond web application: the FHIR API and the health probe, over one store."""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rebond.clinical.critical_register import LastDay
from rebond.clinical.escalation import ESCALATE_AFTER, Escalation, escalate_delay
from rebond.clinical.imaging import Orthanc, PacsUnavailable, StudyFollower, study_of_uid
from rebond.clinical.records import ref_id
from rebond.disk import DiskWatch
from rebond.downtime.schedule import PackSchedule
from rebond.fhir.api import RETRY_AFTER_SECONDS, FhirApi, error_response
from rebond.fhir.errors import FhirError
from rebond.hl7.intake import recover
from rebond.hl7.mllp import MllpServer
from rebond.ops.situation import Situation, is_situation_update
from rebond.security.accounts import PEOPLE, Accounts
from rebond.security.audit import AuditMiddleware, AuditQueryError, AuditTrail, access_from_json, audit_event, audit_query
from rebond.security.smart import Scopes, SmartClients, SmartError
from rebond.site.contacts import SiteContacts
from rebond.site.node import Node
from rebond.store.base import Guard, Store, StoreError
from rebond.web.app import SESSION_COOKIE, WebApp
from rebond.web.i18n import Translator

log = logging.getLogger("rebond")


def create_app(store: Store, *, session_idle: float = 30 * 60, secure_cookies: bool = False,
               mllp: MllpServer | None = None, node: Node | None = None, downtime: PackSchedule | None = None,
               disks: DiskWatch | None = None, trail: AuditTrail | None = None, pacs: Orthanc | None = None,
               follow_pacs: bool = True, escalate_after: dt.timedelta | None = ESCALATE_AFTER) -> Starlette:
    node = node or Node(store)
    if disks is None:  # the disks of the store's file and of the downtime packs
        kept = store.local_file()
        places = {"store": kept} if kept else {}
        if downtime is not None:
            places["downtime packs"] = str(downtime.library.root)
        disks = DiskWatch(places)
    accounts = Accounts(store, idle=session_idle)
    trail = trail or AuditTrail(store)
    # the central site shows every site's updates; a site node the group's and its own
    situation = Situation(store, site=None if node.role == "central" else store.site_id)
    contacts = SiteContacts(store if node.role == "central" else None)
    # the PACS's new studies, linked as they come (by one node per PACS: docs/imaging.md)
    studies = StudyFollower(store, pacs) if pacs is not None and follow_pacs else None
    # the lab's calls for critical results no one has taken in hand, passed on to a physician (docs/hl7.md)
    escalation = Escalation(store, escalate_after, active=node.makes_rounds) if escalate_after else None
    last_day_calls = LastDay(store, escalate_after)  # the register's figures, the same whichever process answers

    def feed_read(request: Request, behind: bool) -> None:
        """A site node's poll of the change feed (it says which site it is): that hospital is in contact."""
        account = getattr(request.state, "account", None)
        said = request.headers.get("x-rebond-site", "").strip()[:64]
        if account is not None and account.may("name-origin-site") and (said or account.may("follow-accounts")):
            contacts.heard(said or account.username, account.username, request.client.host if request.client else "?",
                           behind=behind)

    clients = SmartClients(store, accounts)
    api = FhirApi(store, authorize=api_guard(accounts, clients), guard_for=situation_guard, on_feed_read=feed_read)

    def banner(t: Translator) -> str | None:
        said = [node.banner(t), situation_banner(t, situation)]
        if store.writes_refused():
            said.append(t.gettext("The central database is changing servers: you can read, but nothing can be saved for now. "
                                  "Try again in a minute."))
        if disks.level_now() == "full":
            said.append(t.gettext("The server's disk is full: what you record now may be refused. Tell the IT team."))
        return " ".join(text for text in said if text) or None

    web = WebApp(store, accounts, secure_cookies=secure_cookies, status_banner=banner, upstream=node.upstream_access(),
                 downtime=downtime, source=node.status, situation=situation, pacs=pacs, smart=clients,
                 escalate_after=escalate_after)

    async def healthz(request: Request) -> Response:
        try:
            await run_in_threadpool(store.ping)
        except StoreError as err:
            return JSONResponse({"status": "unavailable", "reason": str(err)}, status_code=503)
        except Exception:
            log.exception("health check failed")
            return JSONResponse({"status": "unavailable", "reason": "the store did not answer"}, status_code=503)
        return JSONResponse({"status": "ok", "site_id": store.site_id})

    async def unrouted(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = exc.detail if isinstance(exc, HTTPException) else "internal error"
        if request.url.path.startswith("/fhir"):
            return error_response(FhirError(status, message, code="not-found" if status == 404 else "exception"))
        return web.error_page(request, status, web.language_of(request).gettext("This page does not exist."))

    async def smart_configuration(request: Request) -> Response:
        """`GET /fhir/.well-known/smart-configuration`: how a backend service gets a token here (SMART Backend Services)."""
        return JSONResponse(clients.configuration(str(request.base_url).rstrip("/")))

    async def token(request: Request) -> Response:
        """`POST /auth/token`: a backend service's signed assertion for a short-lived access token (client_credentials)."""
        form = await request.form()
        no_cache = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        try:
            issued = await run_in_threadpool(clients.issue, {k: str(v) for k, v in form.items()}, str(request.url.replace(query="")))
        except SmartError as err:
            log.info("token refused: %s (%s)", err.error, err.description)
            return JSONResponse({"error": err.error, "error_description": err.description}, status_code=400, headers=no_cache)
        except StoreError as err:
            return JSONResponse({"error": "temporarily_unavailable", "error_description": str(err)}, status_code=503,
                                headers={**no_cache, "Retry-After": str(RETRY_AFTER_SECONDS)})
        return JSONResponse(issued, headers=no_cache)

    async def dicomweb(request: Request) -> Response:
        """`GET /dicom-web/studies/{uid}[/…]`: the images of a study this node holds (WADO-RS), from the PACS, for whoever
        may read its ImagingStudy; Orthanc's account stays here, and the access is on the audit trail."""
        if pacs is None:
            raise FhirError(404, "no PACS is configured on this node (rebond serve --orthanc URL)", code="not-found")
        uid = request.path_params["uid"]
        study = await run_in_threadpool(study_of_uid, store, uid)
        if study is None:
            raise FhirError(404, f"no ImagingStudy here has the Study Instance UID {uid}", code="not-found")
        request.state.audit_patient = ref_id(study.get("subject"), "Patient")
        rest = request.path_params.get("rest", "")
        try:
            answer, client = await pacs.dicomweb(f"/studies/{uid}" + (f"/{rest}" if rest else ""), request.url.query,
                                                 request.headers.get("accept"))
        except PacsUnavailable as err:
            log.warning("images not read: %s", err)
            raise FhirError(503, "the PACS (Orthanc) does not answer: the images cannot be read now", code="transient") from None

        async def close() -> None:
            await answer.aclose()
            await client.aclose()

        kind = {"Content-Type": answer.headers["content-type"]} if "content-type" in answer.headers else {}
        return StreamingResponse(answer.aiter_bytes(), status_code=answer.status_code, headers=kind, background=BackgroundTask(close))

    async def site_accounts(request: Request) -> Response:
        """`GET /fhir/$site-accounts`: the accounts of people, for the site nodes (role site), password hashes included."""
        account = request.state.account
        if not account.may("follow-accounts"):
            raise FhirError(403, f"the role '{account.role}' may not copy the accounts: a site node's account "
                                 "needs the role 'site' (rebond accounts add NAME --role site)", code="forbidden")
        directory = await run_in_threadpool(accounts.directory)
        log.debug("accounts copied by %s: %d", account.username, len(directory))
        return JSONResponse({"site_id": store.site_id, "accounts": directory}, headers={"Cache-Control": "no-store"})

    async def audit_events(request: Request) -> Response:
        """`GET /fhir/$audit`: the audit trail as a Bundle of AuditEvents, newest first (permission read-audit)."""
        try:
            query = audit_query(list(request.query_params.multi_items()))
        except AuditQueryError as err:
            raise FhirError(400, str(err), code="invalid") from None
        accesses = await run_in_threadpool(lambda: store.accesses(**query))
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(accesses),
                  "entry": [{"fullUrl": f"urn:uuid:{uuid.UUID(a.id)}", "resource": audit_event(a),
                             "search": {"mode": "match"}} for a in accesses]}
        return Response(orjson.dumps(bundle), media_type="application/fhir+json", headers={"Cache-Control": "no-store"})

    async def audit_import(request: Request) -> Response:
        """`POST /fhir/$audit-import`: a site node's audit lines, kept on this trail too (permission send-audit)."""
        try:
            body = orjson.loads(await request.body())
            lines = [access_from_json(line) for line in body["accesses"]]
        except (ValueError, KeyError, TypeError) as err:
            raise FhirError(400, f"the body must be {{\"accesses\": [line, …]}} as a site node sends it: {err}", code="invalid") from None
        new = await run_in_threadpool(lambda: store.write(lambda tx: tx.record_accesses(lines)))
        return JSONResponse({"received": len(lines), "new": new})

    async def status(request: Request) -> Response:
        facts = node.status()
        if downtime is not None:
            facts["downtime_packs"] = downtime.status()
        if mllp is not None:
            facts["mllp"] = await run_in_threadpool(mllp.status)
        facts["disk"] = disks.status()
        facts["database"] = await run_in_threadpool(store.database)
        if pacs is not None:
            facts["imaging"] = {**await run_in_threadpool(pacs.status),
                                "new_studies": await run_in_threadpool(studies.status) if studies is not None else None}
        facts["situation"] = await run_in_threadpool(situation.status)
        facts["audit"] = trail.status()
        facts["critical_results"] = escalation.status() if escalation is not None else None
        facts["critical_calls"] = await run_in_threadpool(last_day_calls.figures)
        if node.role == "central":
            known = await run_in_threadpool(situation.sites)
            facts["sites"] = await run_in_threadpool(contacts.status, known)
        if "json" in request.headers.get("accept", ""):
            return JSONResponse(facts)
        return web.status_page(request, facts)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await node.start()
        await disks.start()
        trail.start()
        if node.role == "central":
            contacts.start()
        if studies is not None:
            studies.start()
        if escalation is not None:
            escalation.start()
        if mllp is not None:
            recovered = await run_in_threadpool(recover, store)  # kept before a crash, never applied: applied now
            if recovered:
                log.info("%d HL7 messages kept before the last stop were applied", recovered)
            await mllp.start()
        if downtime is not None:
            await downtime.start()
        yield
        if downtime is not None:
            await downtime.stop()
        if mllp is not None:
            await mllp.stop()
        await disks.stop()
        await contacts.stop()
        if escalation is not None:
            await escalation.stop()
        if studies is not None:
            await studies.stop()
        await run_in_threadpool(trail.stop)  # what is left of the trail is written before the store closes
        await node.stop()

    app = Starlette(routes=[Route("/healthz", healthz, methods=["GET"]), Route("/status", status, methods=["GET"]),
                            Route("/fhir/.well-known/smart-configuration", smart_configuration, methods=["GET"]),
                            Route("/.well-known/smart-configuration", smart_configuration, methods=["GET"]),
                            Route("/auth/token", token, methods=["POST"]),
                            # the images of a study are read as its ImagingStudy is
                            Route("/dicom-web/studies/{uid}", api.guarded(dicomweb, resource_type="ImagingStudy"), methods=["GET"]),
                            Route("/dicom-web/studies/{uid}/{rest:path}", api.guarded(dicomweb, resource_type="ImagingStudy"),
                                  methods=["GET"]),
                            Route("/fhir/$site-accounts", api.guarded(site_accounts), methods=["GET"]),
                            Route("/fhir/$audit", api.guarded(audit_events, permission="read-audit", resource_type="AuditEvent"),
                                  methods=["GET"]),
                            Route("/fhir/$audit-import", api.guarded(audit_import, permission="send-audit"), methods=["POST"]),
                            *api.routes(), *web.routes()],
                    exception_handlers={404: unrouted, 405: unrouted}, lifespan=lifespan)
    app.add_middleware(AuditMiddleware, trail=trail)
    app.add_middleware(NodeHeaders, node=node)
    app.state.store = store
    return app


def situation_guard(request: Request) -> Guard | None:
    """Through the FHIR API, the crisis cell's situation updates are written by whom may publish them (post-situation),
    an interface (a monitoring system) or a site node relaying its own; not by a nurse's or a physician's token."""
    account = getattr(request.state, "account", None)
    if account is None or account.may("post-situation") or account.role not in PEOPLE:
        return None

    def guard(resource_type: str, new: dict[str, Any] | None, current: bytes | None) -> None:
        if resource_type == "Communication" and (is_situation_update(new) or (current is not None and is_situation_update(orjson.loads(current)))):
            raise FhirError(403, f"the role '{account.role}' may not publish, change or remove a situation update: the crisis "
                                 "cell publishes them (role crisis), on the status page", code="forbidden")

    return guard


def situation_banner(t: Translator, situation: Situation) -> str | None:
    """What the crisis cell has declared degraded or down, for the top of every page."""
    troubled = situation.headline()
    if not troubled:
        return None
    said = []
    for module in troubled:
        sites = sorted({u.site for u in module.declared if u.state == module.state and u.site})
        where = "" if any(u.site is None and u.state == module.state for u in module.declared) else f" ({', '.join(sites)})"
        said.append(t.gettext("%(module)s: %(state)s", module=t.gettext(module.label), state=t.gettext(module.state or "")) + where)
    return t.gettext("Crisis cell: %(modules)s. What to do instead: see the status page.", modules=" · ".join(said))


class NodeHeaders:
    """Every response says which node answered and, on a site node, how fresh its data is."""

    def __init__(self, app: ASGIApp, node: Node) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.node.headers().items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


#: what a refusal says the role may not do
_PERMITTED = {"fhir-read": "read clinical data", "fhir-write": "write clinical data", "read-audit": "read the audit trail",
              "send-audit": "send a site's audit trail"}


def api_guard(accounts: Accounts, clients: SmartClients | None = None) -> Callable[[Request, str], Awaitable[None]]:
    """Every FHIR request but the CapabilityStatement carries an API token or a SMART access token (`Authorization:
    Bearer`), or a web session."""

    async def authorize(request: Request, permission: str) -> None:
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header[:7].lower() == "bearer " else None
        account = None
        if bearer is not None and clients is not None and bearer.startswith("rbs_"):
            grant = await run_in_threadpool(clients.grant, bearer)
            if grant is None:
                raise FhirError(401, "the access token is unknown or expired: ask /auth/token for a new one", code="expired")
            request.state.account = grant.account
            _within_scopes(request, permission, grant.scopes, grant.context)
            account = grant.account
        elif bearer is not None:
            account = accounts.token_account(bearer)  # cached: no database read on most requests
            if account is None:
                raise FhirError(401, "the API token is unknown, revoked or its account disabled", code="login")
        elif request.cookies.get(SESSION_COOKIE):
            session = await run_in_threadpool(accounts.session, request.cookies[SESSION_COOKIE])
            account = await run_in_threadpool(accounts.get, session.username) if session else None
        if account is None:
            raise FhirError(401, "sign in: send 'Authorization: Bearer <token>' (rebond accounts token USER)", code="login")
        request.state.account = account  # a refusal is on the audit trail too
        if not account.may(permission):
            raise FhirError(403, f"the role '{account.role}' may not {_PERMITTED.get(permission, permission)}", code="forbidden")

    return authorize


#: what a SMART token may be allowed, by its scopes: reading (clinical data, the audit trail's AuditEvents) and writing
_SCOPED = ("fhir-read", "fhir-write", "read-audit")


def _within_scopes(request: Request, permission: str, scopes: Scopes, context: str) -> None:
    """A SMART token may do what its scopes say, on the resource type of the request (its path's, or the endpoint's);
    a request over every type (a Bundle, the history of the system, a search that includes other types) needs the
    scope of every type."""
    if permission not in _SCOPED:
        raise FhirError(403, f"a SMART token may not {_PERMITTED.get(permission, permission)}: use the account's API token",
                        code="forbidden")
    resource_type, write = getattr(request.state, "resource_type", None), permission == "fhir-write"
    if not write and resource_type and any(k.startswith(("_include", "_revinclude")) for k in request.query_params):
        resource_type = None  # what is included may be of any type
    if not scopes.allows(resource_type, write=write):
        what = f"{context}/{resource_type or '*'}.{'write' if write else 'read'}"
        raise FhirError(403, f"the token's scopes do not allow this: it needs {what}", code="forbidden")


def app_from_environment() -> Starlette:
    """The app for each worker process of `rebond serve --workers N` (settings come through the environment)."""
    import os

    from rebond.store import DEFAULT_DB, open_store

    store = open_store(os.environ.get("REBOND_DB", DEFAULT_DB), site_id=os.environ.get("REBOND_SITE_ID", "central"))
    packs = None
    if os.environ.get("REBOND_DOWNTIME_DIR"):  # made by the parent process's schedule: listed and served here
        from pathlib import Path

        from rebond.downtime.library import PackLibrary
        from rebond.downtime.schedule import ScheduleView

        packs = ScheduleView(PackLibrary(Path(os.environ["REBOND_DOWNTIME_DIR"]), int(os.environ.get("REBOND_DOWNTIME_KEEP", "6"))))
    pacs = Orthanc(os.environ["REBOND_ORTHANC"]) if os.environ.get("REBOND_ORTHANC") else None
    return create_app(store, session_idle=float(os.environ.get("REBOND_SESSION_IDLE", 30 * 60)), downtime=packs, pacs=pacs,
                      follow_pacs=bool(os.environ.get("REBOND_FOLLOW_PACS")), escalate_after=escalate_delay(os.environ.get("REBOND_ESCALATE_AFTER")))
