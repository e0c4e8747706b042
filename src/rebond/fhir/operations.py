"""The FHIR write interactions over a store transaction, shared by the REST routes and Bundles."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import jsonpatch
import orjson

from rebond.fhir.errors import FhirError, bad_request
from rebond.fhir.model import ID_PATTERN, is_resource_type, validate
from rebond.fhir.search import SearchError, parse_search
from rebond.store.base import MultipleMatches, NotFound, Session, Stored


@dataclass(frozen=True)
class Outcome:
    """What an interaction did: the HTTP status and the version it produced or found."""

    status: int
    stored: Stored | None = None
    message: str = ""


def check_type(resource_type: str) -> None:
    if not is_resource_type(resource_type):
        raise FhirError(400 if resource_type[:1].isupper() else 404, f"unknown resource type '{resource_type}'", code="not-supported")


def check_id(resource_id: str) -> None:
    if not ID_PATTERN.match(resource_id):
        raise bad_request(f"'{resource_id}' is not a valid id (1 to 64 letters, digits, '-' or '.')")


def parse_body(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise bad_request(f"the body is not valid JSON: {err}", code="structure") from err


def check_resource(resource: Any, resource_type: str, resource_id: str | None = None) -> dict[str, Any]:
    """400 for the wrong type or id, 422 with every structural problem for an invalid resource."""
    if not isinstance(resource, dict):
        raise bad_request("the body must be a JSON object holding a resource", code="structure")
    actual = resource.get("resourceType")
    if actual != resource_type:
        raise bad_request(f"the body holds a {actual!r} where the URL says {resource_type}")
    if resource_id is not None:
        body_id = resource.get("id")
        if body_id is None:
            raise bad_request(f"an update must carry the id in the body ({resource_id})")
        if body_id != resource_id:
            raise bad_request(f"the body's id '{body_id}' does not match the URL's '{resource_id}'")
    issues = validate(resource)
    if issues:
        raise FhirError(422, f"{len(issues)} structural problem(s) in the {resource_type}", code="structure", issues=issues)
    return resource


def _criteria(resource_type: str, query: str) -> list[tuple[str, str]]:
    params = parse_qsl(query, keep_blank_values=True)
    if not params:
        raise bad_request("a conditional interaction needs search criteria")
    return params


def find(tx: Session, resource_type: str, query: str) -> list[str]:
    """Ids matching conditional criteria, inside the transaction."""
    try:
        parsed = parse_search(resource_type, _criteria(resource_type, query))
    except SearchError as err:
        raise bad_request("; ".join(err.problems)) from err
    return tx.search_ids(parsed)


def create(tx: Session, resource_type: str, resource: Any, *, if_none_exist: str | None = None, resource_id: str | None = None) -> Outcome:
    res = check_resource(resource, resource_type)
    if if_none_exist:
        tx.lock(f"{resource_type}?{if_none_exist}")  # two concurrent conditional creates: the second waits, then finds
        ids = find(tx, resource_type, if_none_exist)
        if len(ids) > 1:
            raise MultipleMatches(f"If-None-Exist '{if_none_exist}' matches {len(ids)} {resource_type} resources")
        if ids:
            return Outcome(200, tx.read(resource_type, ids[0]), "a matching resource already exists")
    result = tx.create(res, resource_id=resource_id)
    return Outcome(201, result.stored)


def update(tx: Session, resource_type: str, resource_id: str, resource: Any, *, if_match: int | None = None,
           create_only: bool = False) -> Outcome:
    """`create_only` (If-None-Match: *): a 412 if the resource exists, even with the same content: a site node's
    replayed create is never applied over a version written since (site/replay.py)."""
    check_id(resource_id)
    res = check_resource(resource, resource_type, resource_id)
    if create_only:
        if if_match is not None:
            raise bad_request("If-Match and If-None-Match: * contradict each other: a version to replace, and none")
        return Outcome(201, tx.create(res, resource_id=resource_id).stored)
    result = tx.update(resource_type, resource_id, res, if_match=if_match)
    return Outcome(201 if result.created else 200, result.stored)


def conditional_update(tx: Session, resource_type: str, query: str, resource: Any, *, if_match: int | None = None) -> Outcome:
    tx.lock(f"{resource_type}?{query}")
    ids = find(tx, resource_type, query)
    if len(ids) > 1:
        raise MultipleMatches(f"the criteria '{query}' match {len(ids)} {resource_type} resources")
    if not isinstance(resource, dict):
        raise bad_request("the body must be a JSON object holding a resource", code="structure")
    if ids:
        if resource.get("id") not in (None, ids[0]):
            raise bad_request(f"the body's id '{resource.get('id')}' is not the matching resource's '{ids[0]}'")
        return update(tx, resource_type, ids[0], {**resource, "id": ids[0]}, if_match=if_match)
    rid = resource.get("id")
    if rid is not None:
        return update(tx, resource_type, rid, resource, if_match=if_match)
    return create(tx, resource_type, resource)


def delete(tx: Session, resource_type: str, resource_id: str, *, if_match: int | None = None) -> Outcome:
    check_id(resource_id)
    result = tx.delete(resource_type, resource_id, if_match=if_match)
    if result is None:
        return Outcome(204, None, "nothing to delete")
    return Outcome(200, result.stored)


def conditional_delete(tx: Session, resource_type: str, query: str) -> Outcome:
    ids = find(tx, resource_type, query)
    if len(ids) > 1:
        raise MultipleMatches(f"the criteria '{query}' match {len(ids)} {resource_type} resources; delete them one by one")
    if not ids:
        return Outcome(204, None, "nothing matched")
    return delete(tx, resource_type, ids[0])


def patch(tx: Session, resource_type: str, resource_id: str, operations: Any, *, if_match: int | None = None) -> Outcome:
    """JSON Patch (RFC 6902) applied to the current version, in the same transaction as the write."""
    check_id(resource_id)
    current = tx.read(resource_type, resource_id)
    if current is None:
        raise NotFound(f"{resource_type}/{resource_id} does not exist")
    if current.deleted or current.body is None:
        raise FhirError(410, f"{resource_type}/{resource_id} was deleted", code="deleted")
    if not isinstance(operations, list):
        raise bad_request("a JSON Patch body is an array of operations")
    try:
        patched = jsonpatch.apply_patch(orjson.loads(current.body), operations)
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError) as err:
        raise FhirError(422, f"the patch cannot be applied: {err}", code="processing") from err
    if patched.get("id") != resource_id or patched.get("resourceType") != resource_type:
        raise FhirError(422, "a patch may not change the resource's type or id")
    return update(tx, resource_type, resource_id, patched, if_match=if_match if if_match is not None else current.version)
