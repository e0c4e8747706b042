"""Every message of the web app has its French translation, and placeholders survive translation."""
from __future__ import annotations

import re
from pathlib import Path

from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

ROOT = Path(__file__).resolve().parents[1]
CATALOG = ROOT / "src/rebond/web/locales/fr/LC_MESSAGES/rebond.po"
KEYWORDS = {"_": None, "gettext": None, "N_": None, "ngettext": (1, 2)}


def _messages() -> set[str]:
    found: set[str] = set()
    for folder, mapping in (("src/rebond/web", [("**.py", "python"), ("templates/**.html", "jinja2")]),
                            ("src/rebond", [("app.py", "python")]), ("src/rebond/site", [("**.py", "python")]),
                            ("src/rebond/downtime", [("**.py", "python")])):
        for _file, _line, message, _comments, _context in extract_from_dir(ROOT / folder, mapping, keywords=KEYWORDS):
            found.add(message[0] if isinstance(message, tuple) else message)
    return found


def test_every_message_is_translated_into_french() -> None:
    with CATALOG.open("rb") as f:
        catalog = read_po(f)
    translated = {m.id[0] if isinstance(m.id, tuple) else m.id: m.string for m in catalog if m.id}
    messages = _messages()
    assert len(messages) > 100
    missing = sorted(m for m in messages if not translated.get(m))
    assert not missing, f"run `make messages` and translate: {missing}"


def test_placeholders_are_kept_in_translations() -> None:
    with CATALOG.open("rb") as f:
        catalog = read_po(f)
    for message in catalog:
        if not message.id:
            continue
        ids = message.id if isinstance(message.id, tuple) else (message.id,)
        strings = message.string if isinstance(message.string, tuple) else (message.string,)
        wanted = set(re.findall(r"%\(\w+\)s", ids[0]))
        for s in strings:
            assert set(re.findall(r"%\(\w+\)s", s)) == wanted, message.id
