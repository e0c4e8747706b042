"""Where packs are kept: one folder per ward, the last few packs in each, every file written atomically.

    DIR/<ward id>/<YYYYmmddTHHMMSSZ>-<digest>.pdf   the pack
    DIR/<ward id>/<YYYYmmddTHHMMSSZ>-<digest>.json  what /downtime lists, and the facts the next pack compares with

A file is written under a hidden temporary name, flushed to disk, then renamed over its final
name, so a reader (a nurse printing, a copy to a USB key) never gets half a file; the PDF lands
before its .json, so a listed pack always has its whole PDF.
"""
from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from rebond.clinical.wards import group_wards
from rebond.downtime.pack import Pack, Source, ward_pack
from rebond.downtime.render import render_pdf
from rebond.durable import write_atomically
from rebond.store.base import Store
from rebond.web.i18n import Translator

log = logging.getLogger("rebond.downtime")
_NAME = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{12}$")
_WARD = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_PAGE = re.compile(rb"/Type\s*/Page\b(?!s)")


def page_count(pdf: bytes) -> int:
    return len(_PAGE.findall(pdf))


@dataclass(frozen=True)
class KeptPack:
    ward_id: str
    name: str  # file name without extension
    ward: str
    hospital: str
    as_of: dt.datetime
    digest: str
    size: int
    pages: int
    changes: dict[str, list[str]] | None

    @property
    def filename(self) -> str:
        return f"{self.name}.pdf"


def save_pack(pdf_path: Path, pack: Pack, pdf: bytes) -> dict[str, Any]:
    """The PDF, then beside it the JSON that describes it and carries its facts; returns that JSON."""
    meta = {"ward_id": pack.ward.id, "ward": pack.ward.name, "hospital": pack.ward.hospital, "as_of": pack.as_of.isoformat(),
            "digest": pack.digest, "size": len(pdf), "pages": page_count(pdf),
            "changes": pack.data["changes"], "facts": pack.facts}
    write_atomically(pdf_path, pdf)
    write_atomically(pdf_path.with_suffix(".json"), orjson.dumps(meta))
    return meta


def read_facts(pdf_path: Path) -> dict[str, Any] | None:
    """The facts of the pack written at `pdf_path`, if there is one (for "what changed")."""
    try:
        meta = orjson.loads(pdf_path.with_suffix(".json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    facts = meta.get("facts")
    return facts if isinstance(facts, dict) else None


class PackLibrary:
    def __init__(self, root: Path, keep: int = 6) -> None:
        self.root = root
        self.keep = max(1, keep)

    def _folder(self, ward_id: str) -> Path:
        if not _WARD.match(ward_id):
            raise ValueError(f"'{ward_id}' is not a ward id")
        return self.root / ward_id

    def packs(self, ward_id: str) -> list[KeptPack]:
        """The ward's kept packs, newest first."""
        folder = self._folder(ward_id)
        out = []
        for meta_path in sorted(folder.glob("*.json"), reverse=True) if folder.is_dir() else ():
            if not _NAME.match(meta_path.stem) or not meta_path.with_suffix(".pdf").exists():
                continue
            try:
                meta = orjson.loads(meta_path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            out.append(KeptPack(ward_id, meta_path.stem, str(meta.get("ward", "")), str(meta.get("hospital", "")),
                                dt.datetime.fromisoformat(meta["as_of"]), str(meta.get("digest", "")), int(meta.get("size", 0)),
                                int(meta.get("pages", 0)), meta.get("changes")))
        return out

    def latest(self) -> list[KeptPack]:
        """The newest pack of every ward that has one."""
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and _WARD.match(p.name)):
            packs = self.packs(folder.name)
            if packs:
                found.append(packs[0])
        return found

    def pdf_path(self, ward_id: str, name: str) -> Path | None:
        """The file of a kept pack, or None (names are checked: nothing outside the library is ever served)."""
        if not _NAME.match(name) or not _WARD.match(ward_id):
            return None
        path = self._folder(ward_id) / f"{name}.pdf"
        return path if path.exists() else None

    def add(self, pack: Pack, pdf: bytes) -> Path:
        folder = self._folder(pack.ward.id)
        name = f"{pack.as_of.astimezone(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}-{pack.digest}"
        path = folder / f"{name}.pdf"
        save_pack(path, pack, pdf)
        for old in self.packs(pack.ward.id)[self.keep:]:
            for suffix in (".json", ".pdf"):  # the listing first, so it never names a missing PDF
                (folder / f"{old.name}{suffix}").unlink(missing_ok=True)
        return path

    def previous_facts(self, ward_id: str) -> dict[str, Any] | None:
        packs = self.packs(ward_id)
        return read_facts(self._folder(ward_id) / packs[0].filename) if packs else None


def ward_ids(store: Store) -> list[str]:
    return [ward.id for hospital in group_wards(store, count_inpatients=False) for ward, _count in hospital.wards]


def regenerate(store: Store, library: PackLibrary, source: Source, t: Translator, now: dt.datetime | None = None) -> tuple[int, int]:
    """A fresh pack for every ward of the group; returns (written, failed). One ward failing does not stop the others."""
    written = failed = 0
    for ward_id in ward_ids(store):
        moment = now or dt.datetime.now(dt.UTC)
        try:
            pack = ward_pack(store, ward_id, moment, t, source, previous=library.previous_facts(ward_id))
            library.add(pack, render_pdf(pack.data))
            written += 1
        except Exception:
            failed += 1
            log.exception("the downtime pack of ward %s could not be made", ward_id)
    return written, failed
