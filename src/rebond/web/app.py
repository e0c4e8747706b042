"""The clinician web app's routes: sign-in, wards, census, chart, results, bedside forms.

Every page reads and writes through the same store and search as the FHIR API. Pages
that show patient data require a session and a permission of the user's role; they are
never cached by the browser, and no error ever shows a stack trace.
"""
from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import orjson
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from rebond.clinical.admission import RangeExhausted, emergency_admission, ipp_range
from rebond.clinical.census import ward_census, ward_occupancy, ward_of
from rebond.clinical.chart import patient_chart, patient_header, with_alerts
from rebond.clinical.conventions import HOSPITAL_TZ
from rebond.clinical.critical_register import MAX_DAYS, as_csv, register
from rebond.clinical.escalation import ESCALATE_AFTER
from rebond.clinical.imaging import Orthanc, PacsUnavailable, images_of
from rebond.clinical.interventions import PROBLEMS, PROPOSALS, figures, propose
from rebond.clinical.interventions import answer as answer_intervention
from rebond.clinical.medication import prescription
from rebond.clinical.messaging import (
    Box,
    Conversation,
    about_patient,
    answer,
    box,
    conversation,
    conversations,
    hospitals,
    last_written,
    own_boxes,
    send,
    service_of,
    services,
    tally,
    waiting,
    waiting_in,
    ward_box,
)
from rebond.clinical.patients import UnclearSearch, find_patients, parse_day, patient_by_ipp_or_id
from rebond.clinical.pharmacy import validate, worklist
from rebond.clinical.prescribing import ROUTES, formulary, is_new, prescribe, stop
from rebond.clinical.prescribing import acknowledge as acknowledge_prescription
from rebond.clinical.recording import NOTE_KINDS, VITAL_SIGNS, InvalidForm, record_administration, record_note, record_vitals
from rebond.clinical.records import Clinician, Entry, any_of, fhir_instant, instant, read, ref_id
from rebond.clinical.results import acknowledge_result, reports
from rebond.clinical.staff import Shift, StaffMember, binder, shifts, staff_by_ward
from rebond.clinical.wards import HospitalWards, group_wards
from rebond.downtime.library import KeptPack, PackLibrary
from rebond.downtime.pack import source_from, ward_pack
from rebond.downtime.render import render_pdf
from rebond.downtime.schedule import PackSchedule
from rebond.hl7.intake import CHANNEL as HL7_CHANNEL
from rebond.hl7.intake import describe, replay
from rebond.ops.situation import MODULES, STATES, Situation, known_sites, module_states, read_form
from rebond.security.accounts import Account, Accounts, WebSession
from rebond.security.smart import APP_TOKEN_SECONDS, SmartClients, SmartError, merged, parse_scopes
from rebond.site.reconcile import CentralUnreachable, StillInConflict, open_conflicts, settle
from rebond.store.base import NotFound, PreconditionFailed, Store, StoreError, Unavailable
from rebond.web.i18n import DEFAULT_LANGUAGE, LANGUAGES, N_, Translator, translator
from rebond.web.plots import human_unit, trend_svg

log = logging.getLogger("rebond.web")
HERE = Path(__file__).parent
SESSION_COOKIE = "rebond_session"
LANGUAGE_COOKIE = "rebond_lang"
LOGIN_CSRF_COOKIE = "rebond_login"
#: the directory lists the on-call shifts starting within this many hours (at 16:00: tonight's)
ON_CALL_AHEAD_HOURS = 24
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # patient data stays off the disk of shared ward PCs
}


class Forbidden(Exception):
    """The user's role does not allow this page or action."""


@dataclass
class Page:
    """What every handler gets: the request, the signed-in user, and the language."""

    request: Request
    account: Account
    session: WebSession | None  # None for a program reading with an API token
    t: Translator
    now: dt.datetime
    waiting: tuple[int, int] | None = None  # conversations waiting in the person's boxes (of which urgent), for the top bar

    @property
    def clinician(self) -> Clinician:
        return Clinician(self.account.username, self.account.display, self.account.practitioner_id, self.account.service)


def _pretty(resource: dict[str, Any] | None) -> str:
    if resource is None:
        return "—"
    shown = {k: v for k, v in resource.items() if k not in ("meta", "text")}
    return orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode()


def safe_target(target: str | None) -> str:
    """Only a path of this site may be a redirect target (never //elsewhere or http://elsewhere)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _wanted(request: Request) -> str:
    return request.url.path + (f"?{request.url.query}" if request.url.query else "")


class WebApp:
    """The pages of one Rebond node over one store."""

    def __init__(self, store: Store, accounts: Accounts, *, secure_cookies: bool = False,
                 status_banner: Callable[[Translator], str | None] | None = None, upstream: tuple[str, str] | None = None,
                 downtime: PackSchedule | None = None, source: Callable[[], dict[str, Any]] | None = None,
                 situation: Situation | None = None, pacs: Orthanc | None = None, smart: SmartClients | None = None,
                 escalate_after: dt.timedelta | None = ESCALATE_AFTER) -> None:
        self.store = store
        self.escalate_after = escalate_after  # after how long the lab's unanswered calls are passed on (None: never)
        self.smart = smart  # the apps people authorize to act for them (SMART App Launch)
        self.pacs = pacs  # the images' PACS: imaging reports link to their images there
        self.situation = situation or Situation(store, site=None)
        self.downtime = downtime  # the scheduled packs, when this node makes them
        self.source = source or (lambda: {"role": "central", "data_as_of": dt.datetime.now(dt.UTC).isoformat()})
        # username -> (until, the Communication written last, its top bar's message count)
        self._waiting: dict[str, tuple[float, str | None, tuple[int, int]]] = {}
        self.upstream = upstream  # a site node's central site (FHIR base, API token), for settling conflicts
        self.accounts = accounts
        self.secure_cookies = secure_cookies
        self.status_banner = status_banner
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.globals["trend_svg"] = trend_svg
        self.env.globals["VITAL_SIGNS"] = VITAL_SIGNS
        self.env.globals["MODULES"] = MODULES
        self.env.globals["is_new"] = is_new  # a prescription a nurse should read
        self.env.globals["MODULE_STATES"] = STATES
        self.env.filters["unit"] = human_unit
        self.env.globals["epoch"] = lambda seconds: dt.datetime.fromtimestamp(seconds, dt.UTC)
        self.env.filters["instant"] = lambda iso: dt.datetime.fromisoformat(iso.replace("Z", "+00:00")) if iso else None

    def routes(self) -> list[BaseRoute]:
        page = self._page
        return [
            Route("/", page(self.home, None), methods=["GET"]),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/language/{lang}", self.language, methods=["GET"]),
            Route("/wards/{ward_id}", page(self.census, "view-patients"), methods=["GET"]),
            Route("/wards/{ward_id}/admit", page(self.admit, "admit-patients"), methods=["GET", "POST"]),
            Route("/patients", page(self.patient_search, "view-patients"), methods=["GET"]),
            Route("/patients/{patient_id}", page(self.chart, "view-patients"), methods=["GET"]),
            Route("/patients/{patient_id}/imaging/{study_id}", page(self.images, "view-patients"), methods=["GET"]),
            Route("/patients/{patient_id}/vitals", page(self.vitals_form, "record-vitals"), methods=["GET", "POST"]),
            Route("/patients/{patient_id}/notes", page(self.note_form, "write-notes"), methods=["GET", "POST"]),
            Route("/patients/{patient_id}/prescriptions/new", page(self.prescription_form, "prescribe"), methods=["GET", "POST"]),
            Route("/patients/{patient_id}/prescriptions/{request_id}/stop", page(self.stop_form, "prescribe"), methods=["GET", "POST"]),
            Route("/patients/{patient_id}/prescriptions/{request_id}/acknowledge", page(self.acknowledge_prescription, "acknowledge-prescriptions"),
                  methods=["POST"]),
            Route("/patients/{patient_id}/administrations/{request_id}", page(self.administration_form, "record-administrations"),
                  methods=["GET", "POST"]),
            Route("/auth/authorize", page(self.authorize_app, "fhir-read"), methods=["GET", "POST"]),
            Route("/pharmacy", page(self.pharmacy, "validate-prescriptions"), methods=["GET"]),
            Route("/pharmacy/validate", page(self.validate_prescription, "validate-prescriptions"), methods=["POST"]),
            Route("/pharmacy/interventions/new", page(self.intervention_form, "validate-prescriptions"), methods=["GET", "POST"]),
            Route("/patients/{patient_id}/interventions/{issue_id}", page(self.answer_intervention, "prescribe"), methods=["POST"]),
            Route("/messages", page(self.messages, "messages"), methods=["GET"]),
            Route("/messages/new", page(self.new_message, "messages"), methods=["GET", "POST"]),
            Route("/messages/{message_id}", page(self.message, "messages"), methods=["GET", "POST"]),
            Route("/directory", page(self.directory, None), methods=["GET"]),
            Route("/procedures", page(self.procedures_binder, None), methods=["GET"]),
            Route("/results", page(self.results, "view-results"), methods=["GET"]),
            Route("/critical-results", page(self.critical_results, "view-results"), methods=["GET"]),
            Route("/critical-results.csv", page(self.critical_results_csv, "view-results"), methods=["GET"]),
            Route("/results/{report_id}/acknowledge", page(self.acknowledge, "acknowledge-results"), methods=["POST"]),
            Route("/admin/accounts", page(self.account_list, "manage-accounts"), methods=["GET"]),
            Route("/reconciliation", page(self.reconciliation, "resolve-conflicts"), methods=["GET"]),
            Route("/reconciliation/{seq:int}", page(self.settle_conflict, "resolve-conflicts"), methods=["POST"]),
            Route("/downtime", page(self.downtime_packs, "view-patients"), methods=["GET"]),
            Route("/downtime/wards/{ward_id}.pdf", page(self.fresh_pack, "view-patients"), methods=["GET"]),
            Route("/downtime/files/{ward_id}/{name}.pdf", page(self.kept_pack, "view-patients"), methods=["GET"]),
            Route("/status/situation", page(self.situation_form, "post-situation"), methods=["GET", "POST"]),
            Route("/admin/audit", page(self.audit_trail, "read-audit"), methods=["GET"]),
            Route("/admin/hl7", page(self.dead_letters, "manage-interfaces"), methods=["GET"]),
            Route("/admin/hl7/{message_id:int}/replay", page(self.replay_letter, "manage-interfaces"), methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

    # -- plumbing

    def language_of(self, request: Request) -> Translator:
        lang = request.cookies.get(LANGUAGE_COOKIE, DEFAULT_LANGUAGE)
        return translator(lang if lang in LANGUAGES else DEFAULT_LANGUAGE)

    def render(self, request: Request, t: Translator, template: str, status: int = 200, account: Account | None = None,
               session: WebSession | None = None, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(
            _=t.gettext, ngettext=t.ngettext, t=t, lang=t.language, account=account, csrf=session.csrf if session else "",
            here=_wanted(request), status_banner=self.status_banner(t) if self.status_banner else None, **context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def error_page(self, request: Request, status: int, message: str, account: Account | None = None,
                   session: WebSession | None = None) -> HTMLResponse:
        t = self.language_of(request)
        return self.render(request, t, "error.html", status=status, account=account, session=session, status_code=status, message=message)

    def _page(self, handler: Callable[[Page], Awaitable[Response]], permission: str | None) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            response = await checked(request)
            # the time spent building the page, for the browser's developer tools and the benchmarks
            response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
            return response

        async def checked(request: Request) -> Response:
            t = self.language_of(request)
            token = request.cookies.get(SESSION_COOKIE, "")
            bearer = request.headers.get("authorization", "")
            session = None
            if not token and bearer[:7].lower() == "bearer " and request.method == "GET":
                # a program reading a page (the downtime packs): an API token instead of a sign-in; never for a form
                account = await run_in_threadpool(self.accounts.token_account, bearer[7:].strip())
                if account is None:
                    return PlainTextResponse("the API token is unknown, revoked or its account disabled", status_code=401)
            else:
                session = await run_in_threadpool(self.accounts.session, token)
                account = await run_in_threadpool(self.accounts.get, session.username) if session else None
                if session is None or account is None or not account.active:
                    target = urlencode({"next": _wanted(request), **({"expired": "1"} if token else {})})
                    return RedirectResponse(f"/login?{target}", status_code=303)
            request.state.account = account  # for the audit trail: who asked (and was refused)
            if permission is not None and not account.may(permission):
                return self.error_page(request, 403, t.gettext("Your role does not give access to this page."), account, session)
            if request.method == "POST":
                form = await request.form()
                if session is None or not secrets.compare_digest(str(form.get("csrf", "")), session.csrf):
                    return self.error_page(request, 403, t.gettext("This form has expired. Go back, reload the page and try again."),
                                           account, session)
            now = dt.datetime.now(dt.UTC)
            waiting = await self._waiting_for(account, now) if request.method == "GET" else None
            try:
                return await handler(Page(request, account, session, t, now, waiting))
            except NotFound:
                return self.error_page(request, 404, t.gettext("This page does not exist, or the record is not in this hospital's file."),
                                       account, session)
            except Forbidden:
                return self.error_page(request, 403, t.gettext("Your role does not give access to this page."), account, session)
            except Unavailable as err:
                return self.error_page(request, 503, t.gettext("Nothing was recorded: this node cannot take writes now (%(why)s).",
                                                               why=str(err)), account, session)
            except Exception:
                incident = uuid.uuid4().hex[:8]
                log.exception("page %s failed (incident %s)", request.url.path.split("/")[1], incident)
                return self.error_page(request, 500, t.gettext("Something went wrong on our side (incident %(id)s). Your data is safe; "
                                                               "try again, and call IT if it happens again.", id=incident),
                                       account, session)

        return endpoint

    def _show(self, p: Page, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return self.render(p.request, p.t, template, status=status, account=p.account, session=p.session, now=p.now,
                           inbox=p.waiting, **context)

    #: how long the top bar's count of waiting messages is kept for a person while no message is written anywhere (a
    #: message written by anyone, here, on another node, by the lab's interface, counts it again at the next page)
    WAITING_SECONDS = 60.0

    async def _waiting_for(self, account: Account, now: dt.datetime) -> tuple[int, int] | None:
        """(waiting, urgent) in the boxes of a person who reads messages (their own, their service's, their wards'),
        counted again when a message has been written since or after WAITING_SECONDS; None for an account that stands
        for no one and works for no service, or when they cannot be counted now."""
        if not account.may("messages") or not (account.practitioner_id or account.service):
            return None
        clinician = Clinician(account.username, account.display, account.practitioner_id, account.service)
        kept = self._waiting.get(account.username)

        def count() -> tuple[int, int]:
            newest = last_written(self.store)
            if kept is not None and kept[0] > time.monotonic() and kept[1] == newest:
                return kept[2]
            counts = [waiting(self.store, b.reference, now) for b in own_boxes(self.store, clinician)]
            found = sum(c[0] for c in counts), sum(c[1] for c in counts)
            self._waiting[account.username] = (time.monotonic() + self.WAITING_SECONDS, newest, found)
            return found

        try:
            return await run_in_threadpool(count)
        except (Unavailable, StoreError):
            return None  # the page is shown without the count rather than not at all

    # -- signing in and out

    async def login(self, request: Request) -> Response:
        t = self.language_of(request)
        target = safe_target(request.query_params.get("next"))
        if request.method == "GET":
            notice = t.gettext("Your session has expired: sign in again to continue.") if request.query_params.get("expired") else None
            return self._login_page(request, t, target, notice=notice)
        form = await request.form()
        target = safe_target(str(form.get("next", "/")))
        cookie_token = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie_token or not secrets.compare_digest(str(form.get("csrf", "")), cookie_token):
            return self._login_page(request, t, target, error=t.gettext("The sign-in form had expired: please try again."), status=400)
        username = str(form.get("username", "")).strip()
        password = str(form.get("password", ""))
        if not username or not password:
            return self._login_page(request, t, target, username=username, error=t.gettext("Enter your user name and your password."),
                                    status=400)
        if await run_in_threadpool(self.accounts.locked_out, username):
            return self._login_page(request, t, target, username=username, status=429,
                                    error=t.gettext("Too many failed attempts: wait 5 minutes, or ask IT to check your account."))
        account = await run_in_threadpool(self.accounts.authenticate, username, password)
        if account is None:
            return self._login_page(request, t, target, username=username, error=t.gettext("Wrong user name or password."), status=401)
        token, _session = await run_in_threadpool(self.accounts.open_session, account)
        if target == "/" and not account.may("view-patients") and account.may("manage-accounts"):
            target = "/admin/accounts"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax", secure=self.secure_cookies, path="/")
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    def _login_page(self, request: Request, t: Translator, target: str, *, username: str = "", error: str | None = None,
                    notice: str | None = None, status: int = 200) -> Response:
        token = secrets.token_urlsafe(24)
        response = self.render(request, t, "login.html", status=status, login_csrf=token, target=target, username=username,
                               error=error, notice=notice)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=self.secure_cookies, path="/login")
        return response

    async def logout(self, request: Request) -> Response:
        token = request.cookies.get(SESSION_COOKIE, "")
        session = await run_in_threadpool(self.accounts.session, token)
        form = await request.form()
        if session is not None and secrets.compare_digest(str(form.get("csrf", "")), session.csrf):
            await run_in_threadpool(self.accounts.close_session, token)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def language(self, request: Request) -> Response:
        lang = request.path_params["lang"]
        response = RedirectResponse(safe_target(request.query_params.get("next")), status_code=303)
        if lang in LANGUAGES:
            response.set_cookie(LANGUAGE_COOKIE, lang, max_age=400 * 24 * 3600, samesite="lax", secure=self.secure_cookies, path="/")
        return response

    # -- pages

    async def home(self, p: Page) -> Response:
        if not p.account.may("view-patients"):  # IT and the crisis cell: their page is the situation
            return RedirectResponse("/status", status_code=303)
        hospitals = await run_in_threadpool(group_wards, self.store)
        return self._show(p, "home.html", hospitals=hospitals)

    async def directory(self, p: Page) -> Response:
        """Who is on call now and in the next hours, and who works on each ward: no patient data, for every account."""
        def load() -> tuple[list[HospitalWards], list[Shift], list[Shift], dict[str, list[StaffMember]]]:
            now = p.now
            upcoming = shifts(self.store, now, now + dt.timedelta(hours=ON_CALL_AHEAD_HOURS))
            return (group_wards(self.store, count_inpatients=False), [s for s in upcoming if s.start <= now], [s for s in upcoming if s.start > now],
                    staff_by_ward(self.store))

        hospitals, current, coming, staff = await run_in_threadpool(load)
        wards = {ward.id: ward for h in hospitals for ward, _n in h.wards}
        return self._show(p, "directory.html", hospitals=hospitals, wards=wards, current=current, coming=coming, staff=staff,
                          ahead=ON_CALL_AHEAD_HOURS)

    async def messages(self, p: Page) -> Response:
        """A box's conversations (the person's own, their wards' teams', or any service's chosen), those waiting first."""
        wanted = p.request.query_params.get("box", "")

        def load() -> tuple[list[Box], list[Box], Box | None, list[Conversation], dict[str, tuple[int, int]]]:
            mine, every = own_boxes(self.store, p.clinician), services(self.store)
            talks_of = {b.reference: conversations(self.store, b.reference, p.now) for b in mine}  # each box read once
            counts = {ref: tally([c for c in talks if c.waits_for(ref)]) for ref, talks in talks_of.items()}
            if wanted:
                chosen = next((b for b in [*mine, *every] if b.reference == wanted), None)
                if chosen is None:
                    raise NotFound(f"no box {wanted}")
            else:  # the box the top bar's count sent the person to: an urgent message's, else one waiting, else their own
                chosen = max(mine, key=lambda b: (counts[b.reference][1] > 0, counts[b.reference][0] > 0, b is mine[0]), default=None)
            if chosen is None:
                return mine, every, None, [], counts
            talks = talks_of.get(chosen.reference)
            return mine, every, chosen, talks if talks is not None else conversations(self.store, chosen.reference, p.now), counts

        mine, every, chosen, talks, counts = await run_in_threadpool(load)
        waits = [c for c in talks if c.waits_for(chosen.reference)] if chosen else []
        if chosen is not None:
            counts[chosen.reference] = tally(waits)
        return self._show(p, "messages.html", mine=mine, every=every, chosen=chosen, counts=counts, waiting=waits,
                          others=[c for c in talks if c not in waits])

    async def new_message(self, p: Page) -> Response:
        """Write to a ward's team, a lab, a pharmacy, or a person on call; about a patient, or not."""
        query = p.request.query_params
        values = {"to": query.get("to", ""), "text": "", "urgent": "", "patient": query.get("patient", ""),
                  "as": query.get("as", ""), "entry": str(Entry.new())}
        problems: dict[str, str] = {}
        if p.request.method == "POST":
            values = await _filled(p.request, values)
            try:
                message_id = await run_in_threadpool(send, self.store, values, p.clinician, p.now)
            except InvalidForm as err:
                problems = {k: self._problem(p.t, v) for k, v in err.problems.items()}
            else:
                log.info("message %s sent by %s", message_id, p.account.username)
                back = f"&box={quote(values['as'])}" if values["as"] else ""
                return RedirectResponse(f"/messages/{quote(message_id)}?sent=1{back}", status_code=303)

        def load() -> tuple[list[Box], list[Box], list[Shift], Any]:
            on_call = [s for s in shifts(self.store, p.now, p.now + dt.timedelta(seconds=1)) if s.practitioner_id]
            header = patient_header(self.store, values["patient"]) if values["patient"] else None
            return own_boxes(self.store, p.clinician), services(self.store), on_call, header

        mine, every, on_call, chart = await run_in_threadpool(load)
        known = {b.reference for b in every} | {f"Practitioner/{s.practitioner_id}" for s in on_call}
        extra = await run_in_threadpool(box, self.store, values["to"]) if values["to"] and values["to"] not in known else None
        return self._show(p, "message_form.html", status=422 if problems else 200, values=values, problems=problems, mine=mine,
                          every=every, on_call=on_call, extra=extra, chart=chart, cut_off=self.source().get("upstream_reachable") is False)

    async def message(self, p: Page) -> Response:
        """A conversation whole; an answer to it, or « I'll see to it »."""
        message_id = p.request.path_params["message_id"]
        shown_in = p.request.query_params.get("box", "")  # the box it was opened from: the way back, and for whom one answers
        values = {"text": "", "as": "" if p.account.practitioner_id else shown_in, "entry": str(Entry.new())}
        problems: dict[str, str] = {}
        if p.request.method == "POST":
            values = await _filled(p.request, ("text", "as", "action"))
            taken = values.pop("action", "") == "take"
            try:
                await run_in_threadpool(answer, self.store, message_id, values, p.clinician, p.now, taken=taken)
            except InvalidForm as err:
                problems = {k: self._problem(p.t, v) for k, v in err.problems.items()}
            else:
                back = f"?box={quote(shown_in)}" if shown_in else ""
                return RedirectResponse(f"/messages/{quote(message_id)}{back}#last", status_code=303)

        def load() -> tuple[Conversation, list[Box]]:
            return conversation(self.store, message_id), [] if p.account.practitioner_id else services(self.store)

        talk, every = await run_in_threadpool(load)
        return self._show(p, "message.html", status=422 if problems else 200, talk=talk, values=values, problems=problems,
                          every=every, sent=p.request.query_params.get("sent") == "1", shown_in=shown_in)

    async def authorize_app(self, p: Page) -> Response:
        """SMART App Launch, standalone: an app asks to act for the signed-in person, who says yes or no. Yes: the app
        gets a code for its token (`/auth/token`); either way it is told at its registered redirect URI."""
        if self.smart is None:
            raise NotFound("no apps on this node")
        if p.request.method == "POST":
            form = await p.request.form()
            params = {name: str(form.get(name, "")) for name in _AUTHORIZATION_PARAMS}
            decision = str(form.get("decision", ""))
        else:
            params, decision = {name: p.request.query_params.get(name, "") for name in _AUTHORIZATION_PARAMS}, ""
        try:
            asked = await run_in_threadpool(self.smart.authorization, params, str(p.request.base_url).rstrip("/") + "/fhir")
        except SmartError as err:
            if not err.redirect:
                return self.error_page(p.request, 400, p.t.gettext("This app cannot be authorized here: %(why)s.", why=err.description),
                                       p.account, p.session)
            return RedirectResponse(_with_query(params["redirect_uri"], error=err.error, error_description=err.description,
                                                state=params["state"]), status_code=303)
        if decision == "allow":
            code = await run_in_threadpool(self.smart.code, asked, p.account)
            return RedirectResponse(_with_query(asked.redirect_uri, code=code, state=asked.state), status_code=303)
        if decision:
            return RedirectResponse(_with_query(asked.redirect_uri, error="access_denied", state=asked.state), status_code=303)
        scopes = merged(sc for _t, sc in parse_scopes(asked.scope, "user"))
        page = self._show(p, "authorize.html", asked=asked, params=params, reads=sorted(scopes.read), writes=sorted(scopes.write),
                          minutes=APP_TOKEN_SECONDS // 60, kinds=RECORD_KINDS)
        # the answer leads to the app: the form may end there (a browser applies form-action to the redirect too)
        app_origin = str(httpx.URL(asked.redirect_uri).copy_with(path="/", query=None, fragment=None)).rstrip("/")
        page.headers["Content-Security-Policy"] = page.headers["Content-Security-Policy"].replace(
            "form-action 'self'", f"form-action 'self' {app_origin}")
        return page

    async def procedures_binder(self, p: Page) -> Response:
        """Each hospital's procedures binder: what to do when the IT fails first, then the clinical procedures."""
        return self._show(p, "procedures.html", binders=await run_in_threadpool(binder, self.store))

    async def census(self, p: Page) -> Response:
        ward_id = p.request.path_params["ward_id"]
        census = await run_in_threadpool(ward_census, self.store, ward_id, p.now)
        can_admit = p.account.may("admit-patients") and await run_in_threadpool(ipp_range, self.store) is not None

        def team() -> tuple[Box | None, list[Conversation]]:  # the ward's messages waiting: the page's head, the patients'
            found = ward_box(self.store, ward_id)
            return found, waiting_in(self.store, found.reference, p.now) if found is not None else []

        box_of_ward, waits = await run_in_threadpool(team) if p.account.may("messages") else (None, [])
        about: dict[str, list[Conversation]] = {}
        for talk in waits:
            if talk.first.patient_id:
                about.setdefault(talk.first.patient_id, []).append(talk)
        return self._show(p, "census.html", census=census, can_admit=can_admit, team=box_of_ward, team_waiting=waits, waits_about=about)

    async def admit(self, p: Page) -> Response:
        ward_id = p.request.path_params["ward_id"]
        census = await run_in_threadpool(ward_occupancy, self.store, ward_id, p.now)
        if await run_in_threadpool(ipp_range, self.store) is None:
            return self.error_page(p.request, 409, p.t.gettext("Emergency admissions need a range of patient numbers on this node: "
                                                               "ask IT (rebond site --ipp-range)."), p.account, p.session)
        values: dict[str, str] = {"gender": "", "entry": str(Entry.new())}
        problems: dict[str, str] = {}
        if p.request.method == "POST":
            values = await _filled(p.request, ("family", "given", "birth_date", "gender", "bed"))
            try:
                patient_id = await run_in_threadpool(emergency_admission, self.store, ward_id, values, p.clinician, p.now)
            except InvalidForm as err:
                problems = {k: self._problem(p.t, v) for k, v in err.problems.items()}
            except RangeExhausted:
                return self.error_page(p.request, 409, p.t.gettext("The range of patient numbers of this node is used up: call IT."),
                                       p.account, p.session)
            else:
                return RedirectResponse(f"/patients/{quote(patient_id)}", status_code=303)
        free = [line for line in census.beds if line.patient is None and line.bed_id]
        return self._show(p, "admit.html", status=422 if problems else 200, census=census, free=free, values=values, problems=problems)

    async def patient_search(self, p: Page) -> Response:
        text = p.request.query_params.get("q", "").strip()
        hits, problem = None, None
        if text:
            try:
                hits = await run_in_threadpool(find_patients, self.store, text)
            except UnclearSearch:
                problem = p.t.gettext("Type a name, an IPP or a birth date (dd/mm/yyyy).")
        return self._show(p, "patients.html", text=text, hits=hits, problem=problem, status=400 if problem else 200)

    async def chart(self, p: Page) -> Response:
        patient_id = p.request.path_params["patient_id"]
        chart = await run_in_threadpool(patient_chart, self.store, patient_id, p.now)
        talks = await run_in_threadpool(about_patient, self.store, patient_id, p.now) if p.account.may("messages") else []
        selected = p.request.query_params.get("analyte")
        analyte = next((s for s in chart.labs if s.code == selected), None)
        if analyte is None:
            analyte = next((s for s in chart.labs if s.latest.abnormal), chart.labs[0] if chart.labs else None)
        return self._show(p, "chart.html", chart=chart, analyte=analyte, may=p.account.may, saved=p.request.query_params.get("saved"),
                          pacs=self.pacs is not None, talks=talks)

    async def images(self, p: Page) -> Response:
        """An imaging study's images, in the PACS's viewer (Orthanc), found there by their Study Instance UID."""
        if self.pacs is None:
            raise NotFound("no PACS configured (rebond serve --orthanc URL)")
        patient_id, study_id = p.request.path_params["patient_id"], p.request.path_params["study_id"]
        try:
            viewer = await run_in_threadpool(images_of, self.store, self.pacs, patient_id, study_id)
        except PacsUnavailable as err:
            log.warning("images not opened: %s", err)
            return self.error_page(p.request, 503, p.t.gettext("The PACS (Orthanc) does not answer: the images cannot be opened now. "
                                                               "The report can still be read in the chart."), p.account, p.session)
        if viewer is None:
            return self.error_page(p.request, 404, p.t.gettext("The images of this examination are not in the PACS (yet): the report "
                                                               "can be read in the chart. Ask radiology if they are needed."),
                                   p.account, p.session)
        return RedirectResponse(viewer, status_code=303)

    async def vitals_form(self, p: Page) -> Response:
        patient_id = p.request.path_params["patient_id"]
        chart = await run_in_threadpool(patient_header, self.store, patient_id)
        values: dict[str, str] = {"entry": str(Entry.new())}
        problems: dict[str, str] = {}
        if p.request.method == "POST":
            values = await _filled(p.request, (sign.field for sign in VITAL_SIGNS))
            try:
                await run_in_threadpool(record_vitals, self.store, patient_id, values, p.clinician, p.now)
            except InvalidForm as err:
                problems = {k: self._problem(p.t, v) for k, v in err.problems.items()}
            else:
                return RedirectResponse(f"/patients/{quote(patient_id)}?saved=vitals#vitals", status_code=303)
        return self._show(p, "vitals_form.html", status=422 if problems else 200, chart=chart, values=values, problems=problems)

    async def note_form(self, p: Page) -> Response:
        """A progress note or the nurses' handover, on the patient's current stay."""
        patient_id = p.request.path_params["patient_id"]
        chart = await run_in_threadpool(patient_header, self.store, patient_id)
        values: dict[str, str] = {"kind": "progress" if p.account.role == "physician" else "nursing", "text": "", "entry": str(Entry.new())}
        problems: dict[str, str] = {}
        if p.request.method == "POST":
            values = await _filled(p.request, ("kind", "text"))
            try:
                await run_in_threadpool(record_note, self.store, patient_id, values, p.clinician, p.now,
                                        chart.stay.encounter_id if chart.stay else None)
            except InvalidForm as err:
                problems = {k: self._problem(p.t, v) for k, v in err.problems.items()}
            else:
                return RedirectResponse(f"/patients/{quote(patient_id)}?saved=note#notes", status_code=303)
        return self._show(p, "note_form.html", status=422 if problems else 200, chart=chart, values=values, problems=problems,
                          kinds=[(k.code, p.t.gettext(k.label)) for k in NOTE_KINDS])

    async def prescription_form(self, p: Page) -> Response:
        """A new prescription from the formulary, checked against the patient's known allergies."""
        patient_id = p.request.path_params["patient_id"]
        chart = await run_in_threadpool(patient_header, self.store, patient_id)
        medicines = await run_in_threadpool(formulary, self.store)
        values: dict[str, str] = {"route": ROUTES[0], "entry": str(Entry.new())}
        problems: dict[str, str] = {}
        allergy_met = False
        if p.request.method == "POST":
            values = await _filled(p.request, ("medication", "dose", "route", "times", "as_needed", "indication", "days", "note",
                                               "despite_allergy"))
            try:
                await run_in_threadpool(prescribe, self.store, patient_id, values, p.clinician, p.now, chart.allergies,
                                        chart.stay.encounter_id if chart.stay else None)
            except InvalidForm as err:
                problems = {k: self._problem(p.t, v) for k, v in err.problems.items()}
                allergy_met = err.problems.get("medication", "").startswith("allergy:")
            else:
                return RedirectResponse(f"/patients/{quote(patient_id)}?saved=prescription#prescriptions", status_code=303)
        return self._show(p, "prescription_form.html", status=422 if problems else 200, chart=chart, values=values,
                          problems=problems, medicines=medicines, routes=ROUTES, allergy_met=allergy_met)

    async def stop_form(self, p: Page) -> Response:
        """Stop a prescription, saying why: its doses end, the chart and the packs no longer list it."""
        patient_id, request_id = p.request.path_params["patient_id"], p.request.path_params["request_id"]
        chart = await run_in_threadpool(patient_header, self.store, patient_id)
        stored = await run_in_threadpool(self.store.read, "MedicationRequest", request_id)
        request = orjson.loads(stored.body) if stored is not None and stored.body else None
        if request is None or request.get("subject", {}).get("reference") != f"Patient/{patient_id}":
            raise NotFound(request_id)
        values: dict[str, str] = {"reason": "", "version": str(stored.version) if stored else "", "entry": str(Entry.new())}
        problems: dict[str, str] = {}
        changed = False
        if p.request.method == "POST" and request.get("status") == "active":
            values = {**await _filled(p.request, ("reason", "version"))}
            try:
                await run_in_threadpool(stop, self.store, patient_id, request_id, values, p.clinician, p.now)
            except InvalidForm as err:
                problems = {k: self._problem(p.t, v) for k, v in err.problems.items()}
            except PreconditionFailed:
                changed = True
                stored = await run_in_threadpool(self.store.read, "MedicationRequest", request_id)
                request = orjson.loads(stored.body) if stored is not None and stored.body else request
                values["version"] = str(stored.version) if stored else ""
            else:
                return RedirectResponse(f"/patients/{quote(patient_id)}?saved=stopped#prescriptions", status_code=303)
        return self._show(p, "stop_form.html", status=422 if problems or changed else 200, chart=chart, rx=prescription(request),
                          active=request.get("status") == "active", values=values, problems=problems, changed=changed)

    async def administration_form(self, p: Page) -> Response:
        patient_id, request_id = p.request.path_params["patient_id"], p.request.path_params["request_id"]
        chart = await run_in_threadpool(patient_header, self.store, patient_id)
        request = await run_in_threadpool(read, self.store, "MedicationRequest", request_id)
        if request is None or request.get("status") != "active" or request.get("subject", {}).get("reference") != f"Patient/{patient_id}":
            raise NotFound(request_id)  # not an active prescription of this patient
        rx = (await run_in_threadpool(with_alerts, self.store, [request], chart.allergies))[0]
        due = instant(p.request.query_params.get("due"))
        values: dict[str, str] = {"outcome": "given", "time": p.t.time(p.now), "entry": str(Entry.new())}
        problems: dict[str, str] = {}
        if p.request.method == "POST":
            values = await _filled(p.request, ("outcome", "reason", "time"))
            try:
                await run_in_threadpool(record_administration, self.store, request_id, values, p.clinician, p.now)
            except InvalidForm as err:
                problems = {k: self._problem(p.t, v) for k, v in err.problems.items()}
            else:
                return RedirectResponse(f"/patients/{quote(patient_id)}?saved=administration#administrations", status_code=303)
        return self._show(p, "administration_form.html", status=422 if problems else 200, chart=chart, rx=rx, due=due,
                          values=values, problems=problems)

    @staticmethod
    def _problem(t: Translator, code: str) -> str:
        kind, _, rest = code.partition(":")
        if kind == "out-of-range":
            low, high = rest.split(":")
            return t.gettext("Must be between %(low)s and %(high)s.", low=low, high=high)
        return {
            "not-a-number": t.gettext("Not a number."),
            "empty": t.gettext("Fill in at least one measurement."),
            "diastolic-above-systolic": t.gettext("The diastolic pressure must be lower than the systolic."),
            "choose-outcome": t.gettext("Say whether the dose was given."),
            "reason-required": t.gettext("Give the reason the dose was not given."),
            "not-a-time": t.gettext("Write the time as HH:MM."),
            "required": t.gettext("Required."),
            "not-a-date": t.gettext("Write the date as dd/mm/yyyy or yyyy-mm-dd."),
            "in-the-future": t.gettext("This date is in the future."),
            "choose-one": t.gettext("Choose one."),
            "no-one-to-tell": t.gettext("The prescription names no prescriber known here, and the patient is in no ward: telephone the prescriber."),
            "bed-taken": t.gettext("This bed is not free any more: choose another."),
            "too-long": t.gettext("At most %(n)s characters.", n=rest),
            "state-needs-module": t.gettext("Choose the module whose state you declare."),
            "not-a-site": t.gettext("A site is written as its code, e.g. H1."),
            "not-in-formulary": t.gettext("Choose a medication of the formulary."),
            "not-times": t.gettext("Write the times as 8h, 20h30 or 08:00, 20:30."),
            "times-or-as-needed": t.gettext("Give the times, or tick « when needed »."),
            "too-many-times": t.gettext("At most %(n)s times a day.", n=rest),
            "allergy": t.gettext("Known allergy: %(substances)s. To prescribe it all the same, tick the box below.", substances=rest),
        }.get(kind, kind)

    async def results(self, p: Page) -> Response:
        q = p.request.query_params
        ward_id = q.get("ward", "")
        abnormal_only = q.get("abnormal") == "1"
        pending_only = q.get("pending", "1") == "1"
        problems: dict[str, str] = {}
        since = p.now - dt.timedelta(days=2)
        if q.get("since"):
            parsed = instant(q["since"])
            if parsed is None:
                problems["since"] = p.t.gettext("Write the date as dd/mm/yyyy or yyyy-mm-dd.")
            else:
                since = parsed
        hospitals = await run_in_threadpool(group_wards, self.store)
        ward = await run_in_threadpool(ward_of, self.store, ward_id) if ward_id else None

        def load() -> list[tuple[Any, Any]]:
            if ward is None or problems:
                return []
            census = ward_occupancy(self.store, ward.id, p.now)
            beds = {b.patient.id: b for b in census.beds if b.patient is not None}
            if not beds:
                return []
            found = reports(self.store, ("patient", any_of(f"Patient/{pid}" for pid in beds)), ("category", "LAB,RAD"),
                            ("issued", f"ge{fhir_instant(since)}"))
            return [(beds[r.patient_id], r) for r in found if r.patient_id in beds
                    and (not abnormal_only or r.abnormal) and (not pending_only or r.acknowledgement is None)]

        rows = await run_in_threadpool(load)
        return self._show(p, "results.html", status=400 if problems else 200, hospitals=hospitals, ward=ward, rows=rows,
                          abnormal_only=abnormal_only, pending_only=pending_only, since=since, since_text=q.get("since", ""),
                          problems=problems, may=p.account.may)

    async def acknowledge(self, p: Page) -> Response:
        report_id = p.request.path_params["report_id"]
        await run_in_threadpool(acknowledge_result, self.store, report_id, p.clinician, p.now)
        form = await p.request.form()
        return RedirectResponse(safe_target(str(form.get("next", "/results"))), status_code=303)

    async def acknowledge_prescription(self, p: Page) -> Response:
        """A nurse has read a new prescription: recorded once, whoever clicks first."""
        patient_id, request_id = p.request.path_params["patient_id"], p.request.path_params["request_id"]
        request = await run_in_threadpool(read, self.store, "MedicationRequest", request_id)
        if request is None or request.get("subject", {}).get("reference") != f"Patient/{patient_id}":
            raise NotFound(request_id)
        await run_in_threadpool(acknowledge_prescription, self.store, request_id, p.clinician, p.now)
        return RedirectResponse(f"/patients/{quote(patient_id)}#prescriptions", status_code=303)

    def _register_asked(self, p: Page) -> tuple[int, str | None, dict[str, str], dict[str, str]]:
        """The register's period (days back from now), hospital (an Organization id; by default the hospital of the
        service the account works for), the problems with what was asked, and the hospitals to choose from."""
        q = p.request.query_params
        names = hospitals(self.store)
        problems: dict[str, str] = {}
        days = q.get("days", "1")
        if not days.isdigit() or not 1 <= int(days) <= MAX_DAYS:
            problems["days"] = p.t.gettext("Give a number of days from 1 to %(most)s.", most=MAX_DAYS)
            days = "1"
        if "hospital" in q:
            hospital = q.get("hospital") or None  # chosen: "" for every hospital
        else:  # the hospital of the service the account works for (the lab's bench: its lab's), else all
            home = service_of(self.store, p.account.service) if p.account.service else None
            hospital = ref_id((home or {}).get("providedBy"), "Organization")
        if hospital is not None and hospital not in names:
            raise NotFound(f"no hospital {hospital}")
        return int(days), hospital, problems, names

    async def critical_results(self, p: Page) -> Response:
        """The register of the lab's calls for critical results: whom each was told to, who took it in hand, when."""
        days, hospital, problems, names = await run_in_threadpool(self._register_asked, p)
        found = await run_in_threadpool(register, self.store, p.now - dt.timedelta(days=days), p.now, hospital=hospital,
                                        after=self.escalate_after)
        return self._show(p, "critical_results.html", status=400 if problems else 200, register=found, days=days,
                          hospital=hospital, hospitals=sorted(names.items(), key=lambda kv: kv[1]), problems=problems)

    async def critical_results_csv(self, p: Page) -> Response:
        """The same register as CSV, for a quality review; its patients are named on the audit trail."""
        days, hospital, problems, _names = await run_in_threadpool(self._register_asked, p)
        if problems:
            return PlainTextResponse(" ".join(problems.values()), status_code=400)
        found = await run_in_threadpool(register, self.store, p.now - dt.timedelta(days=days), p.now, hospital=hospital,
                                        after=self.escalate_after)
        p.request.state.audit_patients = {c.first.patient_id for c in found.calls if c.first.patient_id}
        name = f"resultats-critiques-{p.now.astimezone(HOSPITAL_TZ):%Y%m%d-%H%M}.csv"
        return Response(as_csv(found), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})

    async def pharmacy(self, p: Page) -> Response:
        """The prescriptions waiting for the pharmacy's validation, ward by ward: of one hospital, or of all."""
        hospitals = await run_in_threadpool(lambda: group_wards(self.store, count_inpatients=False))
        sites = {h.site_id for h in hospitals}
        if "hospital" in p.request.query_params:
            hospital = p.request.query_params.get("hospital") or None  # chosen: "" for every hospital
        else:  # the site of the pharmacy the account works for, else all
            home = await run_in_threadpool(service_of, self.store, p.account.service) if p.account.service else None
            hospital = next((site for place in (home or {}).get("location") or () if (site := ref_id(place, "Location")) in sites), None)
        if hospital is not None and hospital not in sites:
            raise NotFound(f"no hospital site {hospital}")
        lists = await run_in_threadpool(worklist, self.store, hospital)
        month = await run_in_threadpool(figures, self.store, p.now - dt.timedelta(days=30))
        return self._show(p, "pharmacy.html", hospitals=hospitals, hospital=hospital, lists=lists, month=month,
                          saved=p.request.query_params.get("saved"))

    async def intervention_form(self, p: Page) -> Response:
        """A pharmaceutical intervention on a prescription: the problem, the proposal, for the prescriber to answer."""
        request_id = p.request.query_params.get("request", "")
        request = await run_in_threadpool(read, self.store, "MedicationRequest", request_id) if request_id else None
        if request is None or request.get("status") != "active":
            raise NotFound(request_id)
        patient_id = str(request.get("subject", {}).get("reference", "")).removeprefix("Patient/")
        chart = await run_in_threadpool(patient_header, self.store, patient_id)
        values = {"problem": "", "proposal": "", "text": "", "urgent": "", "as": p.request.query_params.get("as", ""),
                  "next": safe_target(p.request.query_params.get("next", "/pharmacy")), "entry": str(Entry.new())}
        problems: dict[str, str] = {}
        if p.request.method == "POST":
            values = await _filled(p.request, ("problem", "proposal", "text", "urgent", "as", "next"))
            values["next"] = safe_target(values["next"] or "/pharmacy")
            try:
                issue_id = await run_in_threadpool(propose, self.store, request_id, values, p.clinician, p.now)
            except InvalidForm as err:
                problems = {k: self._problem(p.t, v) for k, v in err.problems.items()}
            else:
                log.info("pharmaceutical intervention %s on prescription %s by %s", issue_id, request_id, p.account.username)
                back = values["next"].split("#")[0]
                return RedirectResponse(f"{back}{'&' if '?' in back else '?'}saved=intervention", status_code=303)
        every = await run_in_threadpool(services, self.store) if not p.account.practitioner_id and not p.account.service else []
        return self._show(p, "intervention_form.html", status=422 if problems else 200, chart=chart, rx=prescription(request),
                          values=values, problems=problems, problem_codes=PROBLEMS, proposal_codes=PROPOSALS, every=every)

    async def answer_intervention(self, p: Page) -> Response:
        """The prescriber accepts or refuses a pharmaceutical intervention, once; then corrects or stops the prescription."""
        patient_id, issue_id = p.request.path_params["patient_id"], p.request.path_params["issue_id"]
        form = await p.request.form()
        action = str(form.get("action", ""))
        if action not in ("accept", "refuse"):
            return self.error_page(p.request, 400, p.t.gettext("This form has expired. Go back, reload the page and try again."),
                                   p.account, p.session)
        issue = await run_in_threadpool(read, self.store, "DetectedIssue", issue_id)
        if issue is None or issue.get("patient", {}).get("reference") != f"Patient/{patient_id}":
            raise NotFound(issue_id)
        try:
            await run_in_threadpool(answer_intervention, self.store, issue_id, action == "accept", p.clinician, p.now)
        except PreconditionFailed:  # answered already, by someone else: the chart shows their answer
            return RedirectResponse(f"/patients/{quote(patient_id)}?saved=answered#prescriptions", status_code=303)
        log.info("pharmaceutical intervention %s answered (%s) by %s", issue_id, action, p.account.username)
        return RedirectResponse(f"/patients/{quote(patient_id)}#prescriptions", status_code=303)

    async def validate_prescription(self, p: Page) -> Response:
        """« Valider »: the prescription as the pharmacist saw it (its version), recorded once; changed since: shown again."""
        form = await p.request.form()
        # one prescription, or a patient's all at once: each `request` with its `version`, in order
        pairs = list(zip([str(r) for r in form.getlist("request")], [str(v) for v in form.getlist("version")], strict=False))
        back = safe_target(str(form.get("next", "/pharmacy")))
        if not pairs or len(pairs) != len(form.getlist("request")) or not all(r and v.isdigit() for r, v in pairs):
            return self.error_page(p.request, 400, p.t.gettext("This form has expired. Go back, reload the page and try again."),
                                   p.account, p.session)
        changed = False
        for request_id, version in pairs:
            try:
                await run_in_threadpool(validate, self.store, request_id, int(version), p.clinician, p.now)
            except PreconditionFailed:  # the others are validated; this one is shown again as it stands
                changed = True
                continue
            log.info("prescription %s validated by %s", request_id, p.account.username)
        if changed:
            path = back.split("#")[0]
            return RedirectResponse(f"{path}{'&' if '?' in path else '?'}saved=changed", status_code=303)
        return RedirectResponse(back, status_code=303)

    async def reconciliation(self, p: Page) -> Response:
        conflicts = await run_in_threadpool(open_conflicts, self.store)
        shown = [(c, _pretty(c.site), _pretty(c.central)) for c in conflicts]
        return self._show(p, "reconciliation.html", conflicts=shown, site_node=self.upstream is not None,
                          outcome=p.request.query_params.get("outcome"))

    async def settle_conflict(self, p: Page) -> Response:
        if self.upstream is None:
            raise NotFound("no central site to settle with")
        form = await p.request.form()
        keep = str(form.get("keep", ""))
        if keep not in ("site", "central"):
            return self.error_page(p.request, 400, p.t.gettext("Choose which version to keep."), p.account, p.session)
        if keep == "site" and self.source().get("upstream_reachable") is False:  # known cut off: no one waits for timeouts
            return RedirectResponse("/reconciliation?outcome=unreachable", status_code=303)
        upstream, token = self.upstream
        try:
            await run_in_threadpool(settle, self.store, upstream, token, int(p.request.path_params["seq"]), keep, p.clinician)  # type: ignore[arg-type]
        except LookupError:
            raise NotFound("conflict") from None
        except CentralUnreachable:
            return RedirectResponse("/reconciliation?outcome=unreachable", status_code=303)
        except StillInConflict:
            return RedirectResponse("/reconciliation?outcome=changed", status_code=303)
        return RedirectResponse("/reconciliation?outcome=settled", status_code=303)

    def status_page(self, request: Request, facts: dict[str, Any]) -> HTMLResponse:
        """The node's situation for a person (the same facts as `GET /status` in JSON); no sign-in needed."""
        published = request.query_params.get("published")
        updates = self.situation.updates(fresh=bool(published))
        return self.render(request, self.language_of(request), "status.html", facts=facts, now=dt.datetime.now(dt.UTC),
                           updates=updates, modules=module_states(updates), published=published)

    async def situation_form(self, p: Page) -> Response:
        """The crisis cell publishes a situation update: about a module or in general, for the group or one site."""
        here = self.situation.site  # a site node: its own site by default; the central site: the whole group
        values = {"text": "", "module": "", "state": "", "site": here or "", "next": "", "entry": str(Entry.new())}
        problems: dict[str, str] = {}
        if p.request.method == "POST":
            values = await _filled(p.request, values)
            try:
                update = read_form(values, p.now)
            except InvalidForm as err:
                problems = {k: self._problem(p.t, v) for k, v in err.problems.items()}
            else:
                await run_in_threadpool(self.situation.publish, update, p.clinician)
                log.info("situation update published by %s (module %s, state %s, site %s)", p.account.username,
                         update.module or "-", update.state or "-", update.site or "group")
                return RedirectResponse("/status?published=1", status_code=303)
        sites = await run_in_threadpool(known_sites, self.store)
        if values["site"] and values["site"] not in {code for code, _name in sites}:
            sites.append((values["site"], values["site"]))  # a site node of a site the data does not name yet
        return self._show(p, "situation_form.html", status=422 if problems else 200, values=values, problems=problems, sites=sites)

    @property
    def _packs(self) -> PackLibrary | None:
        return self.downtime.library if self.downtime else None

    async def downtime_packs(self, p: Page) -> Response:
        """The latest pack of every ward (and the older ones kept), to download and print; JSON for programs."""
        def load() -> tuple[list[HospitalWards], dict[str, list[KeptPack]]]:
            hospitals = group_wards(self.store)
            kept = {ward.id: self._packs.packs(ward.id) for h in hospitals for ward, _n in h.wards} if self._packs else {}
            return hospitals, kept

        hospitals, kept = await run_in_threadpool(load)
        if "json" in p.request.headers.get("accept", ""):
            return JSONResponse({"wards": [
                {"ward_id": ward.id, "ward": ward.name, "hospital": h.hospital, "fresh": f"/downtime/wards/{ward.id}.pdf",
                 "kept": [{"url": f"/downtime/files/{ward.id}/{k.filename}", "as_of": k.as_of.isoformat(), "digest": k.digest,
                           "pages": k.pages, "size": k.size, "changes": k.changes} for k in kept.get(ward.id, [])]}
                for h in hospitals for ward, _n in h.wards],
                "schedule": self.downtime.status() if self.downtime else None}, headers={"Cache-Control": "no-store"})
        return self._show(p, "downtime.html", hospitals=hospitals, kept=kept, schedule=self.downtime.status() if self.downtime else None)

    async def fresh_pack(self, p: Page) -> Response:
        """A pack made now, for one ward (what `rebond downtime-pack --server` downloads)."""
        ward_id = p.request.path_params["ward_id"]
        lang = p.request.query_params.get("lang", p.t.language)
        def make() -> bytes:
            previous = self._packs.previous_facts(ward_id) if self._packs else None
            pack = ward_pack(self.store, ward_id, p.now, translator(lang), source_from(self.source()), previous=previous)
            return render_pdf(pack.data)

        pdf = await run_in_threadpool(make)
        return Response(pdf, media_type="application/pdf", headers={
            "Content-Disposition": f'inline; filename="rebond-{ward_id}.pdf"', "Cache-Control": "no-store"})

    async def kept_pack(self, p: Page) -> Response:
        path = self._packs.pdf_path(p.request.path_params["ward_id"], p.request.path_params["name"]) if self._packs else None
        if path is None:
            raise NotFound("no such pack")
        return FileResponse(path, media_type="application/pdf", content_disposition_type="inline",
                            headers={"Cache-Control": "no-store"})

    async def audit_trail(self, p: Page) -> Response:
        """Who reached whose data, newest first: this node's audit trail, by patient (IPP or id), account and day."""
        values = {k: p.request.query_params.get(k, "").strip() for k in ("patient", "user", "day")}
        query: dict[str, Any] = {"limit": 200}
        problem = None
        if values["day"]:
            try:
                day = parse_day(values["day"])
            except ValueError:
                problem = p.t.gettext("Write the date as dd/mm/yyyy or yyyy-mm-dd.")
            else:
                start = dt.datetime.combine(day, dt.time(), HOSPITAL_TZ)
                query.update(since=start.timestamp(), until=(start + dt.timedelta(days=1)).timestamp())
        if values["user"]:
            query["agent"] = values["user"]
        if values["patient"] and problem is None:
            patient = await run_in_threadpool(patient_by_ipp_or_id, self.store, values["patient"])
            if patient is None:
                problem = p.t.gettext("No patient has this IPP or id on this node.")
            query["patient"] = patient
        accesses = [] if problem else await run_in_threadpool(lambda: self.store.accesses(**query))
        return self._show(p, "audit.html", status=400 if problem else 200, values=values, problem=problem, accesses=accesses)

    async def dead_letters(self, p: Page) -> Response:
        letters = await run_in_threadpool(self.store.messages, HL7_CHANNEL, "rejected")
        shown = [(m, describe(m.raw)[0], m.raw.decode("utf-8", "replace").replace("\r", "\n")) for m in letters]
        return self._show(p, "dead_letters.html", letters=shown, outcome=p.request.query_params.get("outcome"))

    async def replay_letter(self, p: Page) -> Response:
        message_id = int(p.request.path_params["message_id"])
        try:
            answer = await run_in_threadpool(replay, self.store, message_id)
        except LookupError:
            raise NotFound(str(message_id)) from None
        outcome = "applied" if answer.code in ("AA", "CA") else "refused"
        return RedirectResponse(f"/admin/hl7?outcome={outcome}", status_code=303)

    async def account_list(self, p: Page) -> Response:
        accounts = await run_in_threadpool(self.accounts.all)
        return self._show(p, "accounts.html", accounts=accounts)


#: the records an app may ask for, in words a person signing in reads (others are named by their FHIR type)
RECORD_KINDS = {
    "Patient": N_("patients' identity"), "Encounter": N_("stays"), "Observation": N_("results and vital signs"),
    "DiagnosticReport": N_("reports"), "MedicationRequest": N_("prescriptions"), "MedicationAdministration": N_("administrations"),
    "AllergyIntolerance": N_("allergies"), "Condition": N_("problems"), "DocumentReference": N_("notes and documents"),
    "Communication": N_("messages between the staff"), "ImagingStudy": N_("imaging examinations"),
}
#: what an app's authorization request says (RFC 6749 §4.1.1, PKCE, SMART's aud)
_AUTHORIZATION_PARAMS = ("response_type", "client_id", "redirect_uri", "scope", "state", "aud", "code_challenge", "code_challenge_method")


def _with_query(uri: str, **params: str) -> str:
    """`uri` with `params` added to its query (those empty left out)."""
    return uri + ("&" if "?" in uri else "?") + urlencode({k: v for k, v in params.items() if v})


async def _filled(request: Request, fields: Iterable[str]) -> dict[str, str]:
    """A form's fields as sent, and its `entry`: this filling of the form, recorded once however often it is sent (a
    form without one gets a new one)."""
    form = await request.form()
    values = {name: str(form.get(name, "")) for name in fields}
    values["entry"] = str(Entry.of(str(form.get("entry", ""))))
    return values
