"""The install's C parts: the hot modules compiled with mypyc (setup.py), and what crosses processes from them."""
from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import re
from pathlib import Path

import pytest

from rebond.fhir.model import Issue
from rebond.fhir.search import parse_search
from rebond.hl7.intake import Answer
from rebond.hl7.message import Message, MessageError

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def compiled_sources() -> list[str]:
    found = re.search(r"COMPILED = \[(.*?)\]", SETUP.read_text(), re.S)
    assert found, "setup.py lists the modules it compiles"
    return re.findall(r'"src/(rebond/[\w/]+)\.py"', found.group(1))


@pytest.mark.skipif(bool(os.environ.get("REBOND_PURE_PYTHON")), reason="installed as plain Python on purpose")
def test_the_hot_modules_run_compiled() -> None:
    """`make test` installs with gcc and Python's headers: a build that fell back to plain Python (a type error
    mypyc refused, say) would only show as a slower machine, so it is caught here."""
    sources = compiled_sources()
    assert "rebond/store/indexing" in sources and "rebond/hl7/mapping" in sources
    for source in sources:
        module = importlib.import_module(source.replace("/", "."))
        assert module.__file__ is not None and module.__file__.endswith(".so"), f"{source} runs as plain Python"


def test_what_goes_to_the_intake_writer_comes_back_whole() -> None:
    header = Message("MSH|^~\\&|LAB|H1|REBOND|H1|20261202101010||ORU^R01|C42|P|2.5|||AL|||8859/1").header()
    assert pickle.loads(pickle.dumps(header)) == header and header.control_id == "C42" and header.charset == "8859/1"
    error = pickle.loads(pickle.dumps(MessageError("OBX-8 flag 'Q' is not in table 0078", code=103, location="OBX-8")))
    assert (error.text, error.code, error.location) == ("OBX-8 flag 'Q' is not in table 0078", 103, "OBX-8")
    assert pickle.loads(pickle.dumps(Issue("Patient.birthDate", "'1947-13' is not a valid date"))) == Issue(
        "Patient.birthDate", "'1947-13' is not a valid date")
    answer = Answer(b"MSH|^~\\&|REBOND\rMSA|AA|C42", "AA", 7, redone=True)
    assert pickle.loads(pickle.dumps(answer)) == answer
    query = parse_search("Patient", [("identifier", "urn:oid:1.2.250.1.999.1.1|900000001"), ("birthdate", "ge1947")])
    assert pickle.loads(pickle.dumps(query)) == query


def _hand_written_inits() -> list[type]:
    from rebond.fhir.search import Clause, SearchQuery, Value
    from rebond.hl7.intake import Answer, Prepared
    from rebond.hl7.mapping import Applied
    from rebond.hl7.message import Header
    from rebond.store.base import InboxMessage, Stored, WriteResult
    from rebond.store.draft import PlannedWrite, SentWrite
    from rebond.store.indexing import IndexRows
    from rebond.store.query import Fragment

    return [PlannedWrite, SentWrite, IndexRows, Fragment, Clause, SearchQuery, Value, Header, Answer, Applied, Prepared,
            Stored, WriteResult, InboxMessage]


@pytest.mark.parametrize("cls", _hand_written_inits(), ids=lambda cls: cls.__name__)
def test_a_dataclass_with_its_own_init_takes_its_fields_in_order_with_their_defaults(cls: type) -> None:
    """The dataclasses whose `__init__` is written by hand, to be compiled (store/draft.py NATIVE_INIT): a field added
    to one and not to its `__init__` would be left unset, or shift the fields after it."""
    fields = dataclasses.fields(cls)
    given = {f.name: _sample(cls, f.name, i) for i, f in enumerate(fields)}
    in_order = cls(*given.values())
    by_name = cls(**given)
    for field in fields:
        assert getattr(in_order, field.name) == given[field.name], field.name  # each told apart from the others
    assert by_name == in_order
    if cls.__name__ != "Prepared":  # goes to the intake writer packed (`Prepared.packed`), never pickled
        assert pickle.loads(pickle.dumps(in_order)) == in_order

    required = {f.name: given[f.name] for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    first, second = cls(**required), cls(**required)
    for field in fields:
        if field.default_factory is not dataclasses.MISSING:  # each instance its own
            assert getattr(first, field.name) == field.default_factory() and getattr(first, field.name) is not getattr(second, field.name)
        elif field.default is not dataclasses.MISSING:
            assert getattr(first, field.name) == field.default, field.name
    assert repr(first).startswith(f"{cls.__name__}(")


def _sample(cls: type, name: str, position: int) -> object:
    """A value for the field `name` of `cls`, told apart from the other fields' values (by name: mypyc keeps a
    compiled field's type only as a class, `type` for a union)."""
    from rebond.fhir.searchparams import lookup
    from rebond.hl7.mapping import Applied
    from rebond.hl7.message import Header, Message
    from rebond.store.base import Stored
    from rebond.store.draft import Draft
    from rebond.store.indexing import IndexRows

    if cls is Header:  # every field a text
        return f"text {position}"
    lists = ("string", "token", "date", "number", "quantity", "reference", "uri", "composite", "clauses", "sort",
             "includes", "elements", "ignored", "params", "written", "notes")
    by_name: dict[str, object] = {
        "rows": IndexRows(), "stored": Stored("Patient", "p1", 1, 1.5, False, b"{}"), "param": lookup("Patient", "identifier"),
        "resource": {"resourceType": "Observation"}, "meta": {"tag": [position]}, "content": b"{}", "body": b"{}",
        "values": [], "chain": None, "has": None, "missing": True, "deleted": True, "created": True, "unchanged": True,
        "any_system": False, "last_updated": 0.5 + position, "lo": 0.5 + position, "hi": 1.5 + position,
        "version": 1000 + position, "base_version": 1000 + position, "seq": 1000 + position, "count": 1000 + position,
        "offset": 1000 + position, "message_id": 1000 + position, "redone": True, "ack": b"MSH|^~\\&|REBOND",
        "raw": b"MSH|^~\\&|LAB" if cls.__name__ == "InboxMessage" else f"text {position}", "received": 0.5 + position,
        "updated": 1.5 + position, "draft": Draft(None), "applied": Applied(["Observation/o1"]),
        "header": Message("MSH|^~\\&|LAB|H1|REBOND|H1|20261202101010||ORU^R01|C42|P|2.5").header(),
    }
    if name in lists:
        return [(f"item {position}",)]
    return by_name.get(name, f"text {position}")
