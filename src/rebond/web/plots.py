"""Trend plots drawn as inline SVG on the server: no script, readable on an old PC and printable."""
from __future__ import annotations

import datetime as dt
from html import escape

from markupsafe import Markup

from rebond.clinical.chart import Series
from rebond.web.i18n import Translator

#: UCUM codes as a French ward writes them
_UNITS = {"Cel": "°C", "mm[Hg]": "mmHg", "10*9/L": "G/L", "10*12/L": "T/L", "/min": "/min", "umol/L": "µmol/L"}


def human_unit(unit: str) -> str:
    return _UNITS.get(unit, unit)


#: a sparkline a few centimetres wide shows no more points than this
SPARKLINE_POINTS = 120


def _thinned(points: list[tuple[dt.datetime, float, bool]], buckets: int) -> list[tuple[dt.datetime, float, bool]]:
    """The lowest and highest point of each stretch of time, so no peak is lost when a year is drawn small."""
    size = len(points) / buckets
    out: list[tuple[dt.datetime, float, bool]] = []
    for b in range(buckets):
        chunk = points[int(b * size):int((b + 1) * size)]
        if chunk:
            extremes = {min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])}
            out.extend(sorted(extremes, key=lambda p: p[0]))
    return out


def _scale(lo: float, hi: float, out_lo: float, out_hi: float) -> tuple[float, float]:
    span = hi - lo or 1.0
    factor = (out_hi - out_lo) / span
    return factor, out_lo - lo * factor


def trend_svg(series: Series, t: Translator, *, width: int = 560, height: int = 160, compact: bool = False) -> Markup:
    """A line of the values over time, the reference range as a band, abnormal values as red dots."""
    points = [(p.when, p.value, p.abnormal) for p in series.points if p.when is not None and p.value is not None]
    if not points:
        return Markup("")
    if compact and len(points) > SPARKLINE_POINTS:
        points = _thinned(points, SPARKLINE_POINTS // 2)
    pad_left, pad_right, pad_top, pad_bottom = (4, 4, 4, 4) if compact else (44, 12, 10, 24)
    values = [v for _, v, _ in points] + [x for x in (series.low, series.high) if x is not None]
    lo, hi = min(values), max(values)
    margin = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - margin, hi + margin
    first, last = points[0][0], points[-1][0]
    if last == first:
        first -= dt.timedelta(hours=12)
        last += dt.timedelta(hours=12)
    x_factor, x_offset = _scale(first.timestamp(), last.timestamp(), pad_left, width - pad_right)
    y_factor, y_offset = _scale(lo, hi, height - pad_bottom, pad_top)

    def x(moment: dt.datetime) -> float:
        return round(moment.timestamp() * x_factor + x_offset, 1)

    def y(value: float) -> float:
        return round(value * y_factor + y_offset, 1)

    label = t.gettext("%(name)s over time, latest %(value)s %(unit)s", name=series.name, value=t.number(points[-1][1]),
                      unit=human_unit(series.unit))
    # sparklines stretch to their box; a full plot keeps its proportions so its labels stay legible
    aspect = ' preserveAspectRatio="none"' if compact else ""
    parts = [f'<svg class="trend{" compact" if compact else ""}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(label)}"{aspect}><title>{escape(label)}</title>']
    if series.low is not None and series.high is not None:
        top, bottom = y(series.high), y(series.low)
        parts.append(f'<rect class="range" x="{pad_left}" y="{top}" width="{width - pad_left - pad_right}" height="{round(bottom - top, 1)}"/>')
    if not compact:
        for value in (v for v in (series.low, series.high) if v is not None):
            parts.append(f'<text class="axis" x="{pad_left - 4}" y="{y(value) + 4}" text-anchor="end">{escape(t.number(value))}</text>')
        days = (last - first).days
        step = max(1, days // 6) if days else 0
        tick = first
        while step and tick <= last:
            parts.append(f'<text class="axis" x="{x(tick)}" y="{height - 6}" text-anchor="middle">{escape(t.date(tick, "short")[:5])}</text>')
            tick += dt.timedelta(days=step)
    path = " ".join(f"{x(w)},{y(v)}" for w, v, _ in points)
    parts.append(f'<polyline class="line" points="{path}"/>')
    radius = 2 if compact or len(points) > 60 else 3.5
    for when, value, abnormal in points:
        if abnormal or not compact:
            parts.append(f'<circle class="{"abnormal" if abnormal else "point"}" cx="{x(when)}" cy="{y(value)}" r="{radius}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
