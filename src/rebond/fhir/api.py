"""The FHIR R4 REST surface: routing, headers, content negotiation and Bundles of results."""
from __future__ import annotations

import email.utils
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rebond.fhir import operations
from rebond.fhir.bundles import parse_if_match, parse_if_none_match, process_batch, process_transaction
from rebond.fhir.capability import capability_statement
from rebond.fhir.errors import FhirError, bad_request, operation_outcome
from rebond.fhir.search import SearchError, SearchQuery, parse_search
from rebond.store.base import Gone, Guard, NotFound, Session, Store, Stored, StoreError
from rebond.store.sql import iso_instant

log = logging.getLogger("rebond.api")

FHIR_JSON = "application/fhir+json"
SEARCH_SLOTS = 4
MAX_BODY_BYTES = 32 * 1024 * 1024  # documented in docs/api.md; a larger request gets a 413
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
_PATCH_TYPES = ("application/json-patch+json",)
CHANGE_CURSOR_URL = "https://rebond.health/fhir/StructureDefinition/change-cursor"
CHANGE_SITE_URL = "https://rebond.health/fhir/StructureDefinition/change-site"
RETRY_AFTER_SECONDS = 5  # a failover of the central database takes 10–30 s: clients retry a few times meanwhile


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content, status_code=status, headers=headers, media_type=FHIR_JSON + "; charset=utf-8")


def error_response(err: Exception) -> Response:
    if isinstance(err, FhirError):
        return fhir_response(err.outcome(), err.status, _retry(err.status))
    if isinstance(err, SearchError):
        return fhir_response(operation_outcome("; ".join(err.problems), code="not-supported"), 400)
    if isinstance(err, StoreError):
        return fhir_response(operation_outcome(str(err), code=err.code), err.status, _retry(err.status))
    log.exception("unexpected error")
    return fhir_response(operation_outcome("internal error; the request was not applied", code="exception"), 500)


def _retry(status: int) -> dict[str, str] | None:
    """Unavailable for now (a failover, a full disk, the PACS down): the client is told when to try again."""
    return {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else None


def _http_date(epoch: float) -> str:
    return email.utils.formatdate(epoch, usegmt=True)


def version_headers(stored: Stored, base_url: str, *, location: bool = False) -> dict[str, str]:
    headers = {"ETag": f'W/"{stored.version}"', "Last-Modified": _http_date(stored.last_updated)}
    if location:
        headers["Location"] = f"{base_url}/{stored.resource_type}/{stored.id}/_history/{stored.version}"
    return headers


class FhirApi:
    """Routes of one FHIR endpoint over one store."""

    def __init__(self, store: Store, *, max_body: int = MAX_BODY_BYTES, search_slots: int = SEARCH_SLOTS,
                 authorize: Callable[[Request, str], Awaitable[None]] | None = None,
                 guard_for: Callable[[Request], Guard | None] | None = None,
                 on_feed_read: Callable[[Request, bool], None] | None = None) -> None:
        self.store = store
        # told of each page of `$changes` served (and whether it was full: more waiting), to know who follows the feed
        self.on_feed_read = on_feed_read
        # what the caller may not write whatever its permissions say (Session.guard), from its request; None: no limit
        self.guard_for = guard_for
        # raises FhirError 401/403 unless the caller may read (False) or write (True); None: no accounts on this API
        self.authorize = authorize
        self.max_body = max_body
        # searches beyond this many wait their turn: more threads only fight over the interpreter lock
        self._search_slots = anyio.Semaphore(search_slots)

    # -- plumbing

    def routes(self) -> list[Route]:
        h = self.guarded
        return [
            Route("/fhir/metadata", h(self.metadata, public=True), methods=["GET"]),
            Route("/fhir/_history", h(self.history_system), methods=["GET"]),
            Route("/fhir/$changes", h(self.changes), methods=["GET"]),
            Route("/fhir", h(self.system_bundle), methods=["POST"]),
            Route("/fhir/", h(self.system_bundle), methods=["POST"]),
            Route("/fhir/{type}/_search", h(self.search_post), methods=["POST"]),
            Route("/fhir/{type}/_history", h(self.history_type), methods=["GET"]),
            Route("/fhir/{type}/{id}/_history/{vid}", h(self.vread), methods=["GET"]),
            Route("/fhir/{type}/{id}/_history", h(self.history_instance), methods=["GET"]),
            Route("/fhir/{type}/{id}", h(self.instance), methods=["GET", "PUT", "DELETE", "PATCH"]),
            Route("/fhir/{type}", h(self.type_level), methods=["GET", "POST", "PUT", "DELETE"]),
        ]

    def guarded(self, fn: Callable[[Request], Awaitable[Response]], *, public: bool = False,
                permission: str | None = None, resource_type: str | None = None) -> Callable[[Request], Awaitable[Response]]:
        """`fn` as an endpoint under /fhir: the caller authorized (its account in `request.state.account`) for `permission`
        (by default fhir-read, or fhir-write for a write), any failure an OperationOutcome. `resource_type`: what an
        endpoint without a `{type}` in its path serves, for a token limited to some types (SMART scopes)."""
        async def endpoint(request: Request) -> Response:
            try:
                request.state.resource_type = request.path_params.get("type") or resource_type
                if self.authorize is not None and not public:
                    writes = request.method not in ("GET", "HEAD") and not request.url.path.endswith("/_search")
                    await self.authorize(request, permission or ("fhir-write" if writes else "fhir-read"))
                return await fn(request)
            except Exception as err:  # every failure leaves as an OperationOutcome, never a stack trace
                response = error_response(err)
                if response.status_code == 401:
                    response.headers["WWW-Authenticate"] = 'Bearer realm="rebond"'
                return response

        return endpoint

    @staticmethod
    def base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/") + "/fhir"

    async def _body(self, request: Request, *, patch: bool = False) -> Any:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        allowed = _PATCH_TYPES if patch else _JSON_TYPES
        if ctype and ctype not in allowed:
            raise FhirError(415, f"content type '{ctype}' is not accepted here; send {allowed[0]}", code="not-supported")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body:
            raise FhirError(413, f"the body is over the {self.max_body // (1024 * 1024)} MiB limit", code="too-costly")
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise FhirError(413, f"the body is over the {self.max_body // (1024 * 1024)} MiB limit", code="too-costly")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            raise bad_request("the request has no body", code="structure")
        return operations.parse_body(raw)

    def _written(self, request: Request, outcome: operations.Outcome) -> Response:
        stored = outcome.stored
        if stored is None:  # nothing written (a conditional delete that matched nothing): say so
            return fhir_response(operation_outcome(outcome.message or "done", severity="information", code="informational"), 200)
        headers = version_headers(stored, self.base_url(request), location=outcome.status == 201 or request.method == "POST")
        prefer = request.headers.get("prefer", "")
        if "return=minimal" in prefer or stored.body is None:
            return Response(status_code=outcome.status, headers=headers)
        if "return=OperationOutcome" in prefer:
            return fhir_response(operation_outcome(outcome.message or "done", severity="information", code="informational"),
                                 outcome.status, headers)
        return fhir_response(stored.body, outcome.status, headers)

    async def _write(self, fn: Callable[..., operations.Outcome], *args: Any, request: Request, **kwargs: Any) -> operations.Outcome:
        origin, guard = self.origin(request), self.guard(request)

        def work(tx: Session) -> operations.Outcome:
            tx.origin, tx.guard = origin, guard
            return fn(tx, *args, **kwargs)

        return await run_in_threadpool(self.store.write, work)

    def guard(self, request: Request) -> Guard | None:
        return self.guard_for(request) if self.guard_for is not None else None

    @staticmethod
    def origin(request: Request) -> str | None:
        """The site a replayed write comes from (`X-Rebond-Site`), believed only from a site node's or an interface's account."""
        account = getattr(request.state, "account", None)
        site = request.headers.get("x-rebond-site", "").strip()
        return site[:64] if site and account is not None and account.may("name-origin-site") else None

    # -- endpoints

    async def metadata(self, request: Request) -> Response:
        return fhir_response(capability_statement(self.base_url(request)))

    async def type_level(self, request: Request) -> Response:
        rtype = request.path_params["type"]
        operations.check_type(rtype)
        if request.method == "GET":
            return await self._search(request, rtype, list(request.query_params.multi_items()))
        if request.method == "POST":
            body = await self._body(request)
            outcome = await self._write(operations.create, rtype, body, if_none_exist=request.headers.get("if-none-exist"),
                                        request=request)
            return self._written(request, outcome)
        query = request.url.query
        if request.method == "PUT":
            body = await self._body(request)
            if_match = parse_if_match(request.headers.get("if-match"))
            outcome = await self._write(operations.conditional_update, rtype, query, body, if_match=if_match, request=request)
            return self._written(request, outcome)
        outcome = await self._write(operations.conditional_delete, rtype, query, request=request)
        return self._written(request, outcome)

    async def instance(self, request: Request) -> Response:
        rtype = request.path_params["type"]
        rid = request.path_params["id"]
        operations.check_type(rtype)
        if request.method == "GET":
            return await self._read(request, rtype, rid)
        if_match = parse_if_match(request.headers.get("if-match"))
        if request.method == "PUT":
            body = await self._body(request)
            outcome = await self._write(operations.update, rtype, rid, body, if_match=if_match, request=request,
                                        create_only=parse_if_none_match(request.headers.get("if-none-match")))
        elif request.method == "PATCH":
            body = await self._body(request, patch=True)
            outcome = await self._write(operations.patch, rtype, rid, body, if_match=if_match, request=request)
        else:
            outcome = await self._write(operations.delete, rtype, rid, if_match=if_match, request=request)
            if outcome.stored is not None:
                return Response(status_code=204, headers={"ETag": f'W/"{outcome.stored.version}"'})
            return Response(status_code=204)
        return self._written(request, outcome)

    async def _read(self, request: Request, rtype: str, rid: str) -> Response:
        operations.check_id(rid)
        if self.store.local_reads:
            # an embedded primary-key read takes tens of microseconds: cheaper in the event loop than a hop to a thread
            stored = self.store.read(rtype, rid)
        else:
            stored = await run_in_threadpool(self.store.read, rtype, rid)
        if stored is None:
            raise NotFound(f"{rtype}/{rid} does not exist")
        if stored.deleted or stored.body is None:
            raise Gone(f"{rtype}/{rid} was deleted (version {stored.version})")
        headers = version_headers(stored, self.base_url(request))
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        return fhir_response(stored.body, 200, headers)

    async def vread(self, request: Request) -> Response:
        rtype, rid, vid = request.path_params["type"], request.path_params["id"], request.path_params["vid"]
        operations.check_type(rtype)
        if not vid.isdigit():
            raise bad_request(f"'{vid}' is not a version number")
        stored = await run_in_threadpool(self.store.vread, rtype, rid, int(vid))
        if stored is None:
            raise NotFound(f"{rtype}/{rid} has no version {vid}")
        if stored.deleted or stored.body is None:
            raise Gone(f"version {vid} of {rtype}/{rid} is its deletion")
        return fhir_response(stored.body, 200, version_headers(stored, self.base_url(request)))

    async def search_post(self, request: Request) -> Response:
        rtype = request.path_params["type"]
        operations.check_type(rtype)
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype != "application/x-www-form-urlencoded":
            raise FhirError(415, "POST _search takes application/x-www-form-urlencoded", code="not-supported")
        form = (await request.body()).decode()
        params = list(request.query_params.multi_items()) + parse_qsl(form, keep_blank_values=True)
        return await self._search(request, rtype, params)

    async def _search(self, request: Request, rtype: str, params: list[tuple[str, str]]) -> Response:
        lenient = "handling=lenient" in request.headers.get("prefer", "")
        query = parse_search(rtype, params, lenient=lenient)
        async with self._search_slots:
            result = await run_in_threadpool(self.store.search, query)
        base = self.base_url(request)
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if result.total is not None:
            bundle["total"] = result.total
        bundle["link"] = _page_links(base, rtype, params, query, len(result.matches))
        if query.ignored:
            bundle["link"][0]["url"] = _page_url(base, rtype, [(k, v) for k, v in params if k not in query.ignored], query.offset, query.count)
        entries = [_search_entry(base, s, "match", query) for s in result.matches]
        entries += [_search_entry(base, s, "include", query) for s in result.included]
        if query.ignored:
            entries.append({"resource": operation_outcome(
                "ignored unknown or unsupported parameters: " + ", ".join(query.ignored), severity="warning", code="not-supported"),
                "search": {"mode": "outcome"}})
        if entries:
            bundle["entry"] = entries
        return fhir_response(bundle)

    async def history_system(self, request: Request) -> Response:
        return await self._history(request, None, None)

    async def history_type(self, request: Request) -> Response:
        rtype = request.path_params["type"]
        operations.check_type(rtype)
        return await self._history(request, rtype, None)

    async def history_instance(self, request: Request) -> Response:
        rtype, rid = request.path_params["type"], request.path_params["id"]
        operations.check_type(rtype)
        return await self._history(request, rtype, rid)

    async def _history(self, request: Request, rtype: str | None, rid: str | None) -> Response:
        q = request.query_params
        unknown = [k for k in q if k not in ("_since", "_count", "_offset", "_format", "_pretty")]
        if unknown and "handling=lenient" not in request.headers.get("prefer", ""):
            raise bad_request("unknown history parameters: " + ", ".join(unknown), code="not-supported")
        since = None
        if "_since" in q:
            from rebond.store.indexing import date_range

            rng = date_range(q["_since"])
            if rng is None:
                raise bad_request(f"_since '{q['_since']}' is not an instant")
            since = rng[0]
        count = _int_param(q.get("_count"), 50, "_count")
        count = min(count, 1000)
        offset = _int_param(q.get("_offset"), 0, "_offset")
        versions, total = await run_in_threadpool(self.store.history, rtype, rid, since=since, count=count, offset=offset)
        if rid is not None and total == 0:
            raise NotFound(f"{rtype}/{rid} does not exist")
        base = self.base_url(request)
        path = "/".join(p for p in (base, rtype, rid, "_history") if p)
        links = [{"relation": "self", "url": f"{path}?{urlencode(list(q.multi_items()))}"}]
        if offset + count < total:
            nxt = [(k, v) for k, v in q.multi_items() if k != "_offset"] + [("_offset", str(offset + count))]
            links.append({"relation": "next", "url": f"{path}?{urlencode(nxt)}"})
        bundle = {"resourceType": "Bundle", "type": "history", "total": total, "link": links,
                  "entry": [_history_entry(base, s) for s in versions]}
        return fhir_response(bundle)

    async def changes(self, request: Request) -> Response:
        """`$changes?after=CURSOR&_count=N`: committed versions in commit order, and the cursor to resume from."""
        q = request.query_params
        count = min(_int_param(q.get("_count"), 100, "_count"), 1000)
        after = q.get("after") or None
        if after is not None and not all(part.isdigit() for part in after.split("~")):
            raise bad_request(f"'{after}' is not a cursor this server gave")
        page = await run_in_threadpool(self.store.changes, after, count)
        base = self.base_url(request)
        entries = []
        for change in page.changes:
            entry = _history_entry(base, change.stored)
            entry["extension"] = [
                {"url": CHANGE_CURSOR_URL, "valueString": str(change.seq)},
                {"url": CHANGE_SITE_URL, "valueString": change.stored.site_id},
            ]
            entries.append(entry)
        bundle = {
            "resourceType": "Bundle",
            "type": "history",
            "extension": [{"url": CHANGE_CURSOR_URL, "valueString": page.next_cursor}],
            "link": [{"relation": "next", "url": f"{base}/$changes?{urlencode({'after': page.next_cursor, '_count': count})}"}],
            "entry": entries,
        }
        if self.on_feed_read is not None:
            self.on_feed_read(request, len(entries) >= count)
        return fhir_response(bundle)

    async def system_bundle(self, request: Request) -> Response:
        body = await self._body(request)
        base = self.base_url(request)
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise bad_request("POST to the base takes a batch or transaction Bundle")
        kind = body.get("type")
        if kind == "batch":
            result = await run_in_threadpool(process_batch, self.store, body, base, self._bundle_reader(base), self.origin(request),
                                             self.guard(request))
        elif kind == "transaction":
            result = await run_in_threadpool(process_transaction, self.store, body, base, self._bundle_reader(base),
                                             self.origin(request), self.guard(request))
        else:
            raise bad_request(f"a Bundle of type '{kind}' cannot be processed; send a batch or a transaction")
        return fhir_response(result)

    def _bundle_reader(self, base: str) -> Callable[[str, str], tuple[int, Any]]:
        def read(method: str, url: str) -> tuple[int, Any]:
            path, _, query = url.partition("?")
            parts = [p for p in path.split("/") if p]
            try:
                if len(parts) == 2:
                    stored = self.store.read(parts[0], parts[1])
                    if stored is None:
                        return 404, operation_outcome(f"{path} does not exist", code="not-found")
                    if stored.body is None:
                        return 410, operation_outcome(f"{path} was deleted", code="deleted")
                    return 200, orjson.Fragment(stored.body)
                if len(parts) == 1:
                    params = parse_qsl(query, keep_blank_values=True)
                    q = parse_search(parts[0], params)
                    result = self.store.search(q)
                    return 200, {"resourceType": "Bundle", "type": "searchset", "total": result.total,
                                 "entry": [_search_entry(base, s, "match", q) for s in result.matches]}
                return 400, operation_outcome(f"cannot read '{url}' in a bundle")
            except (FhirError, SearchError, StoreError) as err:
                resp = error_response(err)
                return resp.status_code, orjson.loads(resp.body)

        return read


def _int_param(value: str | None, default: int, name: str) -> int:
    if value is None:
        return default
    if not value.isdigit():
        raise bad_request(f"{name} must be a whole number")
    return int(value)


def _page_url(base: str, rtype: str, params: list[tuple[str, str]], offset: int, count: int) -> str:
    kept = [(k, v) for k, v in params if k not in ("_offset", "_count")]
    kept += [("_count", str(count)), ("_offset", str(offset))]
    return f"{base}/{rtype}?{urlencode(kept)}"


def _page_links(base: str, rtype: str, params: list[tuple[str, str]], query: SearchQuery, returned: int) -> list[dict[str, str]]:
    links = [{"relation": "self", "url": _page_url(base, rtype, params, query.offset, query.count)}]
    if query.summary != "count" and returned >= query.count and query.count > 0:
        links.append({"relation": "next", "url": _page_url(base, rtype, params, query.offset + query.count, query.count)})
    if query.offset > 0:
        links.append({"relation": "previous", "url": _page_url(base, rtype, params, max(0, query.offset - query.count), query.count)})
    return links


_SUMMARY_ALWAYS = ("resourceType", "id", "meta")


def _shape(stored: Stored, query: SearchQuery) -> Any:
    """The entry's resource, trimmed by _elements or _summary when asked (marked SUBSETTED)."""
    assert stored.body is not None
    if query.elements:
        keep = set(query.elements) | set(_SUMMARY_ALWAYS)
    elif query.summary == "text":
        keep = {"text", *_SUMMARY_ALWAYS}
    elif query.summary == "data":
        resource = orjson.loads(stored.body)
        resource.pop("text", None)
        return _subsetted(resource)
    else:
        return orjson.Fragment(stored.body)
    resource = orjson.loads(stored.body)
    return _subsetted({k: v for k, v in resource.items() if k in keep})


def _subsetted(resource: dict[str, Any]) -> dict[str, Any]:
    meta = dict(resource.get("meta") or {})
    tags = list(meta.get("tag", []))
    tags.append({"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"})
    meta["tag"] = tags
    resource["meta"] = meta
    return resource


def _search_entry(base: str, stored: Stored, mode: str, query: SearchQuery) -> dict[str, Any]:
    return {
        "fullUrl": f"{base}/{stored.resource_type}/{stored.id}",
        "resource": _shape(stored, query) if mode == "match" else orjson.Fragment(stored.body or b"{}"),
        "search": {"mode": mode},
    }


def _history_entry(base: str, stored: Stored) -> dict[str, Any]:
    url = f"{stored.resource_type}/{stored.id}"
    method = {"create": "POST", "update": "PUT", "delete": "DELETE"}.get(stored.method, "PUT")
    entry: dict[str, Any] = {"fullUrl": f"{base}/{url}"}
    if stored.body is not None:
        entry["resource"] = orjson.Fragment(stored.body)
    entry["request"] = {"method": method, "url": url if method != "POST" else stored.resource_type}
    entry["response"] = {
        "status": "201 Created" if stored.version == 1 else ("204 No Content" if stored.deleted else "200 OK"),
        "etag": f'W/"{stored.version}"',
        "lastModified": iso_instant(stored.last_updated),
    }
    return entry
