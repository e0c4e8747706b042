"""Evaluate the FHIRPath expressions of search-parameter definitions against JSON resources.

The specification's search parameters use a small part of FHIRPath: element paths,
unions (`|`), type casts (`as T`, `.as(T)`, `.ofType(T)`), and the filters
`.where(resolve() is T)` and `.where(field='value')`. Those are compiled once into
plain Python steps, because indexing runs on every write and a general FHIRPath
interpreter is two orders of magnitude slower. Any expression outside that subset
is handed to fhirpathpy, so every definition still evaluates.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Node = Any
Step = Callable[[list[Node]], list[Node]]

_CAST_PAREN = re.compile(r"^\((?P<inner>[^()]+?) as (?P<type>\w+)\)(?P<rest>(\.\w+)*)$")
_WHERE_RESOLVE = re.compile(r"^where\(resolve\(\) is (?P<type>\w+)\)$")
_WHERE_EQ = re.compile(r"^where\((?P<field>\w+) ?= ?'(?P<value>[^']*)'\)$")
_FUNC_CAST = re.compile(r"^(as|ofType)\((?P<type>\w+)\)$")
_NAME = re.compile(r"^\w+$")


def split_top_level(text: str, sep: str) -> list[str]:
    """Split on `sep` where it is not inside parentheses or quotes."""
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    for i, ch in enumerate(text):
        if ch == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


@functools.cache
def _choice_names() -> frozenset[str]:
    """Names of every choice element (`value` of value[x], `effective`, `onset`, …) in R4."""
    from rebond.fhir.model import choice_element_names

    return choice_element_names()


def _element_name(name: str, type_suffix: str | None) -> str:
    """The JSON key of an element read as one type: `value` as Quantity is `valueQuantity`."""
    return name + type_suffix[0].upper() + type_suffix[1:] if type_suffix else name


def _children(nodes: list[Node], name: str, choice: bool) -> list[Node]:
    """The values of element `name` in each node; `choice`: a value[x] element, found as valueQuantity, valueString, ..."""
    out: list[Node] = []
    for node in nodes:
        if not isinstance(node, dict):
            continue
        value = node.get(name)
        if value is None and choice:
            for key, candidate in node.items():
                if key.startswith(name) and len(key) > len(name) and key[len(name)].isupper():
                    value = candidate
                    break
        if value is None:
            continue
        if isinstance(value, list):
            out.extend(value)
        else:
            out.append(value)
    return out


def _field_step(name: str, type_suffix: str | None) -> Step:
    key = _element_name(name, type_suffix)  # read as one type: that key only
    choice = type_suffix is None and name in _choice_names()
    return lambda nodes: _children(nodes, key, choice)


def _reference_type_step(type_name: str) -> Step:
    needle = type_name + "/"

    def keep(nodes: list[Node]) -> list[Node]:
        out = []
        for node in nodes:
            ref = node.get("reference") if isinstance(node, dict) else None
            if isinstance(ref, str) and (ref.startswith(needle) or ("/" + needle) in ref):
                out.append(node)
        return out

    return keep


def _field_equals_step(field: str, value: str) -> Step:
    return lambda nodes: [n for n in nodes if isinstance(n, dict) and n.get(field) == value]


@dataclass(frozen=True)
class CompiledPath:
    """One branch of a union: the resource type it applies to and its steps."""

    resource_type: str
    steps: tuple[Step, ...]
    text: str = ""  # the branch as written: parameters sharing a branch share its evaluation
    #: the element its first step reads (`valueQuantity`, or `value` for any value[x]); None: it reads no element first
    first: str | None = None

    def evaluate(self, resource: dict[str, Any]) -> list[Node]:
        nodes: list[Node] = [resource]
        for step in self.steps:
            nodes = step(nodes)
            if not nodes:
                break
        return nodes


def _compile_branch(branch: str) -> CompiledPath | None:
    cast_type: str | None = None
    rest = ""
    match = _CAST_PAREN.match(branch)
    if match:
        branch, cast_type, rest = match["inner"].strip(), match["type"], match["rest"]
    segments = split_top_level(branch, ".")
    segments_rest = rest.lstrip(".").split(".") if rest else []
    if not segments or not _NAME.match(segments[0]):
        return None
    root = segments[0]
    raw: list[tuple[str, str]] = []
    for seg in segments[1:]:
        if _NAME.match(seg):
            raw.append(("field", seg))
        elif m := _FUNC_CAST.match(seg):
            raw.append(("cast", m["type"]))
        elif m := _WHERE_RESOLVE.match(seg):
            raw.append(("resolve", m["type"]))
        elif m := _WHERE_EQ.match(seg):
            raw.append(("eq", m["field"] + "\0" + m["value"]))
        else:
            return None
    if cast_type is not None:
        raw.append(("cast", cast_type))
    raw.extend(("field", seg) for seg in segments_rest)
    steps: list[Step] = []
    first = None
    i = 0
    while i < len(raw):
        kind, arg = raw[i]
        if kind == "field":
            suffix = raw[i + 1][1] if i + 1 < len(raw) and raw[i + 1][0] == "cast" else None
            if not steps:
                first = _element_name(arg, suffix)
            steps.append(_field_step(arg, suffix))
            i += 2 if suffix else 1
            continue
        if kind == "resolve":
            steps.append(_reference_type_step(arg))
        elif kind == "eq":
            field, value = arg.split("\0", 1)
            steps.append(_field_equals_step(field, value))
        else:  # a cast not following a field: only possible on the root, keep as is
            return None
        i += 1
    return CompiledPath(root, tuple(steps), branch if cast_type is None else f"({branch} as {cast_type}){rest}", first)


class Extractor:
    """Values an expression selects in a resource of one type."""

    def __init__(self, expression: str, resource_type: str) -> None:
        self.expression = expression
        self.resource_type = resource_type
        self._paths: list[CompiledPath] = []
        self._fallback: str | None = None
        branches = split_top_level(expression, "|")
        compiled = [_compile_branch(b) for b in branches]
        if all(c is not None for c in compiled):
            self._paths = [
                c for c in compiled if c is not None and c.resource_type in (resource_type, "Resource", "DomainResource")
            ]
        else:
            kept = [b for b in branches if b.split(".", 1)[0].lstrip("(") in (resource_type, "Resource", "DomainResource")]
            self._fallback = " | ".join(kept) if kept else None

    @property
    def applies(self) -> bool:
        return bool(self._paths) or self._fallback is not None

    @property
    def compiled(self) -> bool:
        """Whether every branch runs as compiled steps (not handed to fhirpathpy)."""
        return self._fallback is None and bool(self._paths)

    def first_elements(self) -> frozenset[str] | None:
        """The top-level elements at least one of which a resource must have for this to select anything; None: unknown."""
        if self._fallback is not None or any(p.first is None for p in self._paths):
            return None
        return frozenset(p.first for p in self._paths if p.first is not None)

    def branch_texts(self) -> tuple[str, ...]:
        """The branches that apply to this type, as written in the definition."""
        return tuple(sorted(p.text for p in self._paths))

    def values(self, resource: dict[str, Any], memo: dict[str, list[Node]] | None = None) -> Iterable[Node]:
        """The selected values; `memo` (one per resource) spares re-walking a branch another parameter walked."""
        if self._fallback is not None:
            return _fhirpath(resource, self._fallback)
        out: list[Node] = []
        for path in self._paths:
            if memo is None:
                out.extend(path.evaluate(resource))
                continue
            found = memo.get(path.text)
            if found is None:
                found = memo[path.text] = path.evaluate(resource)
            out.extend(found)
        return out


@functools.cache
def _compiled(expression: str) -> Callable[..., Any]:
    import fhirpathpy
    from fhirpathpy.models import models

    return fhirpathpy.compile(expression, models["r4"])


def _fhirpath(resource: dict[str, Any], expression: str) -> list[Node]:
    try:
        result = _compiled(expression)(resource)
    except Exception:  # an expression fhirpathpy cannot run indexes nothing rather than failing the write
        return []
    return [v for v in result if v is not None and v is not False] if isinstance(result, list) else []
