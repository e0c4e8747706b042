"""The install's C parts: the hot modules compiled with mypyc (setup.py), and what crosses processes from them."""
from __future__ import annotations

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
