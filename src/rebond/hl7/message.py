"""Reading an HL7 v2 message: its character set (MSH-18), its segments and fields, and writing the acknowledgement."""
from __future__ import annotations

import datetime as dt
import functools
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hl7.util import unescape

from rebond.clinical.conventions import HOSPITAL_TZ
from rebond.pickled import by_fields

#: MSH-18 values and the Python codec each names; no MSH-18 means ASCII by the standard, read as UTF-8 here
CHARSETS = {
    "": "utf-8", "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "UTF-8": "utf-8", "UNICODE": "utf-8",
    "8859/1": "iso-8859-1", "8859/15": "iso-8859-15", "ISO-8859-1": "iso-8859-1", "WINDOWS-1252": "cp1252",
}
_MSH18 = re.compile(rb"^MSH(.)")


class MessageError(ValueError):
    """A message that cannot be processed as sent: answered AR (or CR) with an ERR segment, kept as a dead letter.

    `code` is an HL7 table 0357 error code: 100 segment sequence, 101 required field missing,
    102 data type error, 103 table value not found, 200 unsupported message type, 207 application error.
    """

    def __init__(self, text: str, *, code: int = 207, location: str = "") -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.location = location

    def __reduce__(self) -> tuple[Callable[[str, int, str], MessageError], tuple[str, int, str]]:
        """Pickled with its code and location (compiled, it keeps no instance dictionary for pickle to restore)."""
        return _message_error, (self.text, self.code, self.location)


def _message_error(text: str, code: int, location: str) -> MessageError:
    return MessageError(text, code=code, location=location)


@dataclass(unsafe_hash=True)
class Header:
    """What MSH says: who sent it, its id, its type, how to answer. Never changed once made (not frozen only so that
    its `__init__` is compiled: store/draft.py NATIVE_INIT; hashed by its fields all the same)."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    control_id: str
    message_type: str  # ADT, ORU, …
    trigger: str  # A01, R01, …
    processing_id: str
    version: str
    charset: str  # MSH-18 as written
    accept_ack: str  # MSH-15: set means enhanced acknowledgement mode

    def __init__(self, sending_application: str, sending_facility: str, receiving_application: str,
                 receiving_facility: str, control_id: str, message_type: str, trigger: str, processing_id: str,
                 version: str, charset: str, accept_ack: str) -> None:
        self.sending_application = sending_application
        self.sending_facility = sending_facility
        self.receiving_application = receiving_application
        self.receiving_facility = receiving_facility
        self.control_id = control_id
        self.message_type = message_type
        self.trigger = trigger
        self.processing_id = processing_id
        self.version = version
        self.charset = charset
        self.accept_ack = accept_ack

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return by_fields(self)  # it goes with a draft to the intake writer

    @property
    def sender(self) -> str:
        return f"{self.sending_application}|{self.sending_facility}"


def charset_of(raw: bytes) -> str:
    """MSH-18, read from the bytes before decoding (MSH itself is ASCII)."""
    first = raw.split(b"\r", 1)[0]
    match = _MSH18.match(first)
    if not match:
        raise MessageError("the message does not start with an MSH segment", code=100, location="MSH")
    fields = first.split(match.group(1))
    return fields[17].split(b"^")[0].decode("ascii", "replace").strip() if len(fields) > 17 else ""


def decode(raw: bytes) -> tuple[str, str]:
    """The message as text and the MSH-18 it declared; MessageError when the bytes do not match it."""
    declared = charset_of(raw)
    codec = CHARSETS.get(declared.upper())
    if codec is None:
        raise MessageError(f"character set '{declared}' (MSH-18) is not supported: use UNICODE UTF-8 or 8859/1",
                           code=103, location="MSH-18")
    try:
        return raw.decode(codec), declared
    except UnicodeDecodeError as err:
        raise MessageError(f"the bytes are not valid {declared or 'UTF-8'} (MSH-18) at byte {err.start}", code=102,
                           location="MSH-18") from None


class _Delimiters:
    """The message's own delimiters (MSH-1 and MSH-2), in the form the `hl7` package's unescape reads."""

    __slots__ = ("esc", "separators")

    def __init__(self, field: str, encoding: str) -> None:
        encoding = (encoding + "^~\\&"[len(encoding):])[:4]  # component, repetition, escape, subcomponent
        self.esc = encoding[2]
        self.separators = "\r" + field + encoding[1] + encoding[0] + encoding[3]


class Message:
    """A message cut into segments and fields, with forgiving accessors: a missing field reads as ''.

    Cutting is plain splitting on the message's own delimiters, done once per segment and per
    field when first read; HL7 escapes are undone by the `hl7` package. (Its full parse tree cost
    a quarter of the time spent on each lab result.)
    """

    def __init__(self, text: str) -> None:
        text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
        if not text.startswith("MSH") or len(text) < 8:
            raise MessageError("the message does not start with an MSH segment", code=100, location="MSH")
        field = text[3]
        if field.isalnum() or field in "\r ":
            raise MessageError(f"'{field}' cannot be the field separator (MSH-1)", code=100, location="MSH-1")
        encoding = text[4:].split(field, 1)[0]
        if not 2 <= len(encoding) <= 5 or field in encoding:
            raise MessageError("MSH-2 (encoding characters) is malformed", code=100, location="MSH-2")
        self.delimiters = _Delimiters(field, encoding)
        self.lines = [line for line in text.split("\r") if line.strip()]
        self.names = [line.split(field, 1)[0] for line in self.lines]
        for name in self.names:
            if not (len(name) == 3 and name.isalnum() and name.isupper()):
                raise MessageError(f"'{name[:20]}' is not a segment name", code=100)

    def segments(self, name: str) -> list[Segment]:
        counter = itertools.count(1)
        return [Segment(self, name, next(counter), line) for n, line in zip(self.names, self.lines, strict=True) if n == name]

    def segment(self, name: str) -> Segment | None:
        found = self.segments(name)
        return found[0] if found else None

    def require(self, name: str) -> Segment:
        found = self.segment(name)
        if found is None:
            raise MessageError(f"the {name} segment is missing", code=100, location=name)
        return found

    def ordered(self) -> list[Segment]:
        """Every segment in message order (for groups: OBR followed by its OBX and NTE)."""
        seen: dict[str, int] = {}
        out = []
        for name, line in zip(self.names, self.lines, strict=True):
            seen[name] = seen.get(name, 0) + 1
            out.append(Segment(self, name, seen[name], line))
        return out

    def header(self) -> Header:
        msh = self.require("MSH")
        header = Header(
            msh.get(3), msh.get(4), msh.get(5), msh.get(6), msh.get(10), msh.get(9, 1), msh.get(9, 2), msh.get(11, 1),
            msh.get(12, 1), msh.get(18), msh.get(15),
        )
        if not header.control_id:
            raise MessageError("MSH-10 (message control id) is empty", code=101, location="MSH-10")
        if not header.message_type:
            raise MessageError("MSH-9 (message type) is empty", code=101, location="MSH-9")
        return header


class Segment:
    """One segment; a field is read as field → repetition → component → subcomponent, escapes undone."""

    def __init__(self, message: Message, name: str, occurrence: int, line: str) -> None:
        self.message = message
        self.name = name
        self.occurrence = occurrence
        delimiters = message.delimiters
        fields = line.split(delimiters.separators[1])
        if name == "MSH":  # MSH-1 is the field separator itself, MSH-2 the encoding characters
            fields.insert(1, delimiters.separators[1])
        self.fields = fields

    def _field(self, field: int) -> str:
        return self.fields[field] if 0 < field < len(self.fields) else ""

    def get(self, field: int, component: int = 1, subcomponent: int = 1, repetition: int = 1) -> str:
        value = self._field(field)
        if self.name == "MSH" and field in (1, 2):
            return value
        if value:
            separators = self.message.delimiters.separators
            value = _part(_part(_part(value, separators[2], repetition), separators[3], component), separators[4], subcomponent)
            if self.message.delimiters.esc in value:
                value = str(unescape(self.message.delimiters, value))
        return value.strip()

    def repetitions(self, field: int) -> int:
        value = self._field(field)
        if field >= len(self.fields):
            return 0
        return max(1, len(value.split(self.message.delimiters.separators[2]))) if value else 1

    def where(self, field: int) -> str:
        return f"{self.name}-{field}"


def _part(value: str, separator: str, index: int) -> str:
    """Part `index` (from 1) of a value split by one separator; a value without it is its own first part."""
    if separator in value:
        parts = value.split(separator)
        return parts[index - 1] if 0 < index <= len(parts) else ""
    return value if index == 1 else ""  # most values have no repetitions, components or subcomponents: split nothing


_HL7_TIME = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?")


@functools.lru_cache(maxsize=256)
def hl7_time(value: str) -> dt.datetime | None:
    """YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]; without a zone, the hospital's time (Europe/Paris).

    Kept for the last few hundred values (a datetime cannot change): a lab panel gives the same moment in MSH-7,
    OBR-7, OBR-22 and each OBX-14 and OBX-19, and each reading took 2.5 µs. What is refused is read again."""
    value = value.strip()
    if not value:
        return None
    match = _HL7_TIME.fullmatch(value)
    if not match:
        raise MessageError(f"'{value}' is not an HL7 date/time", code=102)
    year, month, day, hour, minute, second, zone = match.groups()
    try:
        moment = dt.datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0), int(second or 0))
    except ValueError:
        raise MessageError(f"'{value}' is not a valid date/time", code=102) from None
    if zone:
        offset = dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5])) * (1 if zone[0] == "+" else -1)
        return moment.replace(tzinfo=dt.timezone(offset))
    return moment.replace(tzinfo=HOSPITAL_TZ)


def hl7_now() -> str:
    return dt.datetime.now(HOSPITAL_TZ).strftime("%Y%m%d%H%M%S%z")


def acknowledgement(header: Header | None, code: str, text: str = "", *, error: MessageError | None = None,
                    control_id: str = "") -> str:
    """The ACK for a message: MSA with `code` (AA/AE/AR, or CA/CE/CR), and ERR when refused."""
    def clean(value: str) -> str:  # HL7 escapes, so a reason may quote the message's own delimiters
        value = value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("~", "\\R\\")
        return value.replace("&", "\\T\\").replace("\r", " ").replace("\n", " ")

    if header is not None:
        msh = (f"MSH|^~\\&|{header.receiving_application or 'REBOND'}|{header.receiving_facility}|{header.sending_application}|"
               f"{header.sending_facility}|{hl7_now()}||ACK^{header.trigger}^ACK|ACK{clean(header.control_id)}|"
               f"{header.processing_id or 'P'}|{header.version or '2.5'}||||||{header.charset}")
        acked = header.control_id
    else:
        msh = f"MSH|^~\\&|REBOND||||{hl7_now()}||ACK^^ACK|ACK{control_id or 'UNKNOWN'}|P|2.5"
        acked = control_id
    segments = [msh, f"MSA|{code}|{clean(acked)}|{clean(text)[:200]}"]
    if error is not None:
        segment, _, field = error.location.partition("-")
        location = f"{segment}^1^{field}" if field else segment  # ERL: segment^sequence^field
        name = _ERROR_NAMES.get(error.code, "Application internal error")
        segments.append(f"ERR||{location}|{error.code}^{name}^HL70357|E||||{clean(error.text)[:200]}")
    return "\r".join(segments) + "\r"


_ERROR_NAMES = {100: "Segment sequence error", 101: "Required field missing", 102: "Data type error", 103: "Table value not found",
                200: "Unsupported message type", 201: "Unsupported event code", 207: "Application internal error"}
