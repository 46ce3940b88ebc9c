"""The HTML report's charts: Vega-Lite specifications (Altair) rendered to static SVG.

The report must open offline, years later, with no script: so a chart is never shipped as
a specification for a browser to draw, but rendered here by vl-convert (Vega in an
embedded JavaScript engine, no network) to SVG, which the document inlines. `inline`
makes that SVG part of an HTML5 document: the namespace declarations (URLs, which an
inline SVG does not need) are dropped, and a title and a description are added for
screen readers (`role="img"`, `aria-labelledby`). Text from the data is escaped by Vega's
SVG renderer; `inline` refuses any output that would fetch something or run a script.

Each builder is pure (plain values in, an Altair chart out); only `inline` renders.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import altair as alt
import vl_convert

__all__ = [
    "Bar",
    "FunnelDot",
    "KmLine",
    "Ratio",
    "bars",
    "funnel",
    "inline",
    "km_curves",
    "log_domain",
    "ratios",
]

INK = "#1a1a1a"
MUTED = "#6b6b6b"
BLUE = "#1f4e79"
RED = "#b00020"
GRID = "#d9d9d9"
FONT = "system-ui, -apple-system, Segoe UI, Roboto, Helvetica Neue, Arial, sans-serif"
_VL_VERSION = alt.SCHEMA_VERSION.lstrip("v").rsplit(".", 1)[0].replace(".", "_")  # "6_4"
_SVG_OPEN = re.compile(r"\A\s*<svg\b([^>]*)>", re.DOTALL)
_UNSAFE = ("<script", "<foreignobject", "<image", "href=", "url(", "http:", "https:", "@import")
_CONFIG: dict[str, Any] = {
    "font": FONT,
    "view": {"stroke": None},
    "axis": {"labelColor": INK, "titleColor": INK, "gridColor": GRID, "labelFontSize": 11},
    "legend": {"labelColor": INK, "titleColor": INK, "orient": "bottom"},
    "background": "white",
}


class ChartError(RuntimeError):
    """The renderer produced something a self-contained document cannot hold."""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def inline(chart: alt.TopLevelMixin, ident: str, title: str, desc: str) -> str:
    """The chart as SVG to put in an HTML5 document: rendered offline, no namespace URL,
    with a title and a description (`ident` makes their element ids unique)."""
    spec = chart.to_dict()
    spec["config"] = _CONFIG | spec.get("config", {})
    raw = vl_convert.vegalite_to_svg(spec, vl_version=_VL_VERSION)
    found = _SVG_OPEN.match(raw)
    if found is None:
        raise ChartError("the renderer's output is not an SVG document")
    attrs = dict(re.findall(r'([\w:-]+)="([^"]*)"', found.group(1)))
    body = raw[found.end() :]
    lowered = body.lower()
    for needle in _UNSAFE:
        if needle in lowered:
            raise ChartError(f"the rendered chart holds {needle!r}: it would not be self-contained")
    width, height = attrs.get("width", "600"), attrs.get("height", "300")
    box = attrs.get("viewBox", f"0 0 {width} {height}")
    return (
        f'<svg role="img" viewBox="{_e(box)}" width="{_e(width)}" height="{_e(height)}"'
        f' aria-labelledby="{_e(ident)}-t {_e(ident)}-d" class="chart">'
        f'<title id="{_e(ident)}-t">{_e(title)}</title><desc id="{_e(ident)}-d">{_e(desc)}</desc>'
        f"{body}"
    )


def _values(rows: Sequence[Mapping[str, Any]]) -> alt.Data:
    return alt.Data(values=[dict(r) for r in rows])  # type: ignore[no-untyped-call]


# --- a standardised ratio per district, with its interval (dot and whisker) -------------


@dataclass(frozen=True)
class Ratio:
    """One district's row: its estimates (None: not drawn, `text` says why) and a label."""

    label: str
    sr: float | None
    sr_low: float | None
    sr_high: float | None
    model: float | None  # the model-based (need-adjusted) ratio, drawn beside the SR
    model_low: float | None
    model_high: float | None
    flagged: bool
    text: str  # written right of the plot: the figures, or why there are none


def log_domain(values: Sequence[float | None], band: tuple[float, float]) -> tuple[float, float]:
    """An x range that always shows the band and 1, and every interval (within reason)."""
    shown = [band[0] / 1.25, band[1] * 1.25] + [v for v in values if v is not None and v > 0]
    return max(min(shown) / 1.1, 0.05), min(max(shown) * 1.1, 20.0)


def ratios(
    rows: Sequence[Ratio], *, band: tuple[float, float] | None, x_title: str
) -> alt.TopLevelMixin:
    """Dot and whisker per district on a log scale: the standardised ratio (O/E) with its
    interval, and the model-based ratio beside it; a line at 1, the band shaded if given."""
    low, high = log_domain(
        [v for r in rows for v in (r.sr, r.sr_low, r.sr_high, r.model, r.model_low, r.model_high)],
        band or (1.0, 1.0),
    )
    order = [r.label for r in rows]
    data: list[dict[str, Any]] = []
    for r in rows:
        status = "flagged" if r.flagged else "not flagged"
        for kind, point, lo, hi in (
            ("standardised ratio (O/E)", r.sr, r.sr_low, r.sr_high),
            ("model-based ratio", r.model, r.model_low, r.model_high),
        ):
            if point is None:
                continue
            data.append(
                {
                    "district": r.label,
                    "estimate": kind,
                    "status": status,
                    "point": min(max(point, low), high),
                    "low": None if lo is None else min(max(lo, low), high),
                    "high": None if hi is None else min(max(hi, low), high),
                }
            )
    width = 380
    x = alt.X(
        "point:Q",
        title=x_title,
        scale=alt.Scale(type="log", domain=[low, high], nice=False),
        axis=alt.Axis(values=_log_ticks(low, high), format="~g", grid=True),
    )
    y = alt.Y("district:N", sort=order, title=None, axis=alt.Axis(labelLimit=260))
    offset = alt.YOffset(
        "estimate:N", sort=["standardised ratio (O/E)", "model-based ratio"], title=None
    )
    colour = alt.Color(
        "status:N",
        scale=alt.Scale(domain=["not flagged", "flagged"], range=[BLUE, RED]),
        title="Flag",
    )
    shape = alt.Shape(
        "estimate:N",
        scale=alt.Scale(
            domain=["standardised ratio (O/E)", "model-based ratio"], range=["circle", "diamond"]
        ),
        title="Estimate",
    )
    points = alt.Chart(_values(data))
    layers: list[alt.Chart] = []
    if band is not None:
        layers.append(
            alt.Chart(_values([{"a": band[0], "b": band[1]}]))
            .mark_rect(color="#cfe3cf", opacity=0.6)
            .encode(x=alt.X("a:Q", scale=alt.Scale(type="log", domain=[low, high])), x2="b:Q")
        )
    layers += [
        alt.Chart(_values([{"one": 1}])).mark_rule(color="#333", strokeWidth=1.5).encode(x="one:Q"),
        points.mark_rule(strokeWidth=2).encode(
            x=alt.X("low:Q", scale=alt.Scale(type="log", domain=[low, high])),
            x2="high:Q",
            y=y,
            yOffset=offset,
            color=colour,
        ),
        points.mark_point(filled=True, size=70, opacity=1).encode(
            x=x, y=y, yOffset=offset, color=colour, shape=shape
        ),
        alt.Chart(_values([{"district": r.label, "text": r.text, "flag": r.flagged} for r in rows]))
        .mark_text(align="left", dx=10, fontSize=11)
        .encode(
            x=alt.value(width),
            y=alt.Y("district:N", sort=order),
            text="text:N",
            color=alt.condition("datum.flag", alt.value(RED), alt.value(INK)),
        ),
    ]
    return alt.layer(*layers).properties(width=width, height=alt.Step(13 if data else 22))


def _log_ticks(low: float, high: float) -> list[float]:
    """Tick values by priority, dropping any too close (in log distance) to a kept one."""
    kept: list[float] = []
    span = math.log(high) - math.log(low)
    for t in (1, 0.5, 2, 0.8, 1.25, 0.25, 4, 0.1, 10, 0.05, 20):
        if low <= t <= high and all(abs(math.log(t) - math.log(k)) >= span / 10 for k in kept):
            kept.append(t)
    return sorted(kept)


# --- the funnel plot ----------------------------------------------------------------------


@dataclass(frozen=True)
class FunnelDot:
    label: str
    persons: int
    rate: float
    flagged: bool


def funnel(
    dots: Sequence[FunnelDot],
    *,
    target: float,
    persons: Sequence[int],
    limits: Mapping[str, tuple[Sequence[float], Sequence[float]]],
) -> alt.TopLevelMixin:
    """Each district's rate against its eligible persons, with the control limits (`limits`:
    a name, e.g. "95 % limits", to its low and high curves over `persons`) around the
    city rate `target`. The curves are drawn from a third of the smallest district up, so
    the funnel's wide mouth at a handful of persons does not flatten the points."""
    smallest = min((d.persons for d in dots), default=10)
    start = max(5, smallest // 3)
    lines: list[dict[str, Any]] = []
    for name, (lows, highs) in limits.items():
        for n, lo, hi in zip(persons, lows, highs, strict=True):
            if n >= start:
                lines.append({"n": n, "rate": lo, "limit": name, "line": f"{name} low"})
                lines.append({"n": n, "rate": hi, "limit": name, "line": f"{name} high"})
    names = list(limits)
    x = alt.X(
        "n:Q",
        title="eligible persons",
        scale=alt.Scale(zero=False),
        axis=alt.Axis(tickCount=6, labelOverlap=True),
    )
    y = alt.Y("rate:Q", title="standardised rate", axis=alt.Axis(format=".0%"))
    curves = (
        alt.Chart(_values(lines))
        .mark_line(color=MUTED, strokeWidth=1.3)
        .encode(
            x=x,
            y=alt.Y("rate:Q", title="standardised rate", scale=alt.Scale(zero=False)),
            detail="line:N",
            strokeDash=alt.StrokeDash(
                "limit:N",
                scale=alt.Scale(domain=names, range=[[6, 3], [1, 0]][: len(names)]),
                title="Control limits",
            ),
        )
    )
    city = (
        alt.Chart(_values([{"rate": target, "text": f"city {target * 100:.1f} %"}]))
        .mark_rule(color=INK, strokeWidth=1.2)
        .encode(y="rate:Q")
    )
    data = [
        {
            "n": d.persons,
            "rate": d.rate,
            "district": d.label,
            "status": "flagged" if d.flagged else "not flagged",
        }
        for d in dots
    ]
    points = alt.Chart(_values(data))
    colour = alt.Color(
        "status:N",
        scale=alt.Scale(domain=["not flagged", "flagged"], range=[BLUE, RED]),
        title="Flag",
    )
    dots_layer = points.mark_point(filled=True, size=80, opacity=1).encode(
        x="n:Q",
        y="rate:Q",
        color=colour,
        shape=alt.Shape(
            "status:N",
            scale=alt.Scale(domain=["not flagged", "flagged"], range=["circle", "square"]),
            legend=None,
        ),
    )
    labels = points.mark_text(align="left", dx=8, dy=-6, fontSize=11, color=INK).encode(
        x="n:Q", y="rate:Q", text="district:N"
    )
    city_label = (
        alt.Chart(_values([{"rate": target, "text": f"city {target * 100:.1f} %"}]))
        .mark_text(align="right", dy=-6, color=INK, fontSize=11)
        .encode(y="rate:Q", x=alt.value(420), text="text:N")
    )
    return (
        alt.layer(curves, city, dots_layer, labels, city_label)
        .encode(y=y)
        .properties(width=420, height=260)
    )


# --- waiting-time curves --------------------------------------------------------------------


@dataclass(frozen=True)
class KmLine:
    label: str
    curve: Sequence[tuple[float, float]]  # (days, share still waiting just after)
    city: bool = False


def km_curves(lines: Sequence[KmLine]) -> alt.TopLevelMixin:
    """Kaplan-Meier step curves (share still waiting against days), one per district and
    the city's dashed; guides at the median (50 %) and the 90th percentile (10 % left)."""
    data: list[dict[str, Any]] = []
    for line in lines:
        data.append({"who": line.label, "days": 0.0, "waiting": 1.0, "city": line.city})
        for t, s in line.curve:
            data.append({"who": line.label, "days": t, "waiting": s, "city": line.city})
    order = [line.label for line in lines]
    steps = (
        alt.Chart(_values(data))
        .mark_line(interpolate="step-after", strokeWidth=2)
        .encode(
            x=alt.X("days:Q", title="days waited", scale=alt.Scale(zero=True)),
            y=alt.Y(
                "waiting:Q",
                title="share still waiting",
                scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(format=".0%"),
            ),
            color=alt.Color("who:N", sort=order, title=None),
            strokeDash=alt.condition("datum.city", alt.value([6, 3]), alt.value([1, 0])),
            order="days:Q",
        )
    )
    guides = (
        alt.Chart(_values([{"y": 0.5, "t": "median"}, {"y": 0.1, "t": "90th percentile"}]))
        .mark_rule(color=MUTED, strokeDash=[2, 3])
        .encode(y="y:Q")
    )
    guide_text = (
        alt.Chart(_values([{"y": 0.5, "t": "median"}, {"y": 0.1, "t": "90th percentile"}]))
        .mark_text(align="left", dx=4, dy=-5, color=MUTED, fontSize=10)
        .encode(y="y:Q", x=alt.value(0), text="t:N")
    )
    return alt.layer(guides, guide_text, steps).properties(width=440, height=240)


# --- a share per district (the follow-up report) --------------------------------------------


@dataclass(frozen=True)
class Bar:
    label: str
    value: float | None
    text: str  # the value as written, or why there is none ("suppressed")


def bars(rows: Sequence[Bar], *, city: float | None, city_text: str) -> alt.TopLevelMixin:
    """A bar per district for one share (0-100 %), its value written beside it, and the
    city's value as a dashed reference line."""
    order = [r.label for r in rows]
    y = alt.Y("district:N", sort=order, title=None, axis=alt.Axis(labelLimit=260))
    data = [
        {"district": r.label, "value": r.value, "text": r.text, "drawn": r.value is not None}
        for r in rows
    ]
    base = alt.Chart(_values(data))
    x = alt.X(
        "value:Q",
        title="share (0–100 %)",
        scale=alt.Scale(domain=[0, 1]),
        axis=alt.Axis(format=".0%", values=[0, 0.25, 0.5, 0.75, 1]),
    )
    layers: list[alt.Chart] = [
        base.transform_filter("datum.drawn").mark_bar(color=BLUE, opacity=0.85).encode(x=x, y=y),
        base.mark_text(align="left", dx=5, color=INK, fontSize=11)
        .encode(x=alt.X("pos:Q", scale=alt.Scale(domain=[0, 1])), y=y, text="text:N")
        .transform_calculate(pos="datum.drawn ? datum.value : 0"),
    ]
    if city is not None:
        ref = alt.Chart(_values([{"city": city, "text": city_text}]))
        layers += [
            ref.mark_rule(color=RED, strokeWidth=2, strokeDash=[5, 3]).encode(x="city:Q"),
            ref.mark_text(
                align="right" if city > 0.5 else "left",
                dx=-4 if city > 0.5 else 4,
                y=-8,
                color=RED,
                fontSize=11,
            ).encode(x="city:Q", text="text:N"),
        ]
    return alt.layer(*layers).properties(width=260, height=alt.Step(24))
