"""Turn a resource into the search-index rows its search parameters define.

Each parameter type has one table; a row carries the parameter key
(`Observation.code`) and the values a search compares against. Dates, numbers
and quantities are stored as ranges [lo, hi) so that the precision of the stored
value is kept: `2024-03` covers the whole month.
"""
from __future__ import annotations

import calendar
import datetime as dt
import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from typing import Any

from rebond.fhir.searchparams import SearchParam, component_param, registry
from rebond.pickled import by_fields
from rebond.store.schema import ROW_TABLES

INFINITY = 1e18

_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d\d)(-(?P<d>\d\d)(T(?P<H>\d\d)(:(?P<M>\d\d)(:(?P<S>\d\d)(?P<f>\.\d+)?)?)?(?P<tz>Z|[+-]\d\d:\d\d)?)?)?)?$"
)


def normalize_text(value: str) -> str:
    """Case- and accent-insensitive form used by string search (`Hélène` finds `helene`)."""
    if value.isascii():
        return value.lower().strip()
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().strip()


@functools.lru_cache(maxsize=16384)
def date_range(value: str) -> tuple[float, float] | None:
    """[lo, hi) in epoch seconds for a FHIR date, dateTime or instant, by its precision.

    A time without a zone is read as UTC, as the specification leaves it to the server.
    """
    m = _DATE_RE.match(value.strip())
    if not m:
        return None
    year = int(m["y"])
    try:
        if m["m"] is None:
            lo = dt.datetime(year, 1, 1, tzinfo=dt.UTC)
            hi = dt.datetime(year + 1, 1, 1, tzinfo=dt.UTC)
            return lo.timestamp(), hi.timestamp()
        month = int(m["m"])
        if m["d"] is None:
            lo = dt.datetime(year, month, 1, tzinfo=dt.UTC)
            days = calendar.monthrange(year, month)[1]
            return lo.timestamp(), lo.timestamp() + days * 86400
        day = int(m["d"])
        if m["H"] is None:
            lo = dt.datetime(year, month, day, tzinfo=dt.UTC)
            return lo.timestamp(), lo.timestamp() + 86400
        tz = dt.UTC
        if m["tz"] and m["tz"] != "Z":
            sign = 1 if m["tz"][0] == "+" else -1
            tz = dt.timezone(sign * dt.timedelta(hours=int(m["tz"][1:3]), minutes=int(m["tz"][4:6])))
        hour = int(m["H"])
        minute = int(m["M"] or 0)
        if m["S"] is None:
            lo = dt.datetime(year, month, day, hour, minute, tzinfo=tz)
            return lo.timestamp(), lo.timestamp() + (60 if m["M"] else 3600)
        second = min(int(m["S"]), 59)
        base = dt.datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()
        if m["f"]:
            fraction = float(m["f"])
            width = 10.0 ** -(len(m["f"]) - 1)
            return base + fraction, base + fraction + width
        return base, base + 1
    except ValueError:
        return None


def number_range(value: Any) -> tuple[float, float, float] | None:
    """(lo, hi, value): a number's implied precision range, `100` → [99.5, 100.5)."""
    if isinstance(value, bool):
        return None
    text = str(value)
    whole, dot, fraction = text[1:].partition(".") if text[:1] == "-" else text.partition(".")
    if (whole.isdigit() and whole.isascii() and len(whole) <= 18
            and (not dot or (fraction.isdigit() and fraction.isascii() and len(fraction) <= 8))):
        # written plainly (`-12.50`, m × 10^-k): m × 10^-k ± 5 × 10^-(k+1) divided out of integers, which Python
        # rounds once, exactly: the same floats as the decimal arithmetic below (its 28 digits hold these whole)
        tens = int(whole + fraction) * 10
        if text[:1] == "-":
            tens = -tens
        scale = 10 ** (len(fraction) + 1)
        return (tens - 5) / scale, (tens + 5) / scale, float(text)
    try:
        d = Decimal(text)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    exponent = d.as_tuple().exponent
    half = Decimal(5).scaleb(int(exponent) - 1) if isinstance(exponent, int) else Decimal(0)
    return float(d - half), float(d + half), float(d)


@dataclass
class IndexRows:
    """The rows one resource contributes to each index table."""

    string: list[tuple[str, str, str]] = field(default_factory=list)  # key, normalized, exact
    token: list[tuple[str, str | None, str | None, str | None]] = field(default_factory=list)  # key, system, code, text
    date: list[tuple[str, float, float]] = field(default_factory=list)  # key, lo, hi
    number: list[tuple[str, float, float, float]] = field(default_factory=list)  # key, lo, hi, value
    quantity: list[tuple[str, str | None, str | None, float, float, float]] = field(default_factory=list)
    reference: list[tuple[str, str | None, str | None, str | None]] = field(default_factory=list)  # key, type, id, url
    uri: list[tuple[str, str]] = field(default_factory=list)
    composite: list[tuple[str, str, str]] = field(default_factory=list)  # key, first part, second part

    def __init__(self, string: list[Any] | None = None, token: list[Any] | None = None, date: list[Any] | None = None,
                 number: list[Any] | None = None, quantity: list[Any] | None = None, reference: list[Any] | None = None,
                 uri: list[Any] | None = None, composite: list[Any] | None = None) -> None:
        """Compiled, where the one `dataclass` writes is not (see store/draft.py NATIVE_INIT): a resource's rows are
        made for every write drafted, and again where the intake writer receives them."""
        self.string = [] if string is None else string
        self.token = [] if token is None else token
        self.date = [] if date is None else date
        self.number = [] if number is None else number
        self.quantity = [] if quantity is None else quantity
        self.reference = [] if reference is None else reference
        self.uri = [] if uri is None else uri
        self.composite = [] if composite is None else composite

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)  # compiled with its `__init__`, it is made again through it

    def plain(self) -> tuple[list[Any], ...]:
        """The rows as lists of tuples, in the order of the fields (`from_plain` takes them back)."""
        return self.string, self.token, self.date, self.number, self.quantity, self.reference, self.uri, self.composite

    @staticmethod
    def from_plain(plain: Sequence[list[Any]]) -> IndexRows:
        string, token, date, number, quantity, reference, uri, composite = plain
        return IndexRows(string, token, date, number, quantity, reference, uri, composite)

    def dedupe(self) -> None:
        """Each row once (in the order first written). Field by field rather than by name: compiled, an attribute
        named in the code is read in place, one looked up by its name goes through Python's generic lookup."""
        self.string = _once(self.string)
        self.token = _once(self.token)
        self.date = _once(self.date)
        self.number = _once(self.number)
        self.quantity = _once(self.quantity)
        self.reference = _once(self.reference)
        self.uri = _once(self.uri)
        self.composite = _once(self.composite)


def _once(rows: list[Any]) -> list[Any]:
    return list(dict.fromkeys(rows)) if len(rows) > 1 else rows


#: the index table of each list `IndexRows.plain` gives: its fields, in their order
_PLAIN_TABLES = tuple(ROW_TABLES[f.name] for f in fields(IndexRows))


def table_rows(pending: dict[int, IndexRows]) -> dict[str, list[tuple[Any, ...]]]:
    """The index rows of resources (their internal id → their rows) by table, as inserted: (rid, *values, n), n
    numbering a resource's rows in the table. Here, compiled, for the intake writer, which does it for every
    resource it writes."""
    by_table: dict[str, list[tuple[Any, ...]]] = {}
    for internal, rows in pending.items():
        for table, values in zip(_PLAIN_TABLES, rows.plain(), strict=True):
            if values:
                out = by_table.setdefault(table, [])
                for n, value in enumerate(values):
                    out.append((internal, *value, n))
    return by_table


def split_reference(ref: str) -> tuple[str | None, str | None, str | None]:
    """(type, id, url) of a reference string: `Patient/1`, an absolute URL, or `urn:uuid:…`."""
    if ref.startswith("urn:") or ref.startswith("#"):
        return None, None, ref
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2:
        return parts[-2], parts[-1], ref if "://" in ref else None
    return None, None, ref


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        out: list[str] = []
        for key in ("text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country", "value", "display"):
            item = value.get(key)
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, list):
                out.extend(s for s in item if isinstance(s, str))
        return out
    return []


def _tokens(value: Any) -> list[tuple[str | None, str | None, str | None]]:
    if isinstance(value, bool):
        return [(None, "true" if value else "false", None)]
    if isinstance(value, (str, int)):
        return [(None, str(value), None)]
    if not isinstance(value, dict):
        return []
    if "coding" in value or ("text" in value and "system" not in value and "value" not in value and "code" not in value):
        out = [(c.get("system"), c.get("code"), c.get("display")) for c in value.get("coding", []) if isinstance(c, dict)]
        text = value.get("text")
        if isinstance(text, str) and not any(d == text for _s, _c, d in out):
            out.append((None, None, text))  # a text that repeats a coding's display is already found by :text
        return out
    if "code" in value or "display" in value and "value" not in value:
        return [(value.get("system"), value.get("code"), value.get("display"))]
    if "value" in value:  # Identifier or ContactPoint
        type_text = value.get("type", {}).get("text") if isinstance(value.get("type"), dict) else None
        system = value.get("system")
        if not isinstance(system, str) or system in _CONTACT_SYSTEMS:
            system = None  # a ContactPoint's system says phone or email: not a code system
        return [(system, str(value["value"]), type_text)]
    return []


_CONTACT_SYSTEMS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})


def _dates(value: Any) -> list[tuple[float, float]]:
    if isinstance(value, str):
        r = date_range(value)
        return [r] if r else []
    if isinstance(value, dict):
        if "start" in value or "end" in value:  # Period: an open end runs to infinity
            start = date_range(value["start"]) if isinstance(value.get("start"), str) else None
            end = date_range(value["end"]) if isinstance(value.get("end"), str) else None
            return [(start[0] if start else -INFINITY, end[1] if end else INFINITY)]
        if "event" in value or "repeat" in value:  # Timing
            out = [r for e in value.get("event", []) if isinstance(e, str) and (r := date_range(e))]
            bounds = value.get("repeat", {}).get("boundsPeriod") if isinstance(value.get("repeat"), dict) else None
            if isinstance(bounds, dict):
                out.extend(_dates(bounds))
            return out
    return []


def _quantities(value: Any) -> list[tuple[str | None, str | None, float, float, float]]:
    if isinstance(value, dict):
        if "value" in value:
            r = number_range(value["value"])
            if r:
                system = value.get("system") or (None if "currency" not in value else "urn:iso:std:iso:4217")
                code = value.get("code") or value.get("currency") or value.get("unit")
                return [(system, code, *r)]
        elif "low" in value or "high" in value:  # Range
            low: dict[str, Any] = value["low"] if isinstance(value.get("low"), dict) else {}
            high: dict[str, Any] = value["high"] if isinstance(value.get("high"), dict) else {}
            lo, hi = number_range(low.get("value")), number_range(high.get("value"))
            unit = low or high
            middle = (lo or hi or (0.0, 0.0, 0.0))[2]
            return [(unit.get("system"), unit.get("code"), lo[0] if lo else -INFINITY, hi[1] if hi else INFINITY, middle)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        r = number_range(value)
        return [(None, None, *r)] if r else []
    return []


def _references(value: Any) -> list[tuple[str | None, str | None, str | None]]:
    if isinstance(value, dict):
        ref = value.get("reference")
        out = [split_reference(ref)] if isinstance(ref, str) else []
        return out
    if isinstance(value, str):  # canonical or uri used as a reference
        return [(None, None, value)]
    return []


def index_resource(resource: dict[str, Any]) -> IndexRows:
    """All index rows of a resource, for every search parameter of its type."""
    rows = IndexRows()
    memo: dict[str, list[Any]] = {}
    for param in _plan(resource["resourceType"]).params_for(resource):
        values = param.extractor.values(resource, memo)
        if values:
            _index_values(rows, param, values)
    rows.dedupe()
    return rows


class _Plan:
    """The indexed parameters of one resource type, by the top-level element their paths start from.

    An Observation type has some forty indexed parameters and a lab result has values for a
    dozen: those whose paths start at an element the resource does not have are not evaluated.
    """

    def __init__(self, resource_type: str) -> None:
        self.params = tuple(p for p in registry().get(resource_type, {}).values()
                            if p.code not in ("_id", "_lastUpdated") and p.indexed)  # those two: from the resource table
        self.always: list[int] = []
        self.by_element: dict[str, list[int]] = {}
        # composites on the resource itself (an Observation's code-value-quantity): each component needs one of its elements
        self.composites: list[tuple[int, tuple[frozenset[str], ...]]] = []
        for i, param in enumerate(self.params):
            firsts = param.extractor.first_elements()
            needs = _component_elements(param) if firsts is None and param.type == "composite" else None
            if needs is not None:
                self.composites.append((i, needs))
                continue
            if firsts is None:
                self.always.append(i)
            for name in firsts or ():
                self.by_element.setdefault(name, []).append(i)
        self._of_key: dict[str, tuple[int, ...]] = {}
        self._of_shape: dict[tuple[str, ...], tuple[SearchParam, ...]] = {}

    def _for_key(self, key: str) -> tuple[int, ...]:
        """Parameters a top-level key may feed: its own paths, and a choice element's (`valueQuantity` feeds `value`)."""
        found = self._of_key.get(key)
        if found is None:
            found = tuple(i for name in _element_names(key) for i in self.by_element.get(name, ()))
            if len(self._of_key) < 4096:
                self._of_key[key] = found
        return found

    def params_for(self, resource: dict[str, Any]) -> tuple[SearchParam, ...]:
        """The parameters to evaluate on a resource. They depend only on its top-level keys: worked out once for each
        set of keys in the order written (the resources an interface writes, a lab panel's observations, come in a
        handful of shapes; 19 against 2 thousand instructions a resource)."""
        shape = tuple(resource)
        found = self._of_shape.get(shape)
        if found is None:
            found = self._choose(resource)
            if len(self._of_shape) < 4096:
                self._of_shape[shape] = found
        return found

    def _choose(self, resource: dict[str, Any]) -> tuple[SearchParam, ...]:
        chosen = set(self.always)
        for key in resource:
            chosen.update(self._for_key(key))
        if self.composites:
            present = {name for key in resource for name in _element_names(key)}
            chosen.update(i for i, needs in self.composites if all(not need.isdisjoint(present) for need in needs))
        return tuple(self.params[i] for i in sorted(chosen))


@functools.lru_cache(maxsize=4096)
def _element_names(key: str) -> tuple[str, ...]:
    """The element names a top-level key stands for: itself, and for a choice its stem (`valueQuantity`: `value`)."""
    return (key, *(key[:i] for i, ch in enumerate(key) if i and ch.isupper()))


def _component_elements(param: SearchParam) -> tuple[frozenset[str], ...] | None:
    """For each component of a composite, the top-level elements one of which it reads first; None: not known for all."""
    needs = tuple(extractor.first_elements() for _ptype, extractor in _components(param))
    return needs if needs and all(need for need in needs) else None


@functools.cache
def _plan(resource_type: str) -> _Plan:
    return _Plan(resource_type)


def _index_values(rows: IndexRows, param: SearchParam, values: Any) -> None:
    key = param.key
    ptype = param.type
    for value in values:
        if ptype == "string":
            rows.string.extend((key, normalize_text(s), s) for s in _strings(value))
        elif ptype == "token":
            rows.token.extend((key, s, c, normalize_text(t) if t else None) for s, c, t in _tokens(value))
        elif ptype == "date":
            rows.date.extend((key, lo, hi) for lo, hi in _dates(value))
        elif ptype == "number":
            r = number_range(value)
            if r:
                rows.number.append((key, *r))
        elif ptype == "quantity":
            rows.quantity.extend((key, *q) for q in _quantities(value))
        elif ptype == "reference":
            rows.reference.extend((key, *r) for r in _references(value))
        elif ptype == "uri":
            if isinstance(value, str):
                rows.uri.append((key, value))
        elif ptype == "composite":
            rows.composite.extend((key, a, b) for a, b in composite_values(param, value))


def component_keys(ptype: str, value: Any) -> list[str]:
    """The comparable forms of one component value of a composite parameter.

    A token gives one form, `code` then its system after a unit separator (`token_part`), which
    serves a search with its system and one without (a prefix); quantities and numbers their
    value as text; dates their lower bound. Composite search matches these (store/query.py).
    """
    if ptype == "token":
        return [token_part(system, code) for system, code, _text in _tokens(value) if code]
    if ptype in ("quantity", "number"):
        return [format_number(q[4]) for q in _quantities(value)]
    if ptype == "date":
        return [str(lo) for lo, _hi in _dates(value)]
    if ptype in ("string", "uri"):
        return [normalize_text(s) for s in _strings(value)]
    if ptype == "reference":
        return [f"{t}/{i}" for t, i, _u in _references(value) if t and i]
    return []


#: between a token's code and its system in a composite's part: below every character a code may hold (FHIR strings
#: hold no control character), so the rows of one code with any system follow it in the lookup index
TOKEN_PART_SEPARATOR = "\x1f"


def token_part(system: str | None, code: str) -> str:
    """A token as a composite's part stores it: `code`, or `code` + TOKEN_PART_SEPARATOR + `system`."""
    return f"{code}{TOKEN_PART_SEPARATOR}{system}" if system else code


def format_number(value: float) -> str:
    """The number as a composite's part stores it: its shortest digits, no exponent, no trailing zero (`100`, `4.2`)."""
    text = str(value)
    if "e" in text or "n" in text:  # 1e-05, 1e+16; inf, nan
        return format(Decimal(text).normalize(), "f")
    return text[:-2] if text.endswith(".0") else text  # a float's shortest digits: only `.0` can trail


def composite_values(param: SearchParam, node: Any) -> list[tuple[str, str]]:
    if not isinstance(node, dict):
        return []
    components = _components(param)
    found = []
    for _ptype, extractor in components:
        # compiled paths start at the node whatever its type; fhirpathpy wants to be told the type
        start = node if extractor.compiled else {"resourceType": "Element", **node}
        values = extractor.values(start) if extractor.applies else []
        if not values:
            return []  # most composites of a resource have a part it lacks (an Observation has one kind of value)
        found.append(values)
    pairs = [[k for v in values for k in component_keys(ptype, v)] for (ptype, _e), values in zip(components, found, strict=True)]
    return [(a, b) for a in pairs[0] for b in pairs[1]] if len(pairs) == 2 else []


def component_types(param: SearchParam) -> tuple[str, ...]:
    """The parameter type of each component of a composite parameter."""
    return tuple(ptype for ptype, _extractor in _components(param))


_COMPONENTS: dict[str, tuple[tuple[str, Any], ...]] = {}


def _components(param: SearchParam) -> tuple[tuple[str, Any], ...]:
    """(parameter type, extractor) of each component of a composite parameter, worked out once."""
    found = _COMPONENTS.get(param.key)
    if found is None:
        from rebond.fhir.paths import Extractor, split_top_level

        parts = []
        for url, expression in param.components:
            ptype, _code = component_param(url, param.resource_type)
            rooted = " | ".join("Element." + branch for branch in split_top_level(expression, "|"))
            parts.append((ptype, Extractor(rooted, "Element")))
        found = _COMPONENTS[param.key] = tuple(parts)
    return found
