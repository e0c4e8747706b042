"""`rebond import`: load FHIR Bundles and NDJSON files into a store or a running server.

Re-importing the same files creates no duplicates: a POST entry whose resource
carries its own id under a `urn:uuid:` fullUrl (as Synthea and bulk exports write
them) is loaded as a PUT to that id, and an update that changes nothing makes no
new version.
"""
from __future__ import annotations

import bz2
import gzip
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson

from rebond.fhir.bundles import process_batch, process_transaction
from rebond.fhir.errors import FhirError
from rebond.store.base import Store, StoreError

NDJSON_CHUNK = 500
SUFFIXES = (".json", ".json.bz2", ".json.gz", ".ndjson", ".ndjson.bz2", ".ndjson.gz")


@dataclass
class FileReport:
    path: str
    loaded: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)

    def fail(self, count: int, reason: str) -> None:
        self.failed += count
        if len(self.reasons) < 20:
            self.reasons.append(reason)


class Target(Protocol):
    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]: ...
    def batch(self, bundle: dict[str, Any]) -> dict[str, Any]: ...


class StoreTarget:
    """Straight into a store, through the same Bundle processing as the REST API."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        return process_transaction(self.store, bundle, "urn:rebond:import")

    def batch(self, bundle: dict[str, Any]) -> dict[str, Any]:
        return process_batch(self.store, bundle, "urn:rebond:import")


class ServerTarget:
    """Through a running server's FHIR API."""

    def __init__(self, base_url: str, token: str = "", timeout: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)

    def _post(self, bundle: dict[str, Any]) -> dict[str, Any]:
        resp = self.client.post("", content=orjson.dumps(bundle), headers={"Content-Type": "application/fhir+json"})
        body = resp.json() if resp.content else {}
        if resp.status_code >= 400:
            raise FhirError(resp.status_code, _outcome_text(body) or f"HTTP {resp.status_code}")
        return body

    transaction = _post
    batch = _post


def _outcome_text(outcome: Any) -> str:
    if isinstance(outcome, dict):
        return "; ".join(str(i.get("diagnostics", "")) for i in outcome.get("issue", []) if isinstance(i, dict))
    return ""


def expand(paths: list[str]) -> list[Path]:
    """Files named, and the importable files of folders named (sorted, so `0-*` batches come first)."""
    out: list[Path] = []
    for name in paths:
        p = Path(name)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.name.endswith(SUFFIXES)))
        else:
            out.append(p)
    return out


def read_text(path: Path) -> bytes:
    if path.name.endswith(".bz2"):
        return bz2.decompress(path.read_bytes())
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    return path.read_bytes()


def idempotent_entries(bundle: dict[str, Any]) -> dict[str, Any]:
    """POSTs of resources that carry their own id become PUTs to it, so loading twice creates nothing twice."""
    for entry in bundle.get("entry", []) or []:
        if not isinstance(entry, dict):
            continue
        req = entry.get("request")
        res = entry.get("resource")
        if not isinstance(req, dict) or not isinstance(res, dict) or req.get("method") != "POST" or req.get("ifNoneExist"):
            continue
        rid = res.get("id")
        if isinstance(rid, str) and rid and isinstance(res.get("resourceType"), str):
            entry["request"] = {"method": "PUT", "url": f"{res['resourceType']}/{rid}"}
    return bundle


def _ndjson_chunks(data: bytes, report: FileReport) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            resource = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            report.fail(1, f"line {number}: not JSON ({err})")
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            report.fail(1, f"line {number}: not a resource")
            continue
        chunk.append(resource)
        if len(chunk) >= NDJSON_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _entry_for(resource: dict[str, Any]) -> dict[str, Any]:
    rid = resource.get("id")
    if isinstance(rid, str) and rid:
        return {"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{rid}"}}
    return {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}


def _count_batch(response: dict[str, Any], report: FileReport) -> None:
    for i, entry in enumerate(response.get("entry", [])):
        status = str(entry.get("response", {}).get("status", ""))
        if status[:1] == "2":
            report.loaded += 1
        else:
            report.fail(1, f"entry {i}: {status} {_outcome_text(entry.get('response', {}).get('outcome'))}")


@dataclass
class ParsedFile:
    """A file read and parsed, ready to load: its report so far and what to send."""

    report: FileReport
    kind: str = "none"  # transaction, batch, ndjson, or none when nothing is left to load
    bundle: dict[str, Any] | None = None
    ndjson: bytes = b""


def parse_file(path: Path) -> ParsedFile:
    report = FileReport(str(path))
    try:
        data = read_text(path)
    except OSError as err:
        report.fail(1, f"cannot read: {err}")
        return ParsedFile(report)
    if ".ndjson" in path.name:
        return ParsedFile(report, "ndjson", ndjson=data)
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        report.fail(1, f"not JSON: {err}")
        return ParsedFile(report)
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
        if isinstance(document, dict) and isinstance(document.get("resourceType"), str):
            return ParsedFile(report, "batch", {"resourceType": "Bundle", "type": "batch", "entry": [_entry_for(document)]})
        report.fail(1, "not a FHIR resource or Bundle")
        return ParsedFile(report)
    kind = document.get("type")
    if kind == "collection":
        entries = [_entry_for(e["resource"]) for e in document.get("entry", []) if isinstance(e, dict) and "resource" in e]
        return ParsedFile(report, "batch", {"resourceType": "Bundle", "type": "batch", "entry": entries})
    if kind in ("transaction", "batch"):
        return ParsedFile(report, str(kind), idempotent_entries(document))
    report.fail(len(document.get("entry", []) or []), f"a Bundle of type '{kind}' cannot be imported")
    return ParsedFile(report)


def load_parsed(parsed: ParsedFile, target: Target) -> FileReport:
    report = parsed.report
    if parsed.kind == "ndjson":
        for chunk in _ndjson_chunks(parsed.ndjson, report):
            _count_batch(target.batch({"resourceType": "Bundle", "type": "batch", "entry": [_entry_for(r) for r in chunk]}), report)
    elif parsed.kind == "transaction" and parsed.bundle is not None:
        entries = len(parsed.bundle.get("entry", []) or [])
        try:
            target.transaction(parsed.bundle)
            report.loaded += entries
        except (FhirError, StoreError) as err:
            report.fail(entries, f"transaction rolled back: {err}")
    elif parsed.kind == "batch" and parsed.bundle is not None:
        _count_batch(target.batch(parsed.bundle), report)
    return report


def import_file(path: Path, target: Target) -> FileReport:
    return load_parsed(parse_file(path), target)


def import_files(paths: list[Path], target: Target, *, jobs: int = 1,
                 on_done: Callable[[FileReport], None] | None = None) -> list[FileReport]:
    """Load files in order. With jobs > 1, consecutive transaction Bundles load side by side;
    any other file (a batch, NDJSON) waits for them and loads alone, so what it creates is
    there before the files after it, as the order of the command line says."""
    reports: list[FileReport | None] = [None] * len(paths)

    def finish(i: int, report: FileReport) -> None:
        reports[i] = report
        if on_done is not None:
            on_done(report)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        pending: list[tuple[int, Future[FileReport]]] = []

        def drain() -> None:
            for i, fut in pending:
                finish(i, fut.result())
            pending.clear()

        for i, path in enumerate(paths):
            parsed = parse_file(path)
            if jobs > 1 and parsed.kind == "transaction":
                pending.append((i, pool.submit(load_parsed, parsed, target)))
                if len(pending) >= jobs * 2:
                    i0, fut = pending.pop(0)
                    finish(i0, fut.result())
                continue
            drain()
            finish(i, load_parsed(parsed, target))
        drain()
    return [r for r in reports if r is not None]
