"""The search parameters Rebond supports, read from the FHIR R4 specification's definitions."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources as package_files

from rebond.fhir.model import RESOURCE_TYPES
from rebond.fhir.paths import Extractor

#: Parameter types the store indexes and searches.
INDEXED_TYPES = frozenset({"string", "token", "date", "reference", "number", "quantity", "uri", "composite"})


@dataclass(frozen=True)
class SearchParam:
    resource_type: str
    code: str
    type: str
    expression: str
    targets: tuple[str, ...] = ()
    components: tuple[tuple[str, str], ...] = ()  # (definition url, relative expression)
    url: str = ""
    extractor: Extractor = field(compare=False, hash=False, repr=False, default=None)  # type: ignore[assignment]

    @property
    def key(self) -> str:
        """The name this parameter's index rows carry: `Observation.code`."""
        return f"{self.resource_type}.{self.code}"


@functools.cache
def _definitions() -> list[dict[str, object]]:
    text = package_files.files("rebond.fhir").joinpath("definitions/search-parameters.json").read_text()
    return json.loads(text)  # type: ignore[no-any-return]


@functools.cache
def registry() -> dict[str, dict[str, SearchParam]]:
    """`registry()[resource_type][code]`: every supported parameter, by type."""
    by_url: dict[str, dict[str, object]] = {str(d.get("url")): d for d in _definitions()}
    out: dict[str, dict[str, SearchParam]] = {t: {} for t in RESOURCE_TYPES}
    for definition in _definitions():
        ptype = str(definition["type"])
        if ptype not in INDEXED_TYPES:
            continue
        code = str(definition["code"])
        expression = str(definition.get("expression") or "")
        bases = [str(b) for b in definition.get("base", [])]  # type: ignore[attr-defined]
        if bases in (["Resource"], ["DomainResource"]):
            bases = list(RESOURCE_TYPES)
        components: tuple[tuple[str, str], ...] = ()
        if ptype == "composite":
            parts: list[tuple[str, str]] = []
            for comp in definition.get("component", []):  # type: ignore[attr-defined]
                target = by_url.get(comp["definition"])
                if target is None or target.get("type") not in ("token", "quantity", "date", "string", "number", "uri", "reference"):
                    parts = []
                    break
                parts.append((str(comp["definition"]), str(comp["expression"])))
            if len(parts) != 2:
                continue
            components = tuple(parts)
        for base in bases:
            if base not in out or not expression:
                continue
            extractor = Extractor(expression, base)
            if not extractor.applies:
                continue
            out[base][code] = SearchParam(
                resource_type=base,
                code=code,
                type=ptype,
                expression=expression,
                targets=tuple(str(t) for t in definition.get("target", [])),  # type: ignore[attr-defined]
                components=components,
                url=str(definition.get("url", "")),
                extractor=extractor,
            )
    return out


@functools.cache
def component_param(url: str, resource_type: str) -> tuple[str, str]:
    """(type, code) of the parameter a composite component refers to."""
    for definition in _definitions():
        if definition.get("url") == url:
            return str(definition["type"]), str(definition["code"])
    raise KeyError(url)


def lookup(resource_type: str, code: str) -> SearchParam | None:
    return registry().get(resource_type, {}).get(code)
