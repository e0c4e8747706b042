"""Properties of the ranges that date, number and quantity search compare against."""
from __future__ import annotations

import datetime as dt
from decimal import Decimal, localcontext

from hypothesis import given
from hypothesis import strategies as st

from rebond.store.indexing import date_range, format_number, normalize_text, number_range

moments = st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2100, 12, 31), timezones=st.just(dt.UTC))


@given(moments)
def test_every_precision_of_a_moment_contains_it(moment: dt.datetime) -> None:
    epoch = moment.replace(microsecond=0).timestamp()
    forms = [moment.strftime("%Y"), moment.strftime("%Y-%m"), moment.strftime("%Y-%m-%d"),
             moment.strftime("%Y-%m-%dT%H:%M:%SZ"), moment.strftime("%Y-%m-%dT%H:%M:%S+00:00")]
    widths = []
    for form in forms:
        rng = date_range(form)
        assert rng is not None, form
        assert rng[0] <= epoch < rng[1], form
        widths.append(rng[1] - rng[0])
    assert widths == sorted(widths, reverse=True)  # each finer form narrows the range


@given(moments, st.integers(min_value=-14, max_value=14))
def test_a_zone_offset_names_the_same_instant(moment: dt.datetime, hours: int) -> None:
    zone = dt.timezone(dt.timedelta(hours=hours))
    local = moment.astimezone(zone).replace(microsecond=0)
    rng = date_range(local.isoformat())
    assert rng is not None and rng[0] == local.timestamp()


@given(st.decimals(min_value=-10**6, max_value=10**6, places=3, allow_nan=False, allow_infinity=False))
def test_a_number_lies_inside_its_precision(value: object) -> None:
    rng = number_range(value)
    assert rng is not None
    lo, hi, v = rng
    assert lo < v < hi


@given(st.integers(min_value=-10**26 + 1, max_value=10**26 - 1), st.integers(min_value=0, max_value=12),
       st.sampled_from(["plain", "float", "exponent"]))
def test_a_number_s_range_is_its_exact_half_unit_either_side_rounded_once(digits: int, places: int, form: str) -> None:
    """Plain numbers take a quicker way than the decimal arithmetic: the same floats, to the last bit."""
    exact = Decimal(digits).scaleb(-places)
    text = {"plain": f"{exact:f}", "float": repr(float(exact)), "exponent": f"{exact:e}"}[form]
    value: object = float(exact) if form == "float" else text
    written = Decimal(text)
    assert isinstance(written.as_tuple().exponent, int)
    with localcontext() as ctx:
        ctx.prec = 60  # every digit kept: the range's ends exact before their one rounding
        half = Decimal(5).scaleb(written.as_tuple().exponent - 1)
        expected = (float(written - half), float(written + half), float(written))
    rng = number_range(value)
    assert rng is not None and [x.hex() for x in rng] == [x.hex() for x in expected], (text, rng, expected)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_composite_number_part_is_the_number_s_digits_without_exponent_or_trailing_zero(value: float) -> None:
    part = format_number(value)
    assert Decimal(part) == Decimal(str(value))  # the same number, exactly
    assert "e" not in part.lower() and not part.startswith("+")
    assert "." not in part or not part.endswith("0")
    assert ("." in part) == (Decimal(str(value)) != Decimal(str(value)).to_integral_value())


def test_what_is_not_a_number_has_no_range() -> None:
    for value in ("", "-", "abc", "1.2.3", "²", "NaN", "inf", True):
        assert number_range(value) is None, value
    assert number_range("1.") == (0.5, 1.5, 1.0) and number_range(".5") == (0.45, 0.55, 0.5)  # decimal's own reading


@given(st.text(min_size=1, max_size=30))
def test_normalized_text_is_stable(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once
