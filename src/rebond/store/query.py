"""Compile a parsed SearchQuery into SQL that both engines run (placeholders are `?`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rebond.fhir.search import Clause, SearchQuery, Value, parse_value
from rebond.fhir.searchparams import SearchParam, lookup
from rebond.pickled import by_fields
from rebond.store.indexing import TOKEN_PART_SEPARATOR, component_types, format_number, normalize_text, number_range, token_part
from rebond.store.schema import ROW_TABLES

PREFIX_END = "\U0010ffff"  # sorts after every character: `x >= p AND x < p || END` is a prefix match


@dataclass
class Fragment:
    sql: str
    params: list[Any] = field(default_factory=list)

    def __init__(self, sql: str, params: list[Any] | None = None) -> None:  # compiled (see store/draft.py NATIVE_INIT)
        self.sql = sql
        self.params = [] if params is None else params

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)  # compiled with its `__init__`, it is made again through it


def _range_condition(prefix: str, lo_col: str, hi_col: str, value: Value, is_date: bool) -> Fragment:
    lo, hi = value.lo, value.hi
    if prefix == "eq":
        return Fragment(f"({lo_col} >= ? AND {hi_col} <= ?)", [lo, hi])
    if prefix == "ne":
        return Fragment(f"NOT ({lo_col} >= ? AND {hi_col} <= ?)", [lo, hi])
    if prefix == "gt":
        return Fragment(f"{hi_col} > ?", [hi])
    if prefix == "lt":
        return Fragment(f"{lo_col} < ?", [lo])
    if prefix == "ge":
        return Fragment(f"{hi_col} > ?", [lo])
    if prefix == "le":
        return Fragment(f"{lo_col} < ?", [hi])
    if prefix == "sa":
        return Fragment(f"{lo_col} >= ?", [hi])
    if prefix == "eb":
        return Fragment(f"{hi_col} <= ?", [lo])
    # ap: within 10 % (numbers) or a day either side (dates)
    slack = 86400.0 if is_date else abs((lo + hi) / 2) * 0.1
    return Fragment(f"({lo_col} < ? AND {hi_col} > ?)", [hi + slack, lo - slack])


def _or(fragments: list[Fragment]) -> Fragment:
    """The fragments OR'ed, nested in halves: SQLite parses `a OR b OR c …` into a tree as deep as the list is long, and
    refuses one deeper than 1,000 (500 references); in halves, 10,000 values are 14 deep."""
    if len(fragments) == 1:
        return fragments[0]
    if len(fragments) <= 8:
        return Fragment("(" + " OR ".join(f.sql for f in fragments) + ")", [p for f in fragments for p in f.params])
    half = len(fragments) // 2
    return _or([_or(fragments[:half]), _or(fragments[half:])])


def _values_condition(clause: Clause) -> Fragment:
    """What the clause's values ask of an index row: references to resources of one type as one IN list (the usual
    « these patients », « these prescriptions »: one probe of the index each), anything else each value OR'ed."""
    targets = clause.param.targets if clause.param else ()
    if clause.type == "reference" and len(clause.values) > 1 and clause.modifier is None:
        types = {v.ref_type or (targets[0] if len(targets) == 1 else None) for v in clause.values}
        if len(types) == 1 and None not in types and all(v.ref_id is not None for v in clause.values):
            ids = list(dict.fromkeys(str(v.ref_id) for v in clause.values))
            return Fragment(f"(target_type = ? AND target_id IN ({', '.join('?' for _ in ids)}))", [types.pop(), *ids])
    return _or([_value_condition(clause, v) for v in clause.values])


def _value_condition(clause: Clause, value: Value) -> Fragment:
    t = clause.type
    mod = clause.modifier
    if t == "string":
        if mod == "exact":
            return Fragment("value_exact = ?", [value.raw])
        if mod == "contains":
            return Fragment("value_norm LIKE ? ESCAPE '!'", ["%" + _like_escape(value.text) + "%"])
        return Fragment("(value_norm >= ? AND value_norm < ?)", [value.text, value.text + PREFIX_END])
    if t == "token":
        if mod == "text":
            return Fragment("(text_norm >= ? AND text_norm < ?)", [value.text, value.text + PREFIX_END])
        if value.any_system:
            return Fragment("code = ?", [value.code])
        if value.code is None:
            return Fragment("system = ?", [value.system])
        if value.system is None:
            return Fragment("(code = ? AND system IS NULL)", [value.code])
        return Fragment("(code = ? AND system = ?)", [value.code, value.system])
    if t in ("date", "number"):
        return _range_condition(value.prefix, "lo", "hi", value, t == "date")
    if t == "quantity":
        cond = _range_condition(value.prefix, "lo", "hi", value, False)
        if value.code is not None:
            cond = Fragment(f"({cond.sql} AND code = ?)", [*cond.params, value.code])
        if value.system is not None:
            cond = Fragment(f"({cond.sql} AND system = ?)", [*cond.params, value.system])
        return cond
    if t == "reference":
        if value.ref_id is None:
            return Fragment("url = ?", [value.raw])
        if value.ref_type is not None:
            return Fragment("(target_id = ? AND target_type = ?)", [value.ref_id, value.ref_type])
        targets = clause.param.targets if clause.param else ()
        if len(targets) == 1:
            return Fragment("(target_id = ? AND target_type = ?)", [value.ref_id, targets[0]])
        return Fragment("target_id = ?", [value.ref_id])
    if t == "uri":
        if mod == "below":
            return Fragment("(uri >= ? AND uri < ?)", [value.raw, value.raw + PREFIX_END])
        if mod == "above":
            return Fragment("uri = substr(?, 1, length(uri))", [value.raw])
        return Fragment("uri = ?", [value.raw])
    if t == "composite":
        assert clause.param is not None
        first, second = component_types(clause.param)
        one, two = _composite_part("part1", first, value.code or ""), _composite_part("part2", second, value.text)
        return Fragment(f"({one.sql} AND {two.sql})", [*one.params, *two.params])
    raise ValueError(t)


def _composite_part(column: str, ptype: str, text: str) -> Fragment:
    """What one part of a composite value (`code$value`) asks of its column, by the type of its component, as
    indexing.component_keys stored it."""
    if ptype == "token":
        system, bar, code = text.partition("|")
        if not bar:  # a code of any system: the code alone, or followed by the separator and its system
            return Fragment(f"({column} >= ? AND {column} < ?)", [text, text + chr(ord(TOKEN_PART_SEPARATOR) + 1)])
        return Fragment(f"{column} = ?", [token_part(system or None, code)])
    candidates = [normalize_text(text)]
    num = number_range(text)
    if num is not None:
        candidates.append(format_number(num[2]))
    return Fragment(f"{column} IN ({', '.join('?' for _ in candidates)})", candidates)


def _like_escape(text: str) -> str:
    return text.replace("!", "!!").replace("%", "!%").replace("_", "!_")


def clause_fragment(clause: Clause, resource_type: str, alias: str, *, drive: bool = True) -> Fragment:
    """A condition on `alias` (a row of `resources`) for one clause.

    A driving clause is written `rid IN (index rows)`, so the engine starts from the
    index; the others are written as EXISTS probes by rid, checked only on the rows
    the driver found (materialising every row of a common code would cost more).
    """
    rid = f"{alias}.rid"
    if clause.type == "id":
        ph = ", ".join("?" for _ in clause.values)
        neg = "NOT " if clause.modifier == "not" else ""
        return Fragment(f"{alias}.res_id {neg}IN ({ph})", [v.raw for v in clause.values])
    if clause.type == "lastUpdated":
        return _or([_range_condition(v.prefix, f"{alias}.lu", f"({alias}.lu + 0.000001)", v, True) for v in clause.values])
    if clause.has is not None:
        source, ref_code, inner = clause.has
        sub = clause_fragment(inner, source, "hs")
        referring = lookup(source, ref_code)
        keys = key_condition(referring, "hx") if referring is not None else Fragment("hx.key = ?", [f"{source}.{ref_code}"])
        return Fragment(
            f"{alias}.res_id IN (SELECT hx.target_id FROM sp_reference hx JOIN resources hs ON hs.rid = hx.rid"
            f" WHERE {keys.sql} AND hx.target_type = ? AND {sub.sql})",
            [*keys.params, resource_type, *sub.params],
        )
    assert clause.param is not None
    if clause.param.joined:
        return _joined_fragment(clause, resource_type, alias, drive)
    if clause.type == "composite" and any(part.joined for part in clause.param.aliased):
        return _each_key(clause, resource_type, alias, drive)
    table = ROW_TABLES[clause.type]
    if clause.chain is not None:
        target_type, inner = clause.chain
        sub = clause_fragment(inner, target_type, "ct")
        keys = key_condition(clause.param, "cx")
        return Fragment(
            f"{rid} IN (SELECT cx.rid FROM sp_reference cx JOIN resources ct ON ct.res_type = cx.target_type"
            f" AND ct.res_id = cx.target_id WHERE {keys.sql} AND cx.target_type = ? AND ct.deleted = 0 AND {sub.sql})",
            [*keys.params, target_type, *sub.params],
        )
    probe = key_condition(clause.param, "p")
    if clause.missing is not None:
        neg = "NOT " if clause.missing else ""
        return Fragment(f"{neg}EXISTS (SELECT 1 FROM {table} p WHERE p.rid = {rid} AND {probe.sql})", probe.params)
    cond = _values_condition(clause)
    if clause.modifier == "not":
        return Fragment(f"NOT EXISTS (SELECT 1 FROM {table} p WHERE p.rid = {rid} AND {probe.sql} AND {cond.sql})",
                        [*probe.params, *cond.params])
    if drive and clause.type == "token" and clause.modifier == "text":
        return _token_text_driver(clause, rid)
    if drive:
        keys = key_condition(clause.param, table)
        return Fragment(f"{rid} IN (SELECT rid FROM {table} WHERE {keys.sql} AND {cond.sql})", [*keys.params, *cond.params])
    return Fragment(f"EXISTS (SELECT 1 FROM {table} p WHERE p.rid = {rid} AND {probe.sql} AND {cond.sql})", [*probe.params, *cond.params])


def _joined_fragment(clause: Clause, resource_type: str, alias: str, drive: bool) -> Fragment:
    """A composite answered by the rows of its components' parameters (searchparams.JOINED_COMPOSITES): for each value
    `A$B`, a resource with a row of the first parameter matching A and a row of the second matching B, each part with
    its parameter's whole syntax; `:missing`, whether it lacks rows of either."""
    assert clause.param is not None
    first, second = clause.param.joined_params

    def part(param: SearchParam, raw: str | None, *, leading: bool = False) -> Fragment:
        values = [parse_value(param.type, raw, clause.name, param)] if raw is not None else None
        one = Clause(clause.name, param.type, param, values=values, missing=False if raw is None else None)
        return clause_fragment(one, resource_type, alias, drive=leading)

    if clause.missing is not None:
        both = _and([part(first, None), part(second, None)])
        return Fragment(f"NOT {both.sql}", both.params) if clause.missing else both
    return _or([_and([part(first, value.code or "", leading=drive), part(second, value.text)]) for value in clause.values])


def _each_key(clause: Clause, resource_type: str, alias: str, drive: bool) -> Fragment:
    """An alias asked of each parameter whose rows it reads, when one of them is answered by its components' rows
    (`combo-code-value-quantity`: the Observation's own code and value, or a component's): OR'ed; for `:missing=true`,
    AND'ed (missing from each)."""
    assert clause.param is not None
    parts = []
    for param in clause.param.aliased:
        one = Clause(clause.name, clause.type, param, clause.modifier, clause.values, clause.missing)
        parts.append(clause_fragment(one, resource_type, alias, drive=drive))
    return _and(parts) if clause.missing else _or(parts)


def _and(fragments: list[Fragment]) -> Fragment:
    return Fragment("(" + " AND ".join(f.sql for f in fragments) + ")", [p for f in fragments for p in f.params])


def _token_text_driver(clause: Clause, rid: str) -> Fragment:
    """`:text` driving a search: the codes found with such a text (sp_token_texts), then their rows, each checked against
    its own text; and the rows with a text and no code, by `code IS NULL`."""
    assert clause.param is not None
    keys, texts_keys = key_condition(clause.param, "t"), key_condition(clause.param, "d")

    def texts(alias: str) -> Fragment:
        return _or([Fragment(f"({alias}.text_norm >= ? AND {alias}.text_norm < ?)", [v.text, v.text + PREFIX_END])
                    for v in clause.values])

    found, own = texts("d"), texts("t")
    return Fragment(
        f"{rid} IN (SELECT t.rid FROM sp_token_texts d JOIN sp_token t ON t.key = d.key AND t.code = d.code"
        f" WHERE {texts_keys.sql} AND {found.sql} AND {own.sql}"
        f" UNION ALL SELECT t.rid FROM sp_token t WHERE {keys.sql} AND t.code IS NULL AND {own.sql})",
        [*texts_keys.params, *found.params, *own.params, *keys.params, *own.params],
    )


def key_condition(param: SearchParam, alias: str) -> Fragment:
    """`alias.key = ?`, or the keys whose rows answer an alias parameter (and the one target type it keeps)."""
    keys = param.keys
    sql = f"{alias}.key = ?" if len(keys) == 1 else f"{alias}.key IN ({', '.join('?' for _ in keys)})"
    if param.target_type:
        return Fragment(f"({sql} AND {alias}.target_type = ?)", [*keys, param.target_type])
    return Fragment(sql, list(keys))


# which kind of clause narrows a search most, on clinical data: a patient's reference first, a date range last
_SELECTIVITY = {"id": 0, "reference": 1, "has": 2, "token": 3, "string": 4, "uri": 5, "composite": 3, "quantity": 6, "number": 6,
                "date": 7, "lastUpdated": 8}


def _driving_order(clauses: list[Clause]) -> list[Clause]:
    def rank(c: Clause) -> int:
        if c.modifier == "not" or c.missing is not None:
            return 99
        if c.chain is not None:
            return 5
        return _SELECTIVITY.get(c.type, 9)

    return sorted(clauses, key=rank)


def where_fragment(query: SearchQuery, alias: str = "r") -> Fragment:
    parts = [Fragment(f"{alias}.deleted = 0")]
    if query.resource_type is not None:
        parts.insert(0, Fragment(f"{alias}.res_type = ?", [query.resource_type]))
    for i, clause in enumerate(_driving_order(query.clauses)):
        parts.append(clause_fragment(clause, query.resource_type or "", alias, drive=i == 0))
    return Fragment(" AND ".join(p.sql for p in parts), [x for p in parts for x in p.params])


_SORT_COLUMN = {
    "string": ("sp_string", "value_norm", "value_norm"),
    "token": ("sp_token", "code", "code"),
    "date": ("sp_date", "lo", "hi"),
    "number": ("sp_number", "value", "value"),
    "quantity": ("sp_quantity", "value", "value"),
    "uri": ("sp_uri", "uri", "uri"),
}


def order_fragment(query: SearchQuery, alias: str = "r") -> Fragment:
    terms: list[str] = []
    params: list[Any] = []
    for keys, ptype, desc in query.sort:
        direction = "DESC" if desc else "ASC"
        if ptype == "_id":
            terms.append(f"{alias}.res_id {direction}")
            continue
        if ptype == "_lastUpdated":
            terms.append(f"{alias}.lu {direction}")
            continue
        table, asc_col, desc_col = _SORT_COLUMN[ptype]
        agg = f"MAX({desc_col})" if desc else f"MIN({asc_col})"
        on_keys = "s.key = ?" if len(keys) == 1 else f"s.key IN ({', '.join('?' for _ in keys)})"
        expr = f"(SELECT {agg} FROM {table} s WHERE s.rid = {alias}.rid AND {on_keys})"
        # resources without a value sort last either way, the same on both engines
        terms.append(f"({expr} IS NULL) ASC")
        terms.append(f"{expr} {direction}")
        params.extend([*keys, *keys])
    terms.append(f"{alias}.rid ASC")
    return Fragment(", ".join(terms), params)
