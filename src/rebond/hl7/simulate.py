"""`rebond hl7 simulate`: the traffic an admissions system and a lab analyzer chain send to the demo group.

Admissions (A01) of new patients into the demo's wards and beds, transfers (A02), discharges
(A03), and lab results (ORU^R01) for the admitted patients — some abnormal, a few critical, some
corrected later (OBR-25 C). Deterministic for a seed; IPPs start at 990000000 so they never meet the
demo's own patients.
"""
from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

from rebond.clinical.conventions import HOSPITAL_TZ
from rebond.seed.vocabulary import FAMILY_NAMES, GIVEN_FEMALE, GIVEN_MALE, LABS, SERVICES

IPP_AUTHORITY = "GHR&1.2.250.1.999.1.1&ISO"
VISIT_AUTHORITY = "GHR&1.2.250.1.999.1.2&ISO"
#: of the abnormal results, those critical (OBX-8 HH): about one lab panel in fifty has one
CRITICAL_SHARE = 0.03


@dataclass
class _Stay:
    ipp: str
    family: str
    given: str
    sex: str
    born: str
    visit: str
    ward: str
    bed: str
    orders: list[tuple[str, list[str]]]  # filler number, the OBX lines sent


def _hl7_now(moment: dt.datetime) -> str:
    return moment.astimezone(HOSPITAL_TZ).strftime("%Y%m%d%H%M%S")


class Traffic:
    def __init__(self, seed: int = 1, hospitals: int = 3, wards_per_hospital: int = 6) -> None:
        self.rng = random.Random(seed)
        self.wards = [f"H{h + 1}-{SERVICES[w % len(SERVICES)][0]}" for h in range(hospitals) for w in range(wards_per_hospital)]
        self.stays: list[_Stay] = []
        self.next_ipp = 990_000_000 + seed * 100_000
        self.sent = 0
        # control ids are unique per run: a second run of the same seed is new traffic, not re-sends
        self.run = format(time.time_ns() // 1_000_000, "x")

    def _control(self, prefix: str) -> str:
        self.sent += 1
        return f"{prefix}{self.run}-{self.sent}"

    def _pid(self, stay: _Stay) -> str:
        return (f"PID|1||{stay.ipp}^^^{IPP_AUTHORITY}^PI||{stay.family.upper()}^{stay.given}^^^^^L||{stay.born}|{stay.sex}|||"
                f"1 rue de la Paix^^Paris^^75002^FRA")

    def _pv1(self, stay: _Stay, at: str, *, admit: bool = False) -> str:
        room = stay.bed[:-1]
        # PV1-7 the attending physician, PV1-19 the visit number
        fields = ["PV1", "1", "I", f"{stay.ward}^{room}^{stay.bed}^{stay.ward.split('-')[0]}", "", "", "",
                  "10001^BERNARD^Claire^^^Dr"] + [""] * 11 + [f"{stay.visit}^^^{VISIT_AUTHORITY}^VN"]
        fields += [""] * (44 - len(fields))
        fields.append(at if admit else "")
        return "|".join(fields)

    def admission(self, now: dt.datetime) -> str:
        female = self.rng.random() < 0.5
        self.next_ipp += 1
        ward = self.rng.choice(self.wards)
        bed = f"{ward}-{self.rng.randint(1, 12):02d}{self.rng.choice('AB')}"
        born = (now - dt.timedelta(days=self.rng.randint(20, 95) * 365 + self.rng.randint(0, 364))).strftime("%Y%m%d")
        stay = _Stay(str(self.next_ipp), self.rng.choice(FAMILY_NAMES), self.rng.choice(GIVEN_FEMALE if female else GIVEN_MALE),
                     "F" if female else "M", born, f"S{self.next_ipp}", ward, bed, [])
        self.stays.append(stay)
        at = _hl7_now(now)
        control = self._control("ADT")
        return "\r".join([
            f"MSH|^~\\&|GAM|{ward.split('-')[0]}|REBOND|GHR|{at}||ADT^A01^ADT_A01|{control}|P|2.5|||||FRA|UNICODE UTF-8",
            f"EVN||{at}", self._pid(stay), self._pv1(stay, at, admit=True), f"ZBE|MV{control}|{at}||INSERT|N"]) + "\r"

    def transfer(self, now: dt.datetime) -> str:
        stay = self.rng.choice(self.stays)
        stay.bed = f"{stay.ward}-{self.rng.randint(1, 12):02d}{self.rng.choice('AB')}"
        at = _hl7_now(now)
        control = self._control("ADT")
        return "\r".join([
            f"MSH|^~\\&|GAM|{stay.ward.split('-')[0]}|REBOND|GHR|{at}||ADT^A02^ADT_A02|{control}|P|2.5|||||FRA|UNICODE UTF-8",
            f"EVN||{at}", self._pid(stay), self._pv1(stay, at), f"ZBE|MV{control}|{at}||INSERT|N"]) + "\r"

    def discharge(self, now: dt.datetime) -> str:
        stay = self.stays.pop(self.rng.randrange(len(self.stays)))
        at = _hl7_now(now)
        control = self._control("ADT")
        return "\r".join([
            f"MSH|^~\\&|GAM|{stay.ward.split('-')[0]}|REBOND|GHR|{at}||ADT^A03^ADT_A03|{control}|P|2.5|||||FRA|UNICODE UTF-8",
            f"EVN||{at}", self._pid(stay), self._pv1(stay, at), f"ZBE|MV{control}|{at}||INSERT|N"]) + "\r"

    def result(self, now: dt.datetime, *, stay: _Stay | None = None) -> str:
        stay = stay or self.rng.choice(self.stays)
        at = _hl7_now(now)
        control = self._control("LAB")
        if stay.orders and self.rng.random() < 0.05:  # a corrected result: the same order, status C
            filler, lines = self.rng.choice(stay.orders)
            lines = [line.replace("|||F|||", "|||C|||") for line in lines]
            status = "C"
        else:
            filler = f"L{control}"
            lines = []
            for n, test in enumerate(self.rng.sample(LABS, k=self.rng.randint(2, 8)), start=1):
                abnormal = self.rng.random() < 0.12
                value = test.high + abs(self.rng.gauss(test.spread, test.spread / 2)) if abnormal else \
                    min(test.high, max(test.low, self.rng.gauss(test.typical, test.spread / 2)))
                flag = "H" if value > test.high else "L" if value < test.low else "N"
                if abnormal and self.rng.random() < CRITICAL_SHARE:  # far out: the lab calls the ward (hl7/critical.py)
                    value, flag = test.high + 4 * test.spread, "HH"
                lines.append(f"OBX|{n}|NM|{test.loinc}^{test.name}^LN||{round(value, test.decimals):g}|{test.unit}|"
                             f"{test.low:g}-{test.high:g}|{flag}|||F|||{at}")
            stay.orders.append((filler, lines))
            status = "F"
        return "\r".join([
            f"MSH|^~\\&|SIL|{stay.ward.split('-')[0]}|REBOND|GHR|{at}||ORU^R01^ORU_R01|{control}|P|2.5|||||FRA|UNICODE UTF-8",
            self._pid(stay), f"PV1|1|I|||||||||||||||||{stay.visit}^^^{VISIT_AUTHORITY}^VN",
            f"ORC|RE|P{filler}|{filler}", f"OBR|1|P{filler}|{filler}|24323-8^Bilan biologique^LN|||{at}|||||||||||||||{at}|||{status}",
            *lines]) + "\r"

    def messages(self, count: int, start: dt.datetime | None = None) -> Iterator[str]:
        """`count` messages as a day of a hospital group would send them: mostly results, some movements."""
        moment = start or dt.datetime.now(dt.UTC)
        for _ in range(count):
            moment += dt.timedelta(seconds=self.rng.randint(1, 20))
            roll = self.rng.random()
            if len(self.stays) < 20 or roll < 0.10:
                yield self.admission(moment)
            elif roll < 0.14:
                yield self.transfer(moment)
            elif roll < 0.18 and len(self.stays) > 20:
                yield self.discharge(moment)
            else:
                yield self.result(moment)
