"""Translations and local formats: French by default, English one click away.

Messages are written in English in the code and templates, extracted with Babel
(`make messages`) into `locales/<lang>/LC_MESSAGES/rebond.po`, and read from the .po
file at start-up, so there is no compiled file to keep in step.
"""
from __future__ import annotations

import datetime as dt
import functools
import gettext
import io
from pathlib import Path
from typing import Any

from babel import Locale
from babel.dates import format_date, format_datetime, format_time
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_decimal

from rebond.clinical.conventions import HOSPITAL_TZ

LANGUAGES = ("fr", "en")
DEFAULT_LANGUAGE = "fr"
LOCALES_DIR = Path(__file__).parent / "locales"


@functools.cache
def _catalog(language: str) -> gettext.NullTranslations:
    """The language's .po, compiled in memory into standard gettext translations (plural rules included)."""
    path = LOCALES_DIR / language / "LC_MESSAGES" / "rebond.po"
    if not path.exists():
        return gettext.NullTranslations()
    with path.open("rb") as f:
        catalog = read_po(f, locale=language)
    compiled = io.BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    return gettext.GNUTranslations(compiled)


class Translator:
    """gettext for one language, and the dates and numbers written the way that language writes them."""

    def __init__(self, language: str) -> None:
        self.language = language if language in LANGUAGES else DEFAULT_LANGUAGE
        self.locale = Locale.parse(self.language)
        self._messages = _catalog(self.language)

    def gettext(self, message: str, **values: Any) -> str:
        text = self._messages.gettext(message)
        return text % values if values else text

    def ngettext(self, singular: str, plural: str, n: int, **values: Any) -> str:
        return self._messages.ngettext(singular, plural, n) % {"num": n, **values}

    def date(self, value: dt.date | dt.datetime | None, style: str = "medium") -> str:
        if value is None:
            return "—"
        if isinstance(value, dt.datetime):
            value = value.astimezone(HOSPITAL_TZ).date()
        return format_date(value, format="dd/MM/yyyy" if style == "short" else style, locale=self.locale)

    def datetime(self, value: dt.datetime | None, style: str = "short") -> str:
        if value is None:
            return "—"
        pattern = "dd/MM HH:mm" if style == "short" else "dd/MM/yyyy HH:mm"
        return format_datetime(value, pattern, tzinfo=HOSPITAL_TZ, locale=self.locale)

    def time(self, value: dt.datetime | None) -> str:
        return format_time(value, "HH:mm", tzinfo=HOSPITAL_TZ, locale=self.locale) if value else "—"

    def number(self, value: float | None, decimals: int | None = None) -> str:
        if value is None:
            return "—"
        pattern = None if decimals is None else ("#,##0" if decimals == 0 else "#,##0." + "0" * decimals)
        return format_decimal(value, format=pattern, locale=self.locale)

    def size(self, count: int | None) -> str:
        """A number of bytes as a person reads it: "12.3 GB", "640 MB" (powers of 1,024)."""
        if count is None:
            return "—"
        if count >= 1 << 30:
            return self.gettext("%(n)s GB", n=self.number(count / (1 << 30), 1))
        return self.gettext("%(n)s MB", n=self.number(count / (1 << 20), 0))

    def duration(self, value: dt.timedelta | None) -> str:
        """A delay in words: "40 s", "12 min", "2 h 05"."""
        if value is None:
            return "—"
        seconds = max(int(value.total_seconds()), 0)
        if seconds < 60:
            return self.gettext("%(n)s s", n=seconds)
        if seconds < 3600:
            return self.gettext("%(n)s min", n=seconds // 60)
        return self.gettext("%(h)s h %(m)s", h=seconds // 3600, m=f"{seconds % 3600 // 60:02d}")

    def since(self, value: dt.datetime | None, now: dt.datetime) -> str:
        """How long ago, in words ("3 h", "2 d")."""
        if value is None:
            return "—"
        minutes = int((now - value).total_seconds() // 60)
        if minutes < 60:
            return self.gettext("%(n)s min", n=max(minutes, 0))
        if minutes < 48 * 60:
            return self.gettext("%(n)s h", n=minutes // 60)
        return self.gettext("%(n)s d", n=minutes // (24 * 60))


@functools.cache
def translator(language: str) -> Translator:
    return Translator(language)


def N_(message: str) -> str:
    """Marks a message for extraction whose text is chosen at run time (a role, a dose state)."""
    return message


#: messages the templates translate from a value: roles, dose states, the vital signs of the bedside form
RUNTIME_MESSAGES = (
    N_("nurse"), N_("physician"), N_("lab"), N_("pharmacist"), N_("admin"), N_("crisis"),
    N_("given"), N_("not-given"), N_("late"), N_("due"), N_("planned"),
    N_("Progress note"), N_("Nursing note"),
    N_("Heart rate"), N_("Systolic blood pressure"), N_("Diastolic blood pressure"), N_("Temperature"),
    N_("Oxygen saturation"), N_("Respiratory rate"),
    # the disks of the status page: what they hold, their level (rebond/disk.py)
    N_("store"), N_("downtime packs"), N_("ok"), N_("low"), N_("critical"), N_("full"), N_("unknown"),
)
