"""The HTML report's charts: Vega-Lite specifications (Altair) rendered to static SVG.

The report must open offline, years later, with no script: so a chart is never shipped as
a specification for a browser to draw, but rendered here by vl-convert (Vega in an
embedded JavaScript engine, no network) to SVG, which the document inlines. `inline`
makes that SVG part of an HTML5 document: the namespace declarations (URLs, which an
inline SVG does not need) are dropped, and a title and a description are added for
screen readers (`role="img"`, `aria-labelledby`). Text from the data is escaped by Vega's
SVG renderer; `inline` refuses any output that would fetch something or run a script.

Each builder is pure (plain values in, an Altair chart out); only `inline` renders. The
words drawn in a chart (axis titles, legends) are `Words`, English unless a caller passes
them translated (the console's pages, in the viewer's language); `inline(locale=...)`
writes the axes' numbers as that locale does.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import altair as alt
import vl_convert

from services.projections import stats
from services.projections.audit import AuditCell

__all__ = [
    "ENGLISH",
    "Bar",
    "FunnelDot",
    "KmLine",
    "Ratio",
    "Series",
    "Words",
    "audit_funnel",
    "bars",
    "funnel",
    "funnel_dots",
    "inline",
    "km_curves",
    "lines_over_time",
    "log_domain",
    "ratio_rows",
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


ChartLocale = Literal["sv-SE", "en-GB", "en-US"]  # d3-format locales the console uses


class ChartError(RuntimeError):
    """The renderer produced something a self-contained document cannot hold."""


@dataclass(frozen=True)
class Words:
    """The words the builders draw; English by default (the message ids of a catalogue)."""

    flagged: str = "flagged"
    not_flagged: str = "not flagged"
    flag: str = "Flag"
    estimate: str = "Estimate"
    sr: str = "standardised ratio (O/E)"
    model: str = "model-based ratio"
    eligible_persons: str = "eligible persons"
    standardised_rate: str = "standardised rate"
    control_limits: str = "Control limits"
    days_waited: str = "days waited"
    share_waiting: str = "share still waiting"
    median: str = "median"
    p90: str = "90th percentile"
    period: str = "period"

    def translated(self, gettext: Callable[[str], str]) -> Words:
        """The same words through a catalogue (`gettext` of the viewer's language)."""
        return Words(**{f.name: gettext(getattr(self, f.name)) for f in fields(self)})


ENGLISH = Words()


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def inline(
    chart: alt.TopLevelMixin,
    ident: str,
    title: str,
    desc: str,
    *,
    locale: ChartLocale | None = None,
) -> str:
    """The chart as SVG to put in an HTML5 document: rendered offline, no namespace URL,
    with a title and a description (`ident` makes their element ids unique); `locale`
    (a d3-format locale such as "sv-SE") writes the axes' numbers as it does."""
    spec = chart.to_dict()
    spec["config"] = _CONFIG | spec.get("config", {})
    raw = vl_convert.vegalite_to_svg(spec, vl_version=_VL_VERSION, format_locale=locale)
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
    rows: Sequence[Ratio],
    *,
    band: tuple[float, float] | None,
    x_title: str,
    words: Words = ENGLISH,
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
        status = words.flagged if r.flagged else words.not_flagged
        for kind, point, lo, hi in (
            (words.sr, r.sr, r.sr_low, r.sr_high),
            (words.model, r.model, r.model_low, r.model_high),
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
    offset = alt.YOffset("estimate:N", sort=[words.sr, words.model], title=None)
    colour = alt.Color(
        "status:N",
        scale=alt.Scale(domain=[words.not_flagged, words.flagged], range=[BLUE, RED]),
        title=words.flag,
    )
    shape = alt.Shape(
        "estimate:N",
        scale=alt.Scale(domain=[words.sr, words.model], range=["circle", "diamond"]),
        title=words.estimate,
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


def ratio_rows(
    cells: Sequence[AuditCell],
    names: Mapping[str, str],
    *,
    suppressed_text: str,
    text: Callable[[AuditCell], str],
) -> list[Ratio]:
    """One metric's cells as dot-and-whisker rows: a suppressed cell is a row with no
    estimate (never drawn, whatever numbers it came with), written `suppressed_text`; any
    other is written `text(cell)` and flagged as the cell is."""
    rows: list[Ratio] = []
    for c in cells:
        name = names.get(c.district, c.district)
        if c.suppressed:
            rows.append(Ratio(name, None, None, None, None, None, None, False, suppressed_text))
            continue
        rows.append(
            Ratio(
                name,
                c.sr,
                c.sr_low,
                c.sr_high,
                c.adjusted_ratio,
                c.ci_low,
                c.ci_high,
                c.flagged,
                text(c),
            )
        )
    return rows


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
    words: Words = ENGLISH,
    city_text: str | None = None,
) -> alt.TopLevelMixin:
    """Each district's rate against its eligible persons, with the control limits (`limits`:
    a name, e.g. "95 % limits", to its low and high curves over `persons`) around the
    city rate `target` (labelled `city_text`, default "city 61.0 %"). The curves are drawn
    from a third of the smallest district up, so the funnel's wide mouth at a handful of
    persons does not flatten the points."""
    city_label = city_text if city_text is not None else f"city {target * 100:.1f} %"
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
        title=words.eligible_persons,
        scale=alt.Scale(zero=False),
        axis=alt.Axis(tickCount=6, labelOverlap=True),
    )
    y = alt.Y("rate:Q", title=words.standardised_rate, axis=alt.Axis(format=".0%"))
    curves = (
        alt.Chart(_values(lines))
        .mark_line(color=MUTED, strokeWidth=1.3)
        .encode(
            x=x,
            y=alt.Y("rate:Q", title=words.standardised_rate, scale=alt.Scale(zero=False)),
            detail="line:N",
            strokeDash=alt.StrokeDash(
                "limit:N",
                scale=alt.Scale(domain=names, range=[[6, 3], [1, 0]][: len(names)]),
                title=words.control_limits,
            ),
        )
    )
    city = (
        alt.Chart(_values([{"rate": target, "text": city_label}]))
        .mark_rule(color=INK, strokeWidth=1.2)
        .encode(y="rate:Q")
    )
    data = [
        {
            "n": d.persons,
            "rate": d.rate,
            "district": d.label,
            "status": words.flagged if d.flagged else words.not_flagged,
        }
        for d in dots
    ]
    points = alt.Chart(_values(data))
    colour = alt.Color(
        "status:N",
        scale=alt.Scale(domain=[words.not_flagged, words.flagged], range=[BLUE, RED]),
        title=words.flag,
    )
    dots_layer = points.mark_point(filled=True, size=80, opacity=1).encode(
        x="n:Q",
        y="rate:Q",
        color=colour,
        shape=alt.Shape(
            "status:N",
            scale=alt.Scale(domain=[words.not_flagged, words.flagged], range=["circle", "square"]),
            legend=None,
        ),
    )
    labels = points.mark_text(align="left", dx=8, dy=-6, fontSize=11, color=INK).encode(
        x="n:Q", y="rate:Q", text="district:N"
    )
    city_label = (
        alt.Chart(_values([{"rate": target, "text": city_label}]))
        .mark_text(align="right", dy=-6, color=INK, fontSize=11)
        .encode(y="rate:Q", x=alt.value(420), text="text:N")
    )
    return (
        alt.layer(curves, city, dots_layer, labels, city_label)
        .encode(y=y)
        .properties(width=420, height=260)
    )


def funnel_dots(cells: Sequence[AuditCell], names: Mapping[str, str]) -> list[FunnelDot]:
    """The funnel's points: the unsuppressed cells with a funnel rate (a suppressed district
    is never a point, whatever the funnel holds)."""
    return [
        FunnelDot(names.get(c.district, c.district), c.persons, c.funnel_rate, c.flagged)
        for c in cells
        if not c.suppressed and c.funnel_rate is not None and c.persons is not None
    ]


def audit_funnel(
    cells: Sequence[AuditCell],
    names: Mapping[str, str],
    fun: stats.Funnel | None,
    *,
    limit_names: tuple[str, str] = ("95 % limits", "99.8 % limits"),
    words: Words = ENGLISH,
    city_text: str | None = None,
) -> alt.TopLevelMixin | None:
    """One metric's funnel plot from its cells and funnel; None with nothing to draw."""
    dots = funnel_dots(cells, names)
    if fun is None or not dots:
        return None
    curve = fun.curve
    return funnel(
        dots,
        target=fun.target,
        persons=curve.persons,
        limits={
            limit_names[0]: (curve.low_95, curve.high_95),
            limit_names[1]: (curve.low_998, curve.high_998),
        },
        words=words,
        city_text=city_text,
    )


# --- waiting-time curves --------------------------------------------------------------------


@dataclass(frozen=True)
class KmLine:
    label: str
    curve: Sequence[tuple[float, float]]  # (days, share still waiting just after)
    city: bool = False


def km_curves(lines: Sequence[KmLine], words: Words = ENGLISH) -> alt.TopLevelMixin:
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
            x=alt.X("days:Q", title=words.days_waited, scale=alt.Scale(zero=True)),
            y=alt.Y(
                "waiting:Q",
                title=words.share_waiting,
                scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(format=".0%"),
            ),
            color=alt.Color("who:N", sort=order, title=None),
            strokeDash=alt.condition("datum.city", alt.value([6, 3]), alt.value([1, 0])),
            order="days:Q",
        )
    )
    marks = [{"y": 0.5, "t": words.median}, {"y": 0.1, "t": words.p90}]
    guides = alt.Chart(_values(marks)).mark_rule(color=MUTED, strokeDash=[2, 3]).encode(y="y:Q")
    guide_text = (
        alt.Chart(_values(marks))
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


# --- an indicator over time ------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One line: a value per period (None: no figure, or suppressed: never drawn)."""

    label: str
    values: Sequence[float | None]
    city: bool = False


_PALETTE = ("#1f77b4", "#d95f02", "#2ca02c", "#7570b3", "#8c564b", "#e7298a", "#17becf")


def series_points(series: Sequence[Series], periods: Sequence[str]) -> list[dict[str, Any]]:
    """The points drawn: one per period with a value; a missing value breaks the line into
    segments (a line never bridges a suppressed period as if it had a figure)."""
    points: list[dict[str, Any]] = []
    for s in series:
        if len(s.values) != len(periods):
            raise ValueError(f"{s.label}: {len(s.values)} values for {len(periods)} periods")
        segment = 0
        for period, value in zip(periods, s.values, strict=True):
            if value is None:
                segment += 1
                continue
            points.append(
                {
                    "who": s.label,
                    "period": period,
                    "value": value,
                    "city": s.city,
                    "segment": f"{s.label}/{segment}",
                }
            )
    return points


def lines_over_time(
    series: Sequence[Series],
    periods: Sequence[str],
    *,
    y_title: str,
    share: bool,
    words: Words = ENGLISH,
) -> alt.TopLevelMixin:
    """A line per district over the periods (in order), the city's dashed and dark; each
    figure also a point (a single year between gaps is still seen). `share`: the axis is
    0-100 %; otherwise a number (days) from 0."""
    order = [s.label for s in series]
    colours = []
    others = iter(_PALETTE * (len(series) // len(_PALETTE) + 1))
    for s in series:
        colours.append(INK if s.city else next(others))
    data = series_points(series, periods)
    y = alt.Y(
        "value:Q",
        title=y_title,
        scale=alt.Scale(domain=[0, 1]) if share else alt.Scale(zero=True),
        axis=alt.Axis(format=".0%" if share else "~g"),
    )
    x = alt.X("period:O", sort=list(periods), title=words.period, axis=alt.Axis(labelAngle=0))
    colour = alt.Color(
        "who:N", sort=order, scale=alt.Scale(domain=order, range=colours), title=None
    )
    base = alt.Chart(_values(data))
    lines = base.mark_line(strokeWidth=2).encode(
        x=x,
        y=y,
        color=colour,
        detail="segment:N",
        strokeDash=alt.condition("datum.city", alt.value([6, 3]), alt.value([1, 0])),
    )
    dots = base.mark_point(filled=True, size=50, opacity=1).encode(
        x=x, y=y, color=colour, shape=alt.Shape("who:N", sort=order, legend=None)
    )
    # the domain of x is every period, drawn or not, so an empty year still has its place
    frame = alt.Chart(_values([{"period": p} for p in periods])).mark_tick(opacity=0).encode(x=x)
    return alt.layer(frame, lines, dots).properties(width=440, height=240)
