"""Batch and transaction Bundles: each batch entry on its own, a transaction all or nothing."""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from rebond.fhir import operations
from rebond.fhir.errors import FhirError, bad_request, operation_outcome
from rebond.fhir.model import is_resource_type
from rebond.store.base import Guard, Session, Store, StoreError
from rebond.store.sql import iso_instant

log = logging.getLogger("rebond.bundles")

# the specification's processing order for a transaction
_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}

#: reads inside a bundle are answered by a callback the REST layer gives: (method, url) -> (status, body)
Reader = Callable[[str, str], tuple[int, Any]]


@dataclass
class _Entry:
    index: int
    method: str
    url: str
    resource_type: str
    resource_id: str | None
    query: str
    resource: Any
    full_url: str | None
    if_none_exist: str | None
    if_match: int | None
    create_only: bool = False  # a PUT with If-None-Match: * (only if the resource does not exist yet)
    matched: bool = False  # a POST whose If-None-Exist found the resource: nothing to write


def parse_if_match(value: str | None) -> int | None:
    """`W/"3"` (or `3`) → 3; anything else is a 400."""
    if value is None or value == "":
        return None
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit():
        raise bad_request(f"If-Match '{value}' is not a version ETag such as W/\"3\"")
    return int(text)


def parse_if_none_match(value: str | None) -> bool:
    """A write's `If-None-Match`: `*` → True (only if the resource does not exist yet); none → False; anything else is a
    400 (an ETag list there would ask "only if it is not at these versions", which no FHIR client means)."""
    if value is None or value == "":
        return False
    if value.strip() != "*":
        raise bad_request(f"If-None-Match '{value}' on a write: only '*' is understood (create, never replace)")
    return True


def _parse_entry(index: int, entry: Any) -> _Entry:
    if not isinstance(entry, dict):
        raise bad_request(f"entry {index} is not an object")
    request = entry.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("method"), str) or not isinstance(request.get("url"), str):
        raise bad_request(f"entry {index} has no request.method and request.url")
    method = request["method"].upper()
    if method not in _ORDER:
        raise bad_request(f"entry {index}: method {method} is not supported")
    url = request["url"].lstrip("/")
    split = urlsplit(url)
    path = split.path
    if path.startswith("fhir/"):
        path = path[5:]
    parts = [p for p in path.split("/") if p]
    if not parts or not is_resource_type(parts[0]):
        if method in ("GET", "HEAD"):
            return _Entry(index, method, url, "", None, split.query, None, entry.get("fullUrl"), None, None)
        raise bad_request(f"entry {index}: '{url}' does not name a resource type")
    return _Entry(
        index=index,
        method=method,
        url=url,
        resource_type=parts[0],
        resource_id=parts[1] if len(parts) > 1 else None,
        query=split.query,
        resource=entry.get("resource"),
        full_url=entry.get("fullUrl"),
        if_none_exist=request.get("ifNoneExist"),
        if_match=parse_if_match(request.get("ifMatch")),
        create_only=method == "PUT" and parse_if_none_match(request.get("ifNoneMatch")),
    )


def _response_entry(outcome: operations.Outcome, base_url: str) -> dict[str, Any]:
    response: dict[str, Any] = {"status": _status_text(outcome.status)}
    entry: dict[str, Any] = {"response": response}
    stored = outcome.stored
    if stored is not None:
        response["location"] = f"{stored.resource_type}/{stored.id}/_history/{stored.version}"
        response["etag"] = f'W/"{stored.version}"'
        response["lastModified"] = iso_instant(stored.last_updated)
        entry["fullUrl"] = f"{base_url}/{stored.resource_type}/{stored.id}"
        if stored.body is not None:
            entry["resource"] = orjson.Fragment(stored.body)
    return entry


_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content", 304: "304 Not Modified"}


def _status_text(status: int) -> str:
    return _STATUS_TEXT.get(status, str(status))


def _error_entry(err: Exception) -> dict[str, Any]:
    if isinstance(err, FhirError):
        return {"response": {"status": str(err.status), "outcome": err.outcome()}}
    if isinstance(err, StoreError):
        return {"response": {"status": str(err.status), "outcome": operation_outcome(str(err), code=err.code)}}
    log.exception("bundle entry failed")
    return {"response": {"status": "500", "outcome": operation_outcome("internal error while processing this entry", code="exception")}}


def _perform(tx: Session, entry: _Entry) -> operations.Outcome:
    if entry.method == "POST":
        if entry.resource_id is not None:
            raise bad_request(f"entry {entry.index}: POST goes to the type, not to {entry.url}")
        return operations.create(tx, entry.resource_type, entry.resource, if_none_exist=entry.if_none_exist)
    if entry.method == "PUT":
        if entry.resource_id is None:
            return operations.conditional_update(tx, entry.resource_type, entry.query, entry.resource, if_match=entry.if_match)
        return operations.update(tx, entry.resource_type, entry.resource_id, entry.resource, if_match=entry.if_match,
                                 create_only=entry.create_only)
    if entry.method == "DELETE":
        if entry.resource_id is None:
            return operations.conditional_delete(tx, entry.resource_type, entry.query)
        return operations.delete(tx, entry.resource_type, entry.resource_id, if_match=entry.if_match)
    if entry.method == "PATCH":
        if entry.resource_id is None:
            raise bad_request(f"entry {entry.index}: PATCH needs Type/id")
        ops = entry.resource
        if isinstance(ops, dict) and ops.get("resourceType") == "Binary" and isinstance(ops.get("data"), str):
            import base64

            ops = orjson.loads(base64.b64decode(ops["data"]))
        return operations.patch(tx, entry.resource_type, entry.resource_id, ops, if_match=entry.if_match)
    raise bad_request(f"entry {entry.index}: {entry.method} is not a write")


def _check_bundle(bundle: Any, kind: str) -> list[Any]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise bad_request("the body must be a Bundle")
    if bundle.get("type") != kind:
        raise bad_request(f"expected a {kind} Bundle")
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        raise bad_request("Bundle.entry must be an array")
    return entries


def process_batch(store: Store, bundle: Any, base_url: str, reader: Reader | None = None, origin: str | None = None,
                  guard: Guard | None = None) -> dict[str, Any]:
    """Each entry in its own transaction; one failing entry never fails the others."""
    entries = _check_bundle(bundle, "batch")
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(entries):
        try:
            entry = _parse_entry(i, raw)
            if entry.method in ("GET", "HEAD"):
                out.append(_read_entry(entry, reader))
                continue
            def run(tx: Session, entry: _Entry = entry) -> operations.Outcome:
                # a batch entry may name a conditional reference too; urn:uuid references across entries are not allowed
                tx.origin, tx.guard = origin, guard
                _resolve_references(tx, [entry], {})
                return _perform(tx, entry)

            out.append(_response_entry(store.write(run), base_url))
        except Exception as err:  # each entry answers for itself
            out.append(_error_entry(err))
    return {"resourceType": "Bundle", "type": "batch-response", "entry": out}


def _read_entry(entry: _Entry, reader: Reader | None) -> dict[str, Any]:
    if reader is None:
        raise bad_request("reads are not supported in this bundle")
    status, body = reader(entry.method, entry.url)
    result: dict[str, Any] = {"response": {"status": _status_text(status)}}
    if body is not None:
        if status >= 400:
            result["response"]["outcome"] = body
        else:
            result["resource"] = body
    return result


def process_transaction(store: Store, bundle: Any, base_url: str, reader: Reader | None = None,
                        origin: str | None = None, guard: Guard | None = None) -> dict[str, Any]:
    """All entries commit together or none does; urn:uuid and conditional references are resolved first."""
    raw_entries = _check_bundle(bundle, "transaction")
    entries = [_parse_entry(i, e) for i, e in enumerate(raw_entries)]
    results: dict[int, dict[str, Any]] = {}
    writes = sorted((e for e in entries if e.method not in ("GET", "HEAD")), key=lambda e: (_ORDER[e.method], e.index))

    def run(tx: Session) -> dict[int, dict[str, Any]]:
        tx.origin, tx.guard = origin, guard
        done: dict[int, dict[str, Any]] = {}
        deletes = [e for e in writes if e.method == "DELETE"]
        for entry in deletes:
            done[entry.index] = _run_in_transaction(tx, entry, base_url)
        # after the deletes, as the specification orders it: conditional creates search a store without them
        others = [e for e in writes if e.method != "DELETE"]
        _resolve_references(tx, others, _assign_ids(tx, others))
        for entry in others:
            done[entry.index] = _run_in_transaction(tx, entry, base_url)
        return done

    results.update(store.write(run))
    for entry in entries:
        if entry.method in ("GET", "HEAD"):
            results[entry.index] = _read_entry(entry, reader)
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": [results[i] for i in range(len(entries))]}


def _run_in_transaction(tx: Session, entry: _Entry, base_url: str) -> dict[str, Any]:
    try:
        # a POST's id was assigned in advance so that references to it could be rewritten
        preassigned = entry.method == "POST" and entry.resource_id is not None
        outcome = _create_with_id(tx, entry) if preassigned else _perform(tx, entry)
    except (FhirError, StoreError) as err:
        status = getattr(err, "status", 400)
        raise FhirError(status, f"transaction failed at entry {entry.index} ({entry.method} {entry.url}): {err}",
                        code=getattr(err, "code", "processing"), issues=getattr(err, "issues", None)) from err
    return _response_entry(outcome, base_url)


def _create_with_id(tx: Session, entry: _Entry) -> operations.Outcome:
    if entry.matched:
        return operations.Outcome(200, tx.read(entry.resource_type, entry.resource_id or ""))
    resource = entry.resource
    if isinstance(resource, dict):
        resource = {k: v for k, v in resource.items() if k != "id"}
    return operations.create(tx, entry.resource_type, resource, resource_id=entry.resource_id)


def _assign_ids(tx: Session, entries: list[_Entry]) -> dict[str, str]:
    """Give each POST its id now (or the id of the resource its If-None-Exist finds): fullUrl -> `Type/id`."""
    mapping: dict[str, str] = {}
    for entry in entries:
        if entry.method == "POST" and entry.resource_id is None:
            if entry.if_none_exist:
                tx.lock(f"{entry.resource_type}?{entry.if_none_exist}")
                found = operations.find(tx, entry.resource_type, entry.if_none_exist)
                if len(found) > 1:
                    raise FhirError(412, f"entry {entry.index}: If-None-Exist matches {len(found)} resources", code="multiple-matches")
                if found:
                    entry.resource_id = found[0]
                    entry.matched = True
            if entry.resource_id is None:
                entry.resource_id = str(uuid.uuid4())
            if entry.full_url:
                mapping[entry.full_url] = f"{entry.resource_type}/{entry.resource_id}"
        elif entry.method == "PUT" and entry.resource_id and entry.full_url and entry.full_url.startswith("urn:"):
            mapping[entry.full_url] = f"{entry.resource_type}/{entry.resource_id}"
    return mapping


def _resolve_references(tx: Session, entries: list[_Entry], mapping: dict[str, str]) -> None:
    """Rewrite references in one pass: `urn:uuid:…` fullUrls of the bundle through `mapping`, and
    conditional references (`Practitioner?identifier=…`) to the one resource they match (none or several is a 412)."""
    cache: dict[str, str] = {}

    def resolve(ref: str, index: int) -> str:
        if ref in cache:
            return cache[ref]
        rtype, _, query = ref.partition("?")
        ids = operations.find(tx, rtype, query)
        if len(ids) != 1:
            raise FhirError(412, f"entry {index}: the conditional reference '{ref}' matches {len(ids)} resources, not one",
                            code="not-found" if not ids else "multiple-matches")
        cache[ref] = f"{rtype}/{ids[0]}"
        return cache[ref]

    def walk(node: Any, index: int) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "reference" and isinstance(value, str):
                    if value in mapping:
                        out[key] = mapping[value]
                    elif "?" in value and is_resource_type(value.split("?", 1)[0]):
                        out[key] = resolve(value, index)
                    else:
                        out[key] = value
                else:
                    out[key] = walk(value, index)
            return out
        if isinstance(node, list):
            return [walk(v, index) for v in node]
        return node

    for entry in entries:
        if isinstance(entry.resource, dict):
            entry.resource = walk(entry.resource, entry.index)
