"""The search parameters Rebond supports, read from the FHIR R4 specification's definitions."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from importlib import resources as package_files
from typing import Any

from rebond.fhir.model import RESOURCE_TYPES
from rebond.fhir.paths import Extractor

#: Parameter types the store indexes and searches.
INDEXED_TYPES = frozenset({"string", "token", "date", "reference", "number", "quantity", "uri", "composite"})

#: Composites on the whole resource whose two components each select exactly what a parameter of the resource selects,
#: so that the resource's rows of those two parameters answer them: an Observation's `code-value-quantity=A$B` is an
#: Observation with a `code` row matching A and a `value-quantity` row matching B. Each pair a composite row would
#: hold is one of those rows with one of these (the components are the resource's code and its one value), so the
#: same resources match; the second part gets its whole syntax (`$gt5.4|http://unitsofmeasure.org|mmol/L`); and a
#: lab result writes five index rows fewer a panel (B-tree inserts and WAL pages; docs/benchmarks.md, stop 29).
#: Not `code-value-string`: `value-string` also selects the text of a valueCodeableConcept. (`value-quantity` also
#: selects a valueSampledData, which makes no quantity row.) tests/test_search.py checks, over Synthea's
#: Observations, that the rows of the composite as it was indexed are the pairs of the two parameters' rows.
JOINED_COMPOSITES = frozenset({"Observation.code-value-quantity", "Observation.code-value-concept", "Observation.code-value-date"})


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
    #: the keys of the parameters whose rows answer this one, when it selects nothing they do not (see `_aliases`)
    stored_as: tuple[str, ...] = ()
    #: and, for `patient` answered by `subject`, the one type of target it keeps
    target_type: str = ""
    #: a composite answered by the rows of the parameters of its two components, on the same resource (JOINED_COMPOSITES):
    #: their codes
    joined: tuple[str, ...] = ()

    @functools.cached_property
    def key(self) -> str:
        """The name this parameter's index rows carry: `Observation.code` (asked some 65 times a lab panel's draft)."""
        return f"{self.resource_type}.{self.code}"

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        """Sent to another process by name: the definitions (and compiled paths) are the same there."""
        return _named, (self.resource_type, self.code)

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys a search on this parameter reads."""
        return self.stored_as or (self.key,)

    @property
    def aliased(self) -> tuple[SearchParam, ...]:
        """The parameters whose rows an alias reads (`stored_as`): of the same resource type."""
        return tuple(_named(self.resource_type, key.split(".", 1)[1]) for key in self.stored_as)

    @property
    def joined_params(self) -> tuple[SearchParam, ...]:
        """The two parameters whose rows answer a joined composite (`joined`; `registry()` checked they exist)."""
        return tuple(_named(self.resource_type, code) for code in self.joined)

    @property
    def indexed(self) -> bool:
        """Whether writes make rows for this parameter (an alias reads another's rows, a joined composite two others')."""
        return not self.stored_as and not self.joined


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
    for params in out.values():
        found = {code: a for code, param in params.items() if (a := _aliases(param, params)) is not None}
        by_key = {p.key: code for code, p in params.items()}
        for code, (keys, target_type) in found.items():
            if any(by_key[k] in found for k in keys):
                continue  # an alias of an alias: keep it indexed rather than chase the chain
            params[code] = replace(params[code], stored_as=keys, target_type=target_type)
        for code, param in list(params.items()):
            if param.key in JOINED_COMPOSITES:
                params[code] = replace(param, joined=_joined(param, params))
    return out


def _joined(param: SearchParam, params: dict[str, SearchParam]) -> tuple[str, ...]:
    """The codes of the parameters of a composite's components, as JOINED_COMPOSITES answers it by their rows; checked
    against what it says: a composite on the whole resource, each component a parameter of the resource of its type."""
    codes = tuple(component_param(url, param.resource_type)[1] for url, _expression in param.components)
    if param.expression != param.resource_type or len(codes) != 2 or any(
            c not in params or params[c].type != component_param(url, param.resource_type)[0]
            for c, (url, _e) in zip(codes, param.components, strict=True)):
        raise ValueError(f"{param.key} cannot be answered by its components' rows")
    return codes


def _branches(param: SearchParam) -> frozenset[str]:
    """What a parameter selects: the branches of its expression for its type (components included for composites)."""
    texts = param.extractor.branch_texts() if param.extractor is not None else ()
    return frozenset(texts + tuple(f"{{{component_param(url, param.resource_type)[0]} {expr}}}" for url, expr in param.components))


def _aliases(param: SearchParam, params: dict[str, SearchParam]) -> tuple[tuple[str, ...], str] | None:
    """Other parameters of the same type whose rows, together, are exactly this one's rows.

    `Observation.combo-code` selects `Observation.code | Observation.component.code`: the rows
    of `code` and `component-code` answer it, and indexing it again would write every code of
    every Observation twice. `Observation.patient` selects `Observation.subject.where(resolve()
    is Patient)`: the `subject` rows whose target is a Patient. Such a parameter is not indexed;
    a search on it reads the other keys. Nothing else changes: the same resources match.
    """
    mine = _branches(param)
    if not mine or param.extractor is None or not param.extractor.compiled:
        return None
    restricted = {b.split(".where(resolve() is ", 1)[0]: b for b in mine if b.endswith(")") and ".where(resolve() is " in b}
    if restricted and len(restricted) == len(mine) and param.type == "reference":
        types = {b.rsplit(" ", 1)[-1].rstrip(")") for b in mine}
        if len(types) == 1:
            plain = frozenset(restricted)
            for other in params.values():
                if other is not param and other.type == "reference" and _branches(other) == plain and other.extractor.compiled:
                    return (other.key,), types.pop()
        return None
    parts: list[SearchParam] = []
    covered: set[str] = set()
    for other in params.values():
        if other is param or other.type != param.type or not other.extractor.compiled:
            continue
        theirs = _branches(other)
        if theirs and theirs < mine or (theirs == mine and other.code < param.code):
            parts.append(other)
            covered |= theirs
    if parts and covered == mine:
        return tuple(p.key for p in sorted(parts, key=lambda p: p.code)), ""
    return None


@functools.cache
def component_param(url: str, resource_type: str) -> tuple[str, str]:
    """(type, code) of the parameter a composite component refers to."""
    for definition in _definitions():
        if definition.get("url") == url:
            return str(definition["type"]), str(definition["code"])
    raise KeyError(url)


def _named(resource_type: str, code: str) -> SearchParam:
    return registry()[resource_type][code]


def lookup(resource_type: str, code: str) -> SearchParam | None:
    return registry().get(resource_type, {}).get(code)
