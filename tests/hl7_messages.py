"""HL7 v2 messages for the tests, built the way the admissions system and the lab send them."""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter

from rebond.hl7.mllp import END, START, ack_code

IPP = "GHR&1.2.250.1.999.1.1&ISO"
VISIT = "GHR&1.2.250.1.999.1.2&ISO"


def msh(kind: str, control: str, *, charset: str = "UNICODE UTF-8", sender: str = "GAM", enhanced: bool = False) -> str:
    return f"MSH|^~\\&|{sender}|H1|REBOND|GHR|20261123101500||{kind}|{control}|P|2.5|||{'AL' if enhanced else ''}||FRA|{charset}"


def pid(ipp: str, family: str = "LÉGER", given: str = "Hélène", born: str = "19470211", sex: str = "F") -> str:
    return f"PID|1||{ipp}^^^{IPP}^PI||{family}^{given}^^^^^L||{born}|{sex}"


def pv1(visit: str, bed: str = "", ward: str = "H1-CARDIO", admitted: str = "20261123101500") -> str:
    # PV1-7 the attending physician, PV1-19 the visit number, PV1-44 the admission
    fields = ["PV1", "1", "I", f"{ward}^{bed[:-1]}^{bed}^H1" if bed else ward, "", "", "", "10001^ROBIN^Jeanne^^^Dr"]
    fields += [""] * 11 + [f"{visit}^^^{VISIT}^VN"]
    fields += [""] * (44 - len(fields)) + [admitted]
    return "|".join(fields)


def adt(trigger: str, control: str, ipp: str, visit: str, *, bed: str = "", at: str = "20261123101500", extra: str = "",
        family: str = "LÉGER") -> bytes:
    segments = [msh(f"ADT^{trigger}^ADT_{trigger}", control), f"EVN||{at}", pid(ipp, family=family), pv1(visit, bed),
                f"ZBE|MV{control}|{at}||INSERT|N"]
    if extra:
        segments.append(extra)
    return ("\r".join(segments) + "\r").encode()


def oru(control: str, ipp: str, filler: str, *, potassium: str = "6,4", flag: str = "HH", status: str = "F", visit: str = "",
        charset: str = "UNICODE UTF-8", family: str = "LÉGER", enhanced: bool = False, orderer: str = "") -> bytes:
    """A potassium, a creatinine and an aspect; `orderer`: ORC-12, the physician who ordered it (XCN)."""
    segments = [msh("ORU^R01^ORU_R01", control, charset=charset, sender="SIL", enhanced=enhanced), pid(ipp, family=family)]
    if visit:
        segments.append(f"PV1|1|I|||||||||||||||||{visit}^^^{VISIT}^VN")
    segments += [f"ORC|RE|P{filler}|{filler}" + ("|" * 9 + orderer if orderer else ""),
                 f"OBR|1|P{filler}|{filler}|24326-1^Ionogramme^LN|||20261123100000|||||||||||||||20261123111000|||{status}",
                 f"OBX|1|NM|2823-3^Potassium^LN||{potassium}|mmol/L|3.5-5.0|{flag}|||{status}|||20261123110000",
                 "NTE|1||Contrôle sur nouveau prélèvement",
                 f"OBX|2|SN|2160-0^Créatinine^LN||<^30|umol/L|60-110|L|||{status}",
                 f"OBX|3|ST|8251-1^Aspect^LN||Hémolysé||||||{status}"]
    return ("\r".join(segments) + "\r").encode("latin-1" if charset == "8859/1" else "utf-8")


def read_ack(conn: socket.socket) -> bytes:
    """Read from a connection until an acknowledgement's frame ends."""
    data = b""
    while END not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the listener closed the connection")
        data += chunk
    return data


class Sender(threading.Thread):
    """An analyzer chain's interface: results `K{n}-{i}`, one at a time, each re-sent until acknowledged (AA), after a
    pause when refused for now (AE) or when the connection fails, reconnecting as needed; `stop` ends it early."""

    def __init__(self, n: int, port: int, count: int, *, seconds: float = 240) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.messages = [(f"K{n}-{i}", oru(f"K{n}-{i}", f"93{n:03d}{i:04d}", f"FK{n}-{i}")) for i in range(count)]
        self.acked: list[str] = []
        self.acked_at: list[float] = []  # time.monotonic() of each acknowledgement
        self.answers: Counter[str] = Counter()
        self.resends = 0
        self.seconds = seconds
        self.stop = threading.Event()

    def run(self) -> None:
        conn: socket.socket | None = None
        deadline = time.monotonic() + self.seconds
        for control, message in self.messages:
            while time.monotonic() < deadline and not self.stop.is_set():
                try:
                    if conn is None:
                        conn = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                    conn.sendall(START + message + END)
                    code = ack_code(read_ack(conn))
                    self.answers[code] += 1
                    if code == "AA":
                        self.acked.append(control)
                        self.acked_at.append(time.monotonic())
                        break
                except OSError:
                    if conn is not None:
                        conn.close()
                    conn = None
                    self.answers["connection lost"] += 1
                self.resends += 1
                time.sleep(0.2)
            else:
                break
        if conn is not None:
            conn.close()
