"""The FHIR R4 element tree, and structural validation of resources on write."""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources as package_files
from typing import Any

from rebond.pickled import by_fields


@functools.cache
def _elements() -> dict[str, Any]:
    text = package_files.files("rebond.fhir").joinpath("definitions/elements.json").read_text()
    return json.loads(text)  # type: ignore[no-any-return]


RESOURCE_TYPES: tuple[str, ...] = tuple(_elements()["resources"])
_RESOURCE_SET = frozenset(RESOURCE_TYPES)
_TYPES: dict[str, dict[str, list[Any]]] = _elements()["types"]

ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_DATE = r"\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?)?"
_TIME = r"([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d+)?"
_TZ = r"(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00))"
_PRIMITIVE_FORMATS = {
    "date": re.compile(rf"^{_DATE}$"),
    "dateTime": re.compile(rf"^{_DATE}(T{_TIME}{_TZ})?$"),
    "instant": re.compile(rf"^\d{{4}}-\d\d-\d\dT{_TIME}{_TZ}$"),
    "time": re.compile(rf"^{_TIME}$"),
}


def choice_element_names() -> frozenset[str]:
    return frozenset(spec[3] for elements in _TYPES.values() for spec in elements.values() if spec[3])


def is_resource_type(name: str) -> bool:
    return name in _RESOURCE_SET


@dataclass(frozen=True)
class Issue:
    """One structural problem, with the FHIRPath-like location of the element at fault."""

    path: str
    message: str

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)


def validate(resource: Any) -> list[Issue]:
    """Structural problems of a resource: unknown elements, wrong JSON kinds, bad dates, missing required elements."""
    issues: list[Issue] = []
    if not isinstance(resource, dict):
        return [Issue("", "a resource must be a JSON object")]
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or rtype not in _RESOURCE_SET:
        return [Issue("resourceType", f"unknown resource type {rtype!r}")]
    rid = resource.get("id")
    if rid is not None and (not isinstance(rid, str) or not ID_PATTERN.match(rid)):
        issues.append(Issue(f"{rtype}.id", "an id is 1 to 64 letters, digits, '-' or '.'"))
    _validate_object(resource, rtype, rtype, issues, is_resource=True)
    return issues


def _validate_object(obj: dict[str, Any], type_name: str, path: str, issues: list[Issue], is_resource: bool = False) -> None:
    elements = _TYPES.get(type_name)
    if elements is None:
        return
    if not obj and not is_resource:
        issues.append(Issue(path, "an element may not be empty"))
        return
    choices_seen: dict[str, str] = {}
    for key, value in obj.items():
        if is_resource and key == "resourceType":
            continue
        if key.startswith("_"):
            if key[1:] not in elements:
                issues.append(Issue(f"{path}.{key}", "extension of an unknown element"))
            continue
        spec = elements.get(key)
        if spec is None:
            issues.append(Issue(f"{path}.{key}", "unknown element"))
            continue
        kind, is_list, _required, choice = spec
        if choice:
            if choice in choices_seen:
                issues.append(Issue(f"{path}.{key}", f"only one of {choice}[x] may be given (also {choices_seen[choice]})"))
            choices_seen[choice] = key
        if is_list:
            if not isinstance(value, list):
                issues.append(Issue(f"{path}.{key}", "must be an array"))
                continue
            if not value:
                issues.append(Issue(f"{path}.{key}", "an array may not be empty"))
            for i, item in enumerate(value):
                _validate_value(item, kind, path, key, i, issues)
        else:
            if isinstance(value, list):
                issues.append(Issue(f"{path}.{key}", "must not be an array"))
                continue
            _validate_value(value, kind, path, key, -1, issues)
    for key in _required_elements(type_name):
        if key not in obj and f"_{key}" not in obj:
            issues.append(Issue(f"{path}.{key}", "required element missing"))


@functools.cache
def _required_elements(type_name: str) -> tuple[str, ...]:
    """The elements of a type that must be present (a required choice element is checked by its own rules)."""
    return tuple(key for key, (_kind, _is_list, required, choice) in _TYPES[type_name].items() if required and not choice)


def _where(parent: str, key: str, index: int) -> str:
    return f"{parent}.{key}" if index < 0 else f"{parent}.{key}[{index}]"


def _validate_value(value: Any, kind: str, parent: str, key: str, index: int, issues: list[Issue]) -> None:
    """One value of `parent`'s element `key` (item `index` of its array, or -1): its path is written out only for an
    issue or an object to look into, not for each of a resource's many valid primitives."""
    if value is None:
        issues.append(Issue(_where(parent, key, index), "null is not allowed"))
    elif kind in ("string", "date", "dateTime", "instant", "time"):
        if not isinstance(value, str):
            issues.append(Issue(_where(parent, key, index), "must be a string" if kind == "string" else f"must be a {kind} string"))
        elif value.strip() == "" and kind == "string":
            issues.append(Issue(_where(parent, key, index), "a string may not be empty"))
        elif kind in _PRIMITIVE_FORMATS and not _PRIMITIVE_FORMATS[kind].match(value):
            issues.append(Issue(_where(parent, key, index), f"{value!r} is not a valid {kind}"))
    elif kind == "boolean":
        if not isinstance(value, bool):
            issues.append(Issue(_where(parent, key, index), "must be true or false"))
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            issues.append(Issue(_where(parent, key, index), "must be an integer"))
    elif kind == "decimal":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            issues.append(Issue(_where(parent, key, index), "must be a number"))
    elif kind in ("Resource", "DomainResource") or kind in _RESOURCE_SET:
        if not isinstance(value, dict):
            issues.append(Issue(_where(parent, key, index), "must be a resource object"))
            return
        inner = value.get("resourceType")
        if not isinstance(inner, str) or inner not in _RESOURCE_SET:
            issues.append(Issue(f"{_where(parent, key, index)}.resourceType", f"unknown resource type {inner!r}"))
            return
        _validate_object(value, inner, _where(parent, key, index), issues, is_resource=True)
    elif not isinstance(value, dict):
        issues.append(Issue(_where(parent, key, index), f"must be an object ({kind})"))
    else:
        _validate_object(value, kind, _where(parent, key, index), issues)
