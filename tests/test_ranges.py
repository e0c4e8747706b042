"""Properties of the ranges that date, number and quantity search compare against."""
from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from rebond.store.indexing import date_range, normalize_text, number_range

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


@given(st.text(min_size=1, max_size=30))
def test_normalized_text_is_stable(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once
