"""Parse a FHIR search query string into a SearchQuery. Pure: no database here."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from rebond.fhir.model import is_resource_type
from rebond.fhir.searchparams import SearchParam, lookup, registry
from rebond.pickled import by_fields
from rebond.store.indexing import date_range, normalize_text, number_range

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
MAX_COUNT = 1000
DEFAULT_COUNT = 50

_MODIFIERS = {
    "string": {"exact", "contains", "missing"},
    "token": {"missing", "not", "text"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "reference": {"missing"},  # plus :Type
    "uri": {"missing", "below", "above"},
    "composite": {"missing"},
}


class SearchError(Exception):
    """Parameters a search cannot honour; each message names its parameter."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(unsafe_hash=True)
class Value:
    """One OR'ed value of a clause, already parsed for its parameter type. Never changed once made (not frozen only
    so that its `__init__` is compiled: store/draft.py NATIVE_INIT; hashed by its fields all the same)."""

    raw: str
    prefix: str = "eq"
    lo: float = 0.0  # date, number, quantity: the range the value stands for
    hi: float = 0.0
    system: str | None = None  # token, quantity
    code: str | None = None
    any_system: bool = True  # token: `code` alone matches any system; `|code` only none
    text: str = ""  # string: normalized; token :text
    ref_type: str | None = None
    ref_id: str | None = None

    def __init__(self, raw: str, prefix: str = "eq", lo: float = 0.0, hi: float = 0.0, system: str | None = None,
                 code: str | None = None, any_system: bool = True, text: str = "", ref_type: str | None = None,
                 ref_id: str | None = None) -> None:
        self.raw = raw
        self.prefix = prefix
        self.lo = lo
        self.hi = hi
        self.system = system
        self.code = code
        self.any_system = any_system
        self.text = text
        self.ref_type = ref_type
        self.ref_id = ref_id

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)  # a draft's searches go to the intake writer


@dataclass
class Clause:
    """One parameter of the query: its values are OR'ed, clauses are AND'ed."""

    name: str
    type: str  # string, token, ..., or "id", "lastUpdated"
    param: SearchParam | None
    modifier: str = ""
    values: list[Value] = field(default_factory=list)
    missing: bool | None = None
    chain: tuple[str, Clause] | None = None  # (target type, clause on the target)
    has: tuple[str, str, Clause] | None = None  # (source type, reference param code, clause on the source)

    def __init__(self, name: str, type: str, param: SearchParam | None, modifier: str = "", values: list[Value] | None = None,
                 missing: bool | None = None, chain: tuple[str, Clause] | None = None,
                 has: tuple[str, str, Clause] | None = None) -> None:  # compiled (see store/draft.py NATIVE_INIT)
        self.name = name
        self.type = type
        self.param = param
        self.modifier = modifier
        self.values = [] if values is None else values
        self.missing = missing
        self.chain = chain
        self.has = has

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # (its class: `type` is a field's name here)
        return by_fields(self)  # compiled with its `__init__`, it is made again through it


@dataclass(frozen=True)
class Include:
    source_type: str
    param_code: str  # "*" for every reference parameter
    target_type: str | None
    iterate: bool
    reverse: bool

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)


@dataclass
class SearchQuery:
    resource_type: str | None
    clauses: list[Clause] = field(default_factory=list)
    sort: list[tuple[tuple[str, ...], str, bool]] = field(default_factory=list)  # (index keys, type, descending)
    count: int = DEFAULT_COUNT
    offset: int = 0
    includes: list[Include] = field(default_factory=list)
    summary: str | None = None
    total: str = "none"
    elements: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # unknown parameters dropped under lenient handling

    def __init__(self, resource_type: str | None, clauses: list[Clause] | None = None,
                 sort: list[tuple[tuple[str, ...], str, bool]] | None = None, count: int = DEFAULT_COUNT, offset: int = 0,
                 includes: list[Include] | None = None, summary: str | None = None, total: str = "none",
                 elements: list[str] | None = None, ignored: list[str] | None = None) -> None:  # compiled (NATIVE_INIT)
        self.resource_type = resource_type
        self.clauses = [] if clauses is None else clauses
        self.sort = [] if sort is None else sort
        self.count = count
        self.offset = offset
        self.includes = [] if includes is None else includes
        self.summary = summary
        self.total = total
        self.elements = [] if elements is None else elements
        self.ignored = [] if ignored is None else ignored

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)


def literal(value: str) -> str:
    """A value taken as it is in a search parameter: its `,` (or), `|` (system|code), `$` (composite) and `\\`
    escaped. Every search built from what another system or a person typed (an HL7 PID-3, a DICOM PatientID) goes
    through it: « 900000006,900000007 » is one identifier, never two."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


def split_or(value: str) -> list[str]:
    """Split on commas not escaped with a backslash, and unescape."""
    parts = re.split(r"(?<!\\),", value)
    return [p.replace("\\,", ",").replace("\\|", "|").replace("\\$", "$").replace("\\\\", "\\") for p in parts]


def _split_unescaped(value: str, sep: str) -> list[str]:
    return re.split(r"(?<!\\)" + re.escape(sep), value)


def _prefixed(raw: str) -> tuple[str, str]:
    if len(raw) > 2 and raw[:2] in PREFIXES and (raw[2].isdigit() or raw[2] in "-."):
        return raw[:2], raw[2:]
    return "eq", raw


def parse_value(ptype: str, raw: str, name: str, param: SearchParam | None) -> Value:
    if ptype in ("date", "lastUpdated"):
        prefix, rest = _prefixed(raw)
        rng = date_range(rest)
        if rng is None:
            raise SearchError([f"{name}: '{raw}' is not a valid date (YYYY, YYYY-MM, YYYY-MM-DD or a dateTime)"])
        return Value(raw, prefix, rng[0], rng[1])
    if ptype == "number":
        prefix, rest = _prefixed(raw)
        num = number_range(rest)
        if num is None:
            raise SearchError([f"{name}: '{raw}' is not a number"])
        return Value(raw, prefix, num[0], num[1])
    if ptype == "quantity":
        prefix, rest = _prefixed(raw)
        parts = _split_unescaped(rest, "|")
        num = number_range(parts[0])
        if num is None or len(parts) not in (1, 3):
            raise SearchError([f"{name}: '{raw}' is not a quantity (number|system|code)"])
        system = parts[1] or None if len(parts) == 3 else None
        code = parts[2] or None if len(parts) == 3 else None
        return Value(raw, prefix, num[0], num[1], system=system, code=code)
    if ptype in ("token", "id"):
        if "|" in raw and ptype == "token":
            system, _, code = raw.partition("|")
            return Value(raw, system=system or None, code=code or None, any_system=False, text=normalize_text(raw))
        return Value(raw, code=raw, text=normalize_text(raw))
    if ptype == "string":
        return Value(raw, text=normalize_text(raw))
    if ptype == "reference":
        if "://" in raw:
            parts = raw.rstrip("/").split("/")
            if "_history" in parts:
                parts = parts[: parts.index("_history")]
            if len(parts) >= 2 and is_resource_type(parts[-2]):
                return Value(raw, ref_type=parts[-2], ref_id=parts[-1])
            return Value(raw)
        if "/" in raw:
            rtype, _, rid = raw.partition("/")
            rid = rid.split("/_history")[0]
            if not is_resource_type(rtype):
                raise SearchError([f"{name}: '{rtype}' is not a resource type"])
            return Value(raw, ref_type=rtype, ref_id=rid)
        return Value(raw, ref_id=raw)
    if ptype == "composite":
        parts = _split_unescaped(raw, "$")
        if len(parts) != 2:
            raise SearchError([f"{name}: a composite value is two parts joined by '$'"])
        for part, component in zip(parts, _joined_parts(param), strict=False):  # each checked as a value of its parameter
            parse_value(component.type, part, name, component)
        return Value(raw, code=parts[0], text=parts[1])
    return Value(raw)


def _joined_parts(param: SearchParam | None) -> tuple[SearchParam, ...]:
    """The parameters a composite's two parts are asked of, when its components' rows answer it (its own `joined`, or
    that of a composite whose rows an alias reads: `combo-code-value-quantity`)."""
    if param is None:
        return ()
    for other in (param, *param.aliased):
        if other.joined:
            return other.joined_params
    return ()


def _special_clause(name: str, modifier: str) -> Clause | None:
    if name == "_id":
        return Clause(name, "id", None, modifier)
    if name == "_lastUpdated":
        return Clause(name, "lastUpdated", None, modifier)
    return None


def _build_clause(resource_type: str, name: str, value: str) -> Clause:
    """One `name[:modifier][.chain]=value` pair on `resource_type`."""
    if name.startswith("_has:"):
        return _has_clause(resource_type, name, value)
    chain_rest = ""
    head = name
    if "." in name:
        head, chain_rest = name.split(".", 1)
    code, _, modifier = head.partition(":")
    clause = _special_clause(code, modifier)
    if clause is None:
        param = lookup(resource_type, code)
        if param is None:
            raise SearchError([f"unknown search parameter '{code}' for {resource_type}"])
        clause = Clause(code, param.type, param, modifier)
    if chain_rest:
        if clause.type != "reference" or clause.param is None:
            raise SearchError([f"{name}: only reference parameters can be chained"])
        target = modifier if modifier and is_resource_type(modifier) else None
        if target is None:
            targets = [t for t in clause.param.targets if is_resource_type(t)]
            if len(targets) != 1:
                raise SearchError([f"{name}: say which type to chain through, e.g. {code}:{targets[0] if targets else 'Patient'}.{chain_rest}"])
            target = targets[0]
        if "." in chain_rest.split(":", 1)[0]:
            raise SearchError([f"{name}: only one level of chaining is supported"])
        clause.modifier = ""
        clause.chain = (target, _build_clause(target, chain_rest, value))
        return clause
    _apply_modifier_and_values(clause, name, value)
    return clause


def _apply_modifier_and_values(clause: Clause, name: str, value: str) -> None:
    modifier = clause.modifier
    ptype = clause.type
    if modifier == "missing":
        if value not in ("true", "false"):
            raise SearchError([f"{name}: :missing takes true or false"])
        clause.missing = value == "true"
        return
    if modifier:
        allowed = _MODIFIERS.get(ptype, set()) | ({"not"} if ptype == "id" else set())
        if ptype == "reference" and is_resource_type(modifier):
            pass
        elif modifier not in allowed:
            raise SearchError([f"{name}: modifier ':{modifier}' is not supported for {ptype} parameters"])
    values = split_or(value)
    if any(v == "" for v in values):
        raise SearchError([f"{name}: empty value"])
    clause.values = [parse_value(ptype, v, name, clause.param) for v in values]
    if ptype == "reference" and modifier and is_resource_type(modifier):
        clause.values = [
            Value(v.raw, ref_type=modifier, ref_id=v.ref_id if v.ref_id else v.raw) for v in clause.values
        ]
        clause.modifier = ""
    for v in clause.values:
        if v.prefix != "eq" and ptype not in ("date", "number", "quantity", "lastUpdated"):
            raise SearchError([f"{name}: prefixes apply to dates, numbers and quantities only"])


def _has_clause(resource_type: str, name: str, value: str) -> Clause:
    # _has:Observation:patient:code=1234
    parts = name.split(":", 3)
    if len(parts) != 4 or not is_resource_type(parts[1]):
        raise SearchError([f"{name}: write _has:Type:reference:parameter"])
    _, source, ref_code, inner = parts
    ref_param = lookup(source, ref_code)
    if ref_param is None or ref_param.type != "reference":
        raise SearchError([f"{name}: '{ref_code}' is not a reference parameter of {source}"])
    clause = Clause(name, "has", None)
    clause.has = (source, ref_code, _build_clause(source, inner, value))
    return clause


def parse_search(resource_type: str | None, params: list[tuple[str, str]], *, lenient: bool = False) -> SearchQuery:
    """Build a SearchQuery; unknown parameters raise SearchError unless `lenient`."""
    query = SearchQuery(resource_type)
    problems: list[str] = []
    for name, value in params:
        try:
            _parse_one(query, resource_type, name, value)
        except SearchError as err:
            if lenient and all(p.startswith("unknown search parameter") or "not supported" in p for p in err.problems):
                query.ignored.append(name)
            else:
                problems.extend(err.problems)
    if problems:
        raise SearchError(problems)
    return query


_SUMMARY = ("true", "false", "count", "text", "data")
_TOTAL = ("none", "estimate", "accurate")
_IGNORED_RESULT_PARAMS = ("_format", "_pretty")


def _parse_one(query: SearchQuery, resource_type: str | None, name: str, value: str) -> None:
    if name in _IGNORED_RESULT_PARAMS:
        return
    if name in ("_count", "_offset"):
        if not value.isdigit():
            raise SearchError([f"{name}: a whole number is expected"])
        if name == "_count":
            query.count = min(int(value), MAX_COUNT)
        else:
            query.offset = int(value)
        return
    if name == "_summary":
        if value not in _SUMMARY:
            raise SearchError([f"_summary: one of {', '.join(_SUMMARY)}"])
        query.summary = value
        return
    if name == "_total":
        if value not in _TOTAL:
            raise SearchError([f"_total: one of {', '.join(_TOTAL)}"])
        query.total = value
        return
    if name == "_elements":
        query.elements.extend(v.strip() for v in value.split(",") if v.strip())
        return
    if name == "_sort":
        for key in value.split(","):
            key = key.strip()
            desc = key.startswith("-")
            code = key.lstrip("-")
            if code in ("_id", "_lastUpdated"):
                query.sort.append(((code,), code, desc))
                continue
            param = lookup(resource_type, code) if resource_type else None
            if param is None or param.type in ("reference", "composite"):
                raise SearchError([f"_sort: cannot sort on '{code}'"])
            query.sort.append((param.keys, param.type, desc))
        return
    base, _, mod = name.partition(":")
    if base in ("_include", "_revinclude"):
        if mod not in ("", "iterate", "recurse"):
            raise SearchError([f"{name}: unknown modifier"])
        query.includes.append(_parse_include(value, reverse=base == "_revinclude", iterate=bool(mod)))
        return
    if resource_type is None:
        raise SearchError([f"unknown search parameter '{name}' for a search across all types"])
    query.clauses.append(_build_clause(resource_type, name, value))


def _parse_include(value: str, *, reverse: bool, iterate: bool) -> Include:
    if value == "*":
        return Include("*", "*", None, iterate, reverse)
    parts = value.split(":")
    if len(parts) not in (2, 3) or not is_resource_type(parts[0]):
        raise SearchError([f"_include: '{value}' is not Type:parameter[:targetType]"])
    source, code = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if target is not None and not is_resource_type(target):
        raise SearchError([f"_include: '{target}' is not a resource type"])
    if code != "*":
        param = registry().get(source, {}).get(code)
        if param is None or param.type != "reference":
            raise SearchError([f"_include: '{code}' is not a reference parameter of {source}"])
    return Include(source, code, target, iterate, reverse)
