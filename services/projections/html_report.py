"""The follow-up report and the equal-access audit as one self-contained HTML document.

An auditor must be able to open the file offline, years later, on a locked-down machine,
and print it. So the document has no external resource of any kind: no scripts, no
stylesheets or fonts to fetch, no URLs; CSS is inline and every chart is SVG drawn here in
Python. Text from the data (district names, notes) is always HTML-escaped.

`render` is pure (rows and cells in, a string out) so it is tested without a database;
`build` is the thin adapter that reads the projections and calls it.

Disclosure control is enforced here too, not only upstream: a suppressed row or cell is
drawn without any number, even if a caller handed numbers in with it.

The provenance block (offsets, chain-heads digest, code and reference-data versions,
parameters) is written for the reader, and the whole record (provenance and every figure,
`reproduce.py`) as escaped JSON text in a `<pre id="likvard-record">` inside a closed
`<details>`: no script, still one file, and `likvard report --reproduce FILE` reads it back.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from likvard.districts import DistrictRegistry
from services.projections.audit import METRICS, AuditCell
from services.projections.reports import (
    CITY,
    TIME_ZONE,
    ReportRow,
)
from services.projections.reproduce import (
    RECORD_ID,
    Parameters,
    Report,
    default_as_of,
    record_json,
    snapshot,
)

__all__ = ["DEFAULT_TITLE", "build", "build_report", "render"]

DEFAULT_TITLE = "Likvärd: follow-up report and equal-access audit"
MIN_CELL = 5  # the suppression threshold of `followup_report` and `audit` (their default)
BAND = (0.8, 1.25)  # the tolerated band of the audit's flag (its default)
SUPPRESSED_TEXT = f"suppressed (fewer than {MIN_CELL})"
DASH = "—"

_STRUCTURE_TEXT: Mapping[str, str] = {
    "current": "current districts (old district codes counted under their successors)",
    "as-recorded": "as recorded at intake (old district codes kept)",
}

# Audit metrics: a heading and what the rate counts.
_METRIC_TEXT: Mapping[str, tuple[str, str]] = {
    "specialist_access": (
        "Specialist access",
        "Share of persons who were given a specialist intervention.",
    ),
    "timely_start": (
        "Timely start",
        "Share of persons whose first intervention started within 30 days of intake.",
    ),
    "guideline_adherence": (
        "Guideline adherence",
        "Among persons given an intervention, share given one of top national guideline priority.",
    ),
    "family_engagement": (
        "Family engagement",
        "Among persons with children in the household, share with a family member engaged.",
    ),
    "followup_completion": (
        "Follow-up completion",
        "Among persons with a follow-up, share with a follow-up interview completed.",
    ),
}

# Follow-up report: (field, header, kind); kind says how the number is written.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("persons", "Persons", "int"),
    ("new_intakes", "New intakes", "int"),
    ("assessed", "Assessed", "int"),
    ("referrals", "Referrals", "int"),
    ("referrals_across_share", "Referred across districts", "share"),
    ("days_to_first_intervention_median", "Days to first intervention: median", "days"),
    ("days_to_first_intervention_p90", "Days to first intervention: 90th percentile", "days"),
    ("top_guideline_share", "Top guideline priority", "share"),
    ("family_members_engaged", "Family members engaged", "int"),
    ("cases_with_children", "Cases with children", "int"),
    ("family_engaged_share_with_children", "Family engaged (cases with children)", "share"),
    ("followups_completed", "Follow-ups completed", "int"),
    ("followups_missed", "Follow-ups missed", "int"),
    ("goals_reached_share", "Own goals reached (completed follow-ups)", "share"),
    ("situation_improved_share", "Situation better than at intake (completed follow-ups)", "share"),
    ("closed_not_reopened_share", "Closed, not reopened within a year", "share"),
)
_CHARTED: tuple[tuple[str, str], ...] = (
    ("referrals_across_share", "Referrals across districts"),
    ("top_guideline_share", "Interventions of top guideline priority"),
    ("family_engaged_share_with_children", "Family engaged, cases with children"),
    ("situation_improved_share", "Situation better than at intake (follow-ups)"),
    ("closed_not_reopened_share", "Closed cases not reopened within a year"),
)

_INK = "#1a1a1a"
_MUTED = "#6b6b6b"
_BLUE = "#1f4e79"
_RED = "#b00020"
_GRID = "#d9d9d9"

_CSS = """
:root { color-scheme: light; }
* { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; color: #1a1a1a; background: #fff; margin: 0 auto; max-width: 1180px;
  padding: 24px 28px 48px; }
header { border-bottom: 3px solid #1f4e79; padding-bottom: 12px; }
h1 { font-size: 1.7em; margin: 0 0 .4em; }
h2 { font-size: 1.35em; border-bottom: 2px solid #1f4e79; padding-bottom: .2em;
  margin: 2em 0 .6em; }
h3 { font-size: 1.1em; margin: 1.6em 0 .2em; }
h4 { font-size: 1em; margin: 1.2em 0 .3em; }
p { margin: .4em 0; max-width: 60em; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .15em 1.2em;
  margin: .6em 0; }
dl.meta dt { font-weight: 600; }
dl.meta dd { margin: 0; }
.howto { background: #f3f6f9; border-left: 4px solid #1f4e79; padding: .6em 1em;
  margin-top: 1em; }
.howto ul { margin: .3em 0; padding-left: 1.3em; }
nav ul { list-style: none; padding: 0; margin: .8em 0 0; display: flex; gap: 1.5em; }
nav a { color: #1f4e79; }
.lead { color: #444; }
.summary.flags { color: #b00020; font-weight: 600; }
table { border-collapse: collapse; font-size: 12.5px; font-variant-numeric: tabular-nums;
  margin: .5em 0 1em; width: 100%; }
caption { text-align: left; font-weight: 600; padding: .3em 0; }
th, td { border-bottom: 1px solid #dcdcdc; padding: 4px 6px; text-align: left;
  vertical-align: top; }
thead th { border-bottom: 2px solid #888; font-weight: 600; vertical-align: bottom;
  background: #f7f7f7; }
th.num, td.num { text-align: right; white-space: nowrap; }
thead th.num { white-space: normal; }
table.followup { font-size: 12px; }
table.followup th, table.followup td { padding: 4px 4px; }
td.suppressed { color: #6b6b6b; font-style: italic; text-align: center; }
td.note { color: #444; max-width: 22em; }
tbody th { font-weight: 600; min-width: 9em; }
tr.flagged td, tr.flagged th { background: #fdecea; }
tr.city td, tr.city th { font-weight: 700; border-top: 2px solid #888; background: #f7f7f7; }
.flag-marker { color: #b00020; font-weight: 700; white-space: nowrap; }
.metric, .period { break-inside: avoid; page-break-inside: avoid; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
  gap: 8px 24px; }
figure { margin: .4em 0; break-inside: avoid; page-break-inside: avoid; }
figcaption { font-weight: 600; font-size: .95em; margin-bottom: .2em; }
svg { display: block; max-width: 100%; height: auto; }
footer { margin-top: 3em; color: #6b6b6b; font-size: .9em; border-top: 1px solid #ccc;
  padding-top: .6em; }
@page { size: A4 landscape; margin: 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  nav { display: none; }
  h2 { break-before: page; page-break-before: always; }
  tr { break-inside: avoid; page-break-inside: avoid; }
  .charts { grid-template-columns: 1fr 1fr; }
}
"""


_HALO = {"stroke": "#fff", "stroke_width": "3", "paint_order": "stroke"}  # legible over lines


def _label_width(
    items: Sequence[AuditCell | ReportRow], names: Mapping[str, str], least: int
) -> int:
    """Room for the longest district label left of a chart (about 7 px a character)."""
    longest = max((len(names.get(i.district, i.district)) for i in items), default=0)
    return max(least, min(300, 7 * longest + 20))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:.1f} %"


def _days(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f}"


def _int(value: int | None) -> str:
    return DASH if value is None else str(value)


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def _ci(low: float | None, high: float | None) -> str:
    return DASH if low is None or high is None else f"{low:.2f}–{high:.2f}"


def _tick(value: float) -> str:
    return f"{value:g}"


def _direction(cell: AuditCell) -> str:
    """Which way a flagged district deviates, for readers who cannot see the colour."""
    if cell.adjusted_ratio is None:
        return ""
    return "lower" if cell.adjusted_ratio < 1 else "higher"


def _flag_marker(cell: AuditCell) -> str:
    direction = _direction(cell)
    text = f"⚑ flagged: {direction}" if direction else "⚑ flagged"
    return f'<span class="flag-marker">{_e(text)}</span>'


def _svg_open(width: int, height: int, ident: str, title: str, desc: str) -> str:
    return (
        f'<svg role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
        f' aria-labelledby="{ident}-t {ident}-d" font-family="inherit" font-size="12">'
        f'<title id="{ident}-t">{_e(title)}</title><desc id="{ident}-d">{_e(desc)}</desc>'
    )


def _text(x: float, y: float, content: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{_e(v)}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{_e(content)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{_e(v)}"' for k, v in attrs.items())
    return (
        f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"{extra}/>'
    )


# --- the equal-access audit -----------------------------------------------------------


def _log_domain(cells: Sequence[AuditCell]) -> tuple[float, float]:
    """An x range that always shows the band and 1, and every interval (within reason)."""
    values = [BAND[0] / 1.25, BAND[1] * 1.25]
    for c in cells:
        if not c.suppressed:
            values += [v for v in (c.adjusted_ratio, c.ci_low, c.ci_high) if v is not None]
    low = max(min(values) / 1.1, 0.05)
    high = min(max(values) * 1.1, 20.0)
    return low, high


def _log_ticks(low: float, high: float, scale: Callable[[float], float]) -> list[float]:
    """Tick values by priority, dropping any that would crowd a kept one."""
    kept: list[float] = []
    for t in (1, 0.5, 2, 0.8, 1.25, 0.25, 4, 0.1, 10, 0.05, 20):
        if low <= t <= high and all(abs(scale(t) - scale(k)) >= 36 for k in kept):
            kept.append(t)
    return sorted(kept)


def _forest(metric: str, label: str, cells: Sequence[AuditCell], names: Mapping[str, str]) -> str:
    """One metric's forest plot: need-adjusted ratio and 95% interval per district."""
    left, right, top, row_h = _label_width(cells, names, 170), 230, 34, 28
    width = max(900, left + 360 + right)
    plot_w = width - left - right
    height = top + len(cells) * row_h + 56
    low, high = _log_domain(cells)
    span = math.log(high) - math.log(low)

    def x(value: float) -> float:
        v = min(max(value, low), high)
        return left + (math.log(v) - math.log(low)) / span * plot_w

    bottom = top + len(cells) * row_h
    flagged = [c for c in cells if c.flagged and not c.suppressed]
    desc = (
        f"Forest plot of {label}: per district the need-adjusted ratio to the rest of the"
        f" city with its 95% interval, log scale; the shaded band is {BAND[0]:g} to"
        f" {BAND[1]:g}. {len(flagged)} flagged."
    )
    out = [_svg_open(width, height, f"forest-{metric}", f"{label}: need-adjusted ratio", desc)]
    for i, cell in enumerate(cells):
        if cell.flagged and not cell.suppressed:
            y0 = top + i * row_h
            out.append(
                f'<rect x="0" y="{y0}" width="{width}" height="{row_h}" fill="#fdecea"'
                ' fill-opacity="0.8"/>'
            )
    out.append(
        f'<rect x="{x(BAND[0]):.1f}" y="{top - 4}" width="{x(BAND[1]) - x(BAND[0]):.1f}"'
        f' height="{bottom - top + 8}" fill="#cfe3cf" fill-opacity="0.6"/>'
    )
    ticks = _log_ticks(low, high, x)
    for t in ticks:
        out.append(_line(x(t), top - 4, x(t), bottom + 4, _GRID))
    out.append(_line(x(1), top - 8, x(1), bottom + 4, "#333", stroke_width="1.5"))
    out.append(_text(x(1) - 6, top - 14, "◂ lower in district", text_anchor="end", fill=_MUTED))
    out.append(_text(x(1) + 6, top - 14, "higher in district ▸", fill=_MUTED))
    out.append(_text(width - right + 10, top - 14, "ratio (95% interval)", fill=_MUTED))

    for i, cell in enumerate(cells):
        cy = top + i * row_h + row_h / 2
        name = names.get(cell.district, cell.district)
        is_flag = cell.flagged and not cell.suppressed
        colour = _RED if is_flag else _BLUE
        weight = "700" if is_flag else "400"
        out.append(_text(left - 10, cy + 4, name, text_anchor="end", font_weight=weight, fill=_INK))
        if cell.suppressed:
            out.append(_text(left + 8, cy + 4, SUPPRESSED_TEXT, fill=_MUTED, font_style="italic"))
            continue
        if cell.adjusted_ratio is None:
            out.append(_text(left + 8, cy + 4, f"{DASH} not computable (see note)", fill=_MUTED))
            continue
        point = cell.adjusted_ratio
        summary = f"{name}: {_ratio(point)} (95% interval {_ci(cell.ci_low, cell.ci_high)})"
        out.append(f"<g><title>{_e(summary + (', flagged' if is_flag else ''))}</title>")
        if cell.ci_low is not None and cell.ci_high is not None:
            x_lo, x_hi = x(cell.ci_low), x(cell.ci_high)
            out.append(_line(x_lo, cy, x_hi, cy, colour, stroke_width="2"))
            out.append(_line(x_lo, cy - 5, x_lo, cy + 5, colour, stroke_width="2"))
            out.append(_line(x_hi, cy - 5, x_hi, cy + 5, colour, stroke_width="2"))
        if is_flag:
            out.append(
                f'<rect x="{x(point) - 5.5:.1f}" y="{cy - 5.5:.1f}" width="11" height="11"'
                f' fill="{_RED}"/>'
            )
        else:
            out.append(f'<circle cx="{x(point):.1f}" cy="{cy:.1f}" r="5" fill="{_BLUE}"/>')
        out.append("</g>")
        right_text = f"{_ratio(point)} ({_ci(cell.ci_low, cell.ci_high)})"
        if is_flag:
            right_text += f" flagged, {_direction(cell)}"
        out.append(_text(width - right + 10, cy + 4, right_text, fill=colour, font_weight=weight))

    out.append(_line(left, bottom + 4, left + plot_w, bottom + 4, "#555"))
    for t in ticks:
        out.append(_line(x(t), bottom + 4, x(t), bottom + 9, "#555"))
        out.append(_text(x(t), bottom + 22, _tick(t), text_anchor="middle", fill=_INK))
    out.append(
        _text(
            left + plot_w / 2,
            bottom + 42,
            f"need-adjusted ratio, district vs rest of city (log scale; shaded"
            f" {BAND[0]:g}–{BAND[1]:g})",
            text_anchor="middle",
            fill=_INK,
        )
    )
    out.append("</svg>")
    return "".join(out)


def _audit_table(
    metric: str, label: str, cells: Sequence[AuditCell], names: Mapping[str, str]
) -> str:
    heads = (
        "Persons",
        "Rate",
        "Rest-of-city rate",
        "Crude ratio",
        "Adjusted ratio",
        "95% interval",
        "MH ratio",
    )
    out = [
        f'<table class="audit" data-metric="{_e(metric)}">'
        f"<caption>{_e(label)}: figures per district</caption><thead><tr>"
        '<th scope="col">District</th>'
        + "".join(f'<th scope="col" class="num">{_e(h)}</th>' for h in heads)
        + '<th scope="col">Flag</th><th scope="col">Note</th></tr></thead><tbody>'
    ]
    for cell in cells:
        name = names.get(cell.district, cell.district)
        is_flag = cell.flagged and not cell.suppressed
        classes = "flagged" if is_flag else ("suppressed" if cell.suppressed else "")
        out.append(
            f'<tr class="{classes}" data-district="{_e(cell.district)}">'
            f'<th scope="row">{_e(name)}</th>'
        )
        if cell.suppressed:
            out.append(f'<td class="num suppressed" colspan="{len(heads)}">suppressed</td>')
        else:
            numbers = (
                _int(cell.persons),
                _pct(cell.rate),
                _pct(cell.city_rate),
                _ratio(cell.ratio),
                _ratio(cell.adjusted_ratio),
                _ci(cell.ci_low, cell.ci_high),
                _ratio(cell.mh_ratio),
            )
            out.extend(f'<td class="num">{_e(n)}</td>' for n in numbers)
        out.append(f"<td>{_flag_marker(cell) if is_flag else ''}</td>")
        out.append(f'<td class="note">{_e(cell.note or "")}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _metric_order(cells: Sequence[AuditCell]) -> list[str]:
    found = {c.metric for c in cells}
    return [m for m in METRICS if m in found] + sorted(found - set(METRICS))


def _audit_section(cells: Sequence[AuditCell], names: Mapping[str, str]) -> str:
    out = [
        '<section id="audit"><h2>Equal-access audit</h2>',
        '<p class="lead">Each district is compared with the rest of the city among persons'
        " with the same assessed need level (each person once, by their most recent case;"
        " the audit covers every case in the read model, not only the period above). A"
        " ratio below 1 means the district's rate is lower than the rest of the city's.</p>",
    ]
    if not cells:
        out.append("<p>No person with an assessed need level: nothing to audit.</p></section>")
        return "".join(out)
    flagged = [c for c in cells if c.flagged and not c.suppressed]
    if flagged:
        items = "".join(
            f"<li>{_e(names.get(c.district, c.district))}, "
            f"{_e(_METRIC_TEXT.get(c.metric, (c.metric, ''))[0])}: {_e(_direction(c))}"
            f" (ratio {_e(_ratio(c.adjusted_ratio))},"
            f" 95% interval {_e(_ci(c.ci_low, c.ci_high))})</li>"
            for c in flagged
        )
        out.append(
            f'<p class="summary flags">{len(flagged)} flagged'
            f" cell{'s' if len(flagged) != 1 else ''}:</p><ul>{items}</ul>"
        )
    else:
        out.append('<p class="summary">No district is flagged.</p>')
    for metric in _metric_order(cells):
        label, what = _METRIC_TEXT.get(metric, (metric.replace("_", " ").capitalize(), ""))
        rows = sorted(
            (c for c in cells if c.metric == metric),
            key=lambda c: (names.get(c.district, c.district), c.district),
        )
        out.append(
            f'<section class="metric" id="metric-{_e(metric)}"><h3>{_e(label)}</h3>'
            f"<p>{_e(what)}</p><figure>{_forest(metric, label, rows, names)}</figure>"
            f"{_audit_table(metric, label, rows, names)}</section>"
        )
    out.append("</section>")
    return "".join(out)


# --- the follow-up report -------------------------------------------------------------


def _number(row: ReportRow, field: str, kind: str) -> str:
    value: Any = getattr(row, field)
    if kind == "share":
        return _pct(value)
    if kind == "days":
        return _days(value)
    return _int(value)


def _followup_table(period: str, rows: Sequence[ReportRow], names: Mapping[str, str]) -> str:
    out = [
        f'<table class="followup" data-period="{_e(period)}"><thead><tr>'
        '<th scope="col">District</th>'
        + "".join(f'<th scope="col" class="num">{_e(h)}</th>' for _, h, _ in _COLUMNS)
        + "</tr></thead><tbody>"
    ]
    for row in rows:
        is_city = row.district == CITY
        name = "City (each person once)" if is_city else names.get(row.district, row.district)
        classes = "city" if is_city else ("suppressed" if row.suppressed else "")
        out.append(
            f'<tr class="{classes}" data-district="{_e(row.district)}">'
            f'<th scope="row">{_e(name)}</th>'
        )
        if row.suppressed:
            out.append(f'<td class="num suppressed" colspan="{len(_COLUMNS)}">suppressed</td>')
        else:
            out.extend(f'<td class="num">{_e(_number(row, f, k))}</td>' for f, _, k in _COLUMNS)
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _bars(
    period: str,
    field: str,
    label: str,
    rows: Sequence[ReportRow],
    names: Mapping[str, str],
) -> str | None:
    """A bar per district for one share, with the city's value as a dashed line; None when
    there is nothing to draw."""
    districts = [r for r in rows if r.district != CITY]
    city = next((r for r in rows if r.district == CITY and not r.suppressed), None)
    city_value: float | None = getattr(city, field) if city is not None else None
    values: list[float | None] = [None if r.suppressed else getattr(r, field) for r in districts]
    if not districts or all(v is None for v in values):
        return None
    left, right, top, row_h = _label_width(districts, names, 130), 70, 26, 24
    width = max(540, left + 220 + right)
    plot_w = width - left - right
    bottom = top + len(districts) * row_h
    height = bottom + 40

    def x(value: float) -> float:
        return left + min(max(value, 0.0), 1.0) * plot_w

    ident = f"bars-{period}-{field}"
    desc = f"Bar chart of {label.lower()} per district in {period}" + (
        f"; dashed line: city {_pct(city_value)}" if city_value is not None else ""
    )
    out = [_svg_open(width, height, ident, f"{label}, {period}", desc)]
    for t in (0, 0.25, 0.5, 0.75, 1):
        out.append(_line(x(t), top - 4, x(t), bottom, _GRID))
        out.append(_text(x(t), bottom + 16, f"{t * 100:.0f} %", text_anchor="middle", fill=_INK))
    out.append(_line(left, bottom, left + plot_w, bottom, "#555"))
    labels: list[str] = []  # drawn last, over the city line
    for i, (row, value) in enumerate(zip(districts, values, strict=True)):
        cy = top + i * row_h + row_h / 2
        name = names.get(row.district, row.district)
        out.append(_text(left - 8, cy + 4, name, text_anchor="end", fill=_INK))
        if row.suppressed:
            out.append(_text(left + 6, cy + 4, "suppressed", fill=_MUTED, font_style="italic"))
        elif value is None:
            out.append(_text(left + 6, cy + 4, f"{DASH} no cases to count", fill=_MUTED))
        else:
            out.append(
                f'<rect x="{left}" y="{cy - 8:.1f}" width="{x(value) - left:.1f}" height="16"'
                f' fill="{_BLUE}" fill-opacity="0.85"><title>{_e(name)}: {_e(_pct(value))}'
                "</title></rect>"
            )
            labels.append(_text(x(value) + 5, cy + 4, _pct(value), fill=_INK, **_HALO))
    if city_value is not None:
        cx = x(city_value)
        out.append(_line(cx, top - 10, cx, bottom, _RED, stroke_width="2", stroke_dasharray="5 3"))
        anchor = "end" if city_value > 0.5 else "start"
        dx = -4 if anchor == "end" else 4
        out.append(
            _text(
                cx + dx,
                top - 12,
                f"city {_pct(city_value)}",
                text_anchor=anchor,
                fill=_RED,
                **_HALO,
            )
        )
    out.extend(labels)
    out.append(
        _text(left + plot_w / 2, bottom + 34, "share (0–100 %)", text_anchor="middle", fill=_MUTED)
    )
    out.append("</svg>")
    return "".join(out)


def _followup_section(report: Sequence[ReportRow], names: Mapping[str, str]) -> str:
    out = [
        '<section id="followup"><h2>Follow-up report</h2>',
        '<p class="lead">Cases counted in the period and district of their intake. Shares are'
        " percentages; days are from intake to the first intervention. The city row counts"
        " each person once, so it can be less than the sum of the districts.</p>",
    ]
    periods: dict[str, list[ReportRow]] = {}
    for row in report:
        periods.setdefault(row.period, []).append(row)
    if not periods:
        out.append("<p>No intakes in the period.</p>")
    for period, rows in periods.items():
        out.append(
            f'<section class="period" id="period-{_e(period)}"><h3>{_e(period)}</h3>'
            f"{_followup_table(period, rows, names)}"
        )
        charts = [
            f"<figure><figcaption>{_e(label)}</figcaption>{svg}</figure>"
            for field, label in _CHARTED
            if (svg := _bars(period, field, label, rows, names)) is not None
        ]
        if charts:
            out.append(f'<div class="charts">{"".join(charts)}</div>')
        else:
            out.append("<p>No shares to chart in this period.</p>")
        out.append("</section>")
    out.append("</section>")
    return "".join(out)


# --- the document ---------------------------------------------------------------------


def _when(moment: datetime) -> str:
    zone = moment.tzname()
    return moment.strftime("%Y-%m-%d %H:%M") + (f" {zone}" if zone else "")


def _provenance_section(record: Mapping[str, Any]) -> str:
    """What the figures were computed from, for the reader; then the whole record as JSON
    text for `likvard report --reproduce` (escaped: it is data, never markup)."""
    prov = record.get("provenance") or {}
    params = prov.get("parameters") or {}
    replay = params.get("replay") or {}
    code = prov.get("code") or {}
    chain = prov.get("chain") or {}
    offsets = prov.get("offsets") or []
    items = [
        ("Computed", str(prov.get("generated_at", DASH))),
        ("Read models", str(prov.get("schema", DASH))),
        ("Figures as of", str(params.get("as_of", DASH))),
        ("Events occurred by", replay.get("as_of") or "no cutoff"),
        ("Events recorded by (as known on)", replay.get("as_known_on") or "no cutoff"),
        (
            "Code",
            f"{code.get('package', 'likvard')} {code.get('version') or DASH}"
            + (f" (commit {code['commit']})" if code.get("commit") else ""),
        ),
        ("Reference data version", str((prov.get("reference") or {}).get("version", DASH))),
        (
            "Streams, digest of their chain heads (SHA-256)",
            f"{chain.get('streams', 0)} streams, {chain.get('heads_sha256', DASH)}",
        ),
    ]
    rows = "".join(
        f'<tr><td>{_e(o.get("topic"))}</td><td class="num">{_e(o.get("partition"))}</td>'
        f'<td class="num">{_e(o.get("offset"))}</td></tr>'
        for o in offsets
    )
    table = (
        '<table class="provenance"><caption>Highest offset applied, per topic partition'
        '</caption><thead><tr><th scope="col">Topic</th><th scope="col" class="num">'
        'Partition</th><th scope="col" class="num">Offset</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>"
        if offsets
        else "<p>No Kafka offsets are recorded for these read models (not folded from"
        " Kafka, or made before provenance was recorded): this report cannot be replayed.</p>"
    )
    listing = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    return (
        '<section id="provenance"><h2>Provenance</h2>'
        "<p>Every figure above was computed from the events up to these offsets. To check it,"
        " run <code>likvard report --reproduce</code> on this file: it replays the history"
        " up to exactly these offsets into a fresh schema and compares every figure.</p>"
        f'<dl class="meta">{listing}</dl>{table}'
        "<details><summary>Machine-readable record (provenance and every figure)</summary>"
        f'<pre id="{RECORD_ID}">{_e(record_json(record))}</pre></details></section>'
    )


def render(
    report: Sequence[ReportRow],
    cells: Sequence[AuditCell],
    *,
    title: str,
    generated_at: datetime,
    period_from: date,
    period_to: date,
    structure: str,
    district_names: Mapping[str, str] | None = None,
    record: Mapping[str, Any] | None = None,
) -> str:
    """The whole report as one HTML5 document that needs nothing but itself to be read;
    with `record`, a provenance block that holds it."""
    names = dict(district_names or {})
    structure_text = _STRUCTURE_TEXT.get(structure, structure)
    header = (
        f'<header><h1>{_e(title)}</h1><dl class="meta">'
        f"<dt>Generated</dt><dd>{_e(_when(generated_at))}</dd>"
        f"<dt>Period (intake dates)</dt><dd>{_e(period_from.isoformat())} to"
        f" {_e(period_to.isoformat())}</dd>"
        f"<dt>District structure</dt><dd>{_e(structure_text)}</dd></dl>"
        '<div class="howto"><strong>How to read this report</strong><ul>'
        "<li>A person is counted once city-wide: persons are pseudonyms, never names or"
        " identity numbers.</li>"
        f"<li>Cells with fewer than {MIN_CELL} persons are suppressed: they show the word"
        " “suppressed” and no figures at all.</li>"
        "<li>A district is <strong>flagged</strong> (⚑, highlighted in red) when the 95%"
        " confidence interval of its need-adjusted ratio excludes 1 <em>and</em> the ratio"
        f" is outside {BAND[0]:g}–{BAND[1]:g}. “Lower” means fewer persons got this than in"
        " the rest of the city with the same need.</li>"
        f"<li>{DASH} means the figure could not be computed (no cases to count); the note"
        " says why.</li></ul></div>"
        '<nav><ul><li><a href="#audit">Equal-access audit</a></li>'
        '<li><a href="#followup">Follow-up report</a></li>'
        + ('<li><a href="#provenance">Provenance</a></li>' if record is not None else "")
        + "</ul></nav></header>"
    )
    provenance = _provenance_section(record) if record is not None else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"{header}<main>{_audit_section(cells, names)}{_followup_section(report, names)}"
        f"{provenance}</main>"
        "<footer>Produced by Likvärd from the city's event history. Every figure is a"
        " projection of recorded events; small counts are suppressed.</footer>"
        "</body></html>\n"
    )


def build(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    start: date,
    end: date,
    structure: str = "current",
    period: str = "year",
    as_of: datetime | None = None,
) -> str:
    """Read the follow-up report and the audit from the projections in `schema` and render
    them with their record; `structure` is "current" or "as-recorded", `period` "year" or
    "month"; `as_of` (default: now) the instant the figures are computed as of."""
    params = Parameters(start, end, structure, period, as_of or default_as_of())
    return build_report(conn, schema, params)[0]


def build_report(
    conn: psycopg.Connection[Any], schema: str, params: Parameters
) -> tuple[str, Report]:
    """The HTML document and the report it shows (rows, cells, record), read in one
    snapshot of `schema`; `conn` must have no transaction in progress."""
    registry = DistrictRegistry.load()
    made = snapshot(conn, schema, params, registry)
    document = render(
        made.rows,
        made.cells,
        title=DEFAULT_TITLE,
        generated_at=datetime.now(ZoneInfo(TIME_ZONE)),
        period_from=params.start,
        period_to=params.end,
        structure=params.structure,
        district_names=_display_names(registry),
        record=made.record,
    )
    return document, made


def _display_names(registry: DistrictRegistry) -> dict[str, str]:
    """District names by code; an ended district whose name a later one reuses (e.g.
    "Centrum" 2011-2020) gets its years, so an as-recorded report never shows two equal
    labels, while the current districts keep their plain names."""
    districts = list(registry)
    counts: dict[str, int] = {}
    for d in districts:
        counts[d.name] = counts.get(d.name, 0) + 1
    names: dict[str, str] = {}
    for d in districts:
        shared = counts[d.name] > 1 and d.valid_to is not None
        names[d.code] = f"{d.name} ({d.valid_from:%Y}–{d.valid_to:%Y})" if shared else d.name
    return names
