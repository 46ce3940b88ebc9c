"""The follow-up report and the equal-access audit as one self-contained HTML document.

An auditor must be able to open the file offline, years later, on a locked-down machine,
and print it. So the document has no external resource of any kind: no scripts, no
stylesheets or fonts to fetch, no URLs; CSS is inline and every chart is a Vega-Lite
specification (Altair) rendered here to static SVG by vl-convert, offline (`charts.py`).
Text from the data (district names, notes) is always escaped.

The audit shows, per metric, the standardised ratios with their intervals (dot and
whisker, the model-based ratio beside each) and the funnel plot, flagged by the report's
flag rule (Holm by default, the band rule as an option), and says how many comparisons
were made; the waits show Kaplan-Meier curves per district, medians and 90th percentiles
with the persons still waiting censored, and the need-stratified comparisons; a small table
counts the referrals and follow-ups overdue on the report's last day, with the two day
settings stated.

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
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from likvard.districts import DistrictRegistry
from services.projections import charts, stats
from services.projections.audit import METRICS, AuditCell, AuditReport, FlagRule
from services.projections.reports import (
    CITY,
    TIME_ZONE,
    ReportRow,
)
from services.projections.reproduce import (
    ANSWER_DAYS,
    RECORD_ID,
    WINDOW_DAYS,
    Overdue,
    Parameters,
    Report,
    default_as_of,
    record_json,
    snapshot,
)
from services.projections.stats import WaitReport, WaitSummary

__all__ = ["DEFAULT_TITLE", "build", "build_report", "render"]

DEFAULT_TITLE = "Likvärd: follow-up report and equal-access audit"
MIN_CELL = 5  # the suppression threshold of `followup_report` and `audit` (their default)
BAND = (0.8, 1.25)  # the tolerated band of the audit's band rule (its default)
SUPPRESSED_TEXT = f"suppressed (fewer than {MIN_CELL})"
DASH = "—"

_STRUCTURE_TEXT: Mapping[str, str] = {
    "current": "current districts (old district codes counted under their successors)",
    "as-recorded": "as recorded at intake (old district codes kept)",
}

# Audit metrics: a heading and what the rate counts.
METRIC_TEXT: Mapping[str, tuple[str, str]] = {
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
.metric, .period, .wait { break-inside: avoid; page-break-inside: avoid; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr));
  gap: 8px 24px; }
figure { margin: .4em 0; break-inside: avoid; page-break-inside: avoid; }
figcaption { font-weight: 600; font-size: .95em; margin-bottom: .2em; }
svg { display: block; max-width: 100%; height: auto; }
p.rule { font-weight: 600; }
p.note { color: #444; font-size: .9em; }
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


def _num(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f}"


def _p(value: float | None) -> str:
    if value is None:
        return DASH
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _ci(low: float | None, high: float | None) -> str:
    return DASH if low is None or high is None else f"{low:.2f}–{high:.2f}"


def judged(cell: AuditCell, rule: FlagRule) -> float | None:
    """The ratio the flag rule judges: the standardised ratio (Holm's test is on O - E),
    the model-based adjusted ratio (the band rule); the other when that one is missing."""
    first, second = (
        (cell.sr, cell.adjusted_ratio) if rule == "holm" else (cell.adjusted_ratio, cell.sr)
    )
    return first if first is not None else second


def _direction(cell: AuditCell, rule: FlagRule) -> str:
    """Which way a flagged district deviates, for readers who cannot see the colour."""
    value = judged(cell, rule)
    if value is None:
        return ""
    return "lower" if value < 1 else "higher"


def _flag_marker(text: str) -> str:
    return f'<span class="flag-marker">{_e(text)}</span>'


def _rule_text(rule: FlagRule, comparisons: int, alpha: float) -> str:
    if rule == "holm":
        return (
            f"Holm-adjusted p &lt; {alpha:g} over {comparisons} comparisons (each district"
            " against the city on each metric, need level, age band and gender standardised)"
        )
    return (
        f"the {100 * (1 - alpha):g}% interval of the need-adjusted ratio excludes 1 and the"
        f" ratio is outside {BAND[0]:g}–{BAND[1]:g} (the band rule: no control for the"
        f" {comparisons} comparisons made)"
    )


# --- the equal-access audit -----------------------------------------------------------


def _ratio_chart(
    metric: str, label: str, cells: Sequence[AuditCell], names: Mapping[str, str], rule: FlagRule
) -> str:
    """Dot and whisker: the standardised ratio and the model-based ratio per district."""
    rows: list[charts.Ratio] = []
    for c in cells:
        name = names.get(c.district, c.district)
        is_flag = c.flagged and not c.suppressed
        if c.suppressed:
            rows.append(
                charts.Ratio(name, None, None, None, None, None, None, False, SUPPRESSED_TEXT)
            )
            continue
        if c.sr is None and c.adjusted_ratio is None:
            text = f"{DASH} not computable (see note)"
        else:
            text = f"SR {_ratio(c.sr)} ({_ci(c.sr_low, c.sr_high)})"
            if is_flag:
                text += f" flagged, {_direction(c, rule)}"
        rows.append(
            charts.Ratio(
                name,
                c.sr,
                c.sr_low,
                c.sr_high,
                c.adjusted_ratio,
                c.ci_low,
                c.ci_high,
                is_flag,
                text,
            )
        )
    flagged = sum(1 for c in cells if c.flagged and not c.suppressed)
    desc = (
        f"Dot-and-whisker chart of {label}: per district the standardised ratio (observed"
        " over expected from the city's rates within strata of need level, age band and"
        " gender) with its 95% score interval, and beside it the model-based need-adjusted"
        f" ratio to the rest of the city with its 95% interval; log scale. {flagged} flagged."
    )
    chart = charts.ratios(
        rows,
        band=BAND if rule == "band" else None,
        x_title="ratio to the city (log scale; 1 = as the city)",
    )
    return charts.inline(chart, f"ratios-{metric}", f"{label}: standardised ratios", desc)


def _funnel_chart(
    metric: str,
    label: str,
    cells: Sequence[AuditCell],
    fun: stats.Funnel | None,
    names: Mapping[str, str],
) -> str | None:
    """The funnel plot; drawn from the unsuppressed cells only (a suppressed district is
    never a point, whatever the funnel holds)."""
    shown = [
        c for c in cells if not c.suppressed and c.funnel_rate is not None and c.persons is not None
    ]
    if fun is None or not shown:
        return None
    dots = [
        charts.FunnelDot(
            names.get(c.district, c.district),
            c.persons or 0,
            c.funnel_rate or 0.0,
            c.flagged,
        )
        for c in shown
    ]
    curve = fun.curve
    chart = charts.funnel(
        dots,
        target=fun.target,
        persons=curve.persons,
        limits={
            "95 % limits": (curve.low_95, curve.high_95),
            "99.8 % limits": (curve.low_998, curve.high_998),
        },
    )
    widened = " widened for over-dispersion" if fun.phi_applied else ""
    desc = (
        f"Funnel plot of {label}: each district's standardised rate against its number of"
        f" eligible persons, with 95% and 99.8% control limits{widened} around the city"
        f" rate {_pct(fun.target)}. "
        + "; ".join(
            f"{d.label}: {_pct(d.rate)} at {d.persons}{' (flagged)' if d.flagged else ''}"
            for d in dots
        )
    )
    return charts.inline(chart, f"funnel-{metric}", f"{label}: funnel plot", desc)


def _funnel_note(fun: stats.Funnel | None) -> str:
    if fun is None:
        return ""
    if fun.phi_applied and fun.phi is not None:
        text = (
            f"The districts vary more than chance allows (over-dispersion factor φ ="
            f" {fun.phi:.2f}, p {_p(fun.phi_p_value)}): the limits are widened by √φ and the"
            " p-values allow for it."
        )
    elif fun.phi is not None:
        text = f"Over-dispersion factor φ = {fun.phi:.2f}, not applied" + (
            f" ({fun.note})." if fun.note else " (no excess variation between districts)."
        )
    else:
        text = fun.note or "Too few districts to estimate over-dispersion."
    return f'<p class="note">{_e(text)}</p>'


_AUDIT_HEADS = (
    "Persons",
    "Rate",
    "Rest-of-city rate",
    "Crude ratio",
    "Adjusted ratio",
    "95% interval",
    "MH ratio",
    "Observed",
    "Expected",
    "SR (O/E)",
    "SR 95% interval",
    "Funnel",
    "p",
    "Holm p",
)
_POSITION_TEXT: Mapping[str, str] = {
    "low_99.8": "below 99.8 %",
    "low_95": "below 95 %",
    "inside": "inside",
    "high_95": "above 95 %",
    "high_99.8": "above 99.8 %",
}


def _audit_table(
    metric: str, label: str, cells: Sequence[AuditCell], names: Mapping[str, str], rule: FlagRule
) -> str:
    out = [
        f'<table class="audit" data-metric="{_e(metric)}">'
        f"<caption>{_e(label)}: figures per district</caption><thead><tr>"
        '<th scope="col">District</th>'
        + "".join(f'<th scope="col" class="num">{_e(h)}</th>' for h in _AUDIT_HEADS)
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
            out.append(f'<td class="num suppressed" colspan="{len(_AUDIT_HEADS)}">suppressed</td>')
        else:
            numbers = (
                _int(cell.persons),
                _pct(cell.rate),
                _pct(cell.city_rate),
                _ratio(cell.ratio),
                _ratio(cell.adjusted_ratio),
                _ci(cell.ci_low, cell.ci_high),
                _ratio(cell.mh_ratio),
                _int(cell.observed),
                _num(cell.expected),
                _ratio(cell.sr),
                _ci(cell.sr_low, cell.sr_high),
                _POSITION_TEXT.get(cell.funnel_position or "", DASH),
                _p(cell.p_value),
                _p(cell.p_holm),
            )
            out.extend(f'<td class="num">{_e(n)}</td>' for n in numbers)
        marker = f"⚑ flagged: {_direction(cell, rule)}" if _direction(cell, rule) else "⚑ flagged"
        out.append(f"<td>{_flag_marker(marker) if is_flag else ''}</td>")
        out.append(f'<td class="note">{_e(cell.note or "")}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def metric_order(cells: Sequence[AuditCell]) -> list[str]:
    found = {c.metric for c in cells}
    return [m for m in METRICS if m in found] + sorted(found - set(METRICS))


def _audit_section(made: AuditReport, names: Mapping[str, str]) -> str:
    cells, rule = made.cells, made.flag_rule
    out = [
        '<section id="audit"><h2>Equal-access audit</h2>',
        '<p class="lead">Each district against the city, each person once (by their most'
        " recent case; the audit covers every case in the read model, not only the period"
        " below). The <strong>standardised ratio</strong> (SR) is the district's observed"
        " count over the count expected if its persons had the city's rate of their stratum"
        " (need level × age band × gender), with a 95% score interval; the funnel plot puts"
        " each district's standardised rate against its number of eligible persons, inside"
        " 95% and 99.8% limits around the city rate. The <em>adjusted ratio</em> is the"
        " model-based need-adjusted ratio to the rest of the city, shown beside it. A ratio"
        " below 1 means the district's rate is lower.</p>",
    ]
    if not cells:
        out.append("<p>No person with an assessed need level: nothing to audit.</p></section>")
        return "".join(out)
    rule_text = _rule_text(rule, made.comparisons, made.alpha)
    out.append(f'<p class="rule">Flag rule: a cell is flagged when {rule_text}.</p>')
    flagged = [c for c in cells if c.flagged and not c.suppressed]
    if flagged:
        items = "".join(
            f"<li>{_e(names.get(c.district, c.district))}, "
            f"{_e(METRIC_TEXT.get(c.metric, (c.metric, ''))[0])}: {_e(_direction(c, rule))}"
            f" (SR {_e(_ratio(c.sr))}, 95% interval {_e(_ci(c.sr_low, c.sr_high))};"
            f" Holm p {_e(_p(c.p_holm))}; adjusted ratio {_e(_ratio(c.adjusted_ratio))})</li>"
            for c in flagged
        )
        out.append(
            f'<p class="summary flags">{len(flagged)} flagged'
            f" cell{'s' if len(flagged) != 1 else ''} of {made.comparisons} comparisons:</p>"
            f"<ul>{items}</ul>"
        )
    else:
        out.append(
            f'<p class="summary">No district is flagged ({made.comparisons} comparisons).</p>'
        )
    for metric in metric_order(cells):
        label, what = METRIC_TEXT.get(metric, (metric.replace("_", " ").capitalize(), ""))
        rows = sorted(
            (c for c in cells if c.metric == metric),
            key=lambda c: (names.get(c.district, c.district), c.district),
        )
        fun = made.funnels.get(metric)
        funnel_svg = _funnel_chart(metric, label, rows, fun, names)
        figures = [
            "<figure><figcaption>Standardised ratios, 95% intervals</figcaption>"
            f"{_ratio_chart(metric, label, rows, names, rule)}</figure>"
        ]
        if funnel_svg is not None:
            figures.append(
                f"<figure><figcaption>Funnel plot</figcaption>{funnel_svg}"
                f"{_funnel_note(fun)}</figure>"
            )
        out.append(
            f'<section class="metric" id="metric-{_e(metric)}"><h3>{_e(label)}</h3>'
            f'<p>{_e(what)}</p><div class="charts">{"".join(figures)}</div>'
            f"{_audit_table(metric, label, rows, names, rule)}</section>"
        )
    out.append("</section>")
    return "".join(out)


# --- waiting times --------------------------------------------------------------------

WAIT_TEXT: Mapping[str, tuple[str, str]] = {
    "intake_to_first_visit": (
        "Intake to first personal visit",
        "From the intake to the first personal visit (the Kolada indicator U35537).",
    ),
    "referral_to_answer": (
        "Referral to answer",
        "From the first referral to the unit's answer (accepted or declined).",
    ),
    "referral_to_start": (
        "Referral to start",
        "From the first referral to the start of an intervention.",
    ),
    "intervention_end_to_followup": (
        "End of intervention to follow-up",
        "From the end of the first intervention to a completed follow-up interview.",
    ),
}


def _wait_direction(s: WaitSummary) -> str:
    if s.hazard_ratio is None:
        return ""
    return "waits longer" if s.hazard_ratio < 1 else "waits shorter"


def _wait_table(
    wait: str, label: str, rows: Sequence[WaitSummary], names: Mapping[str, str]
) -> str:
    heads = (
        "Persons",
        "Wait ended",
        "Still waiting (censored)",
        "Median days",
        "90th percentile days",
        "Hazard ratio",
        "95% interval",
        "Log-rank p",
        "Holm p",
    )
    out = [
        f'<table class="waits" data-wait="{_e(wait)}">'
        f"<caption>{_e(label)}: Kaplan-Meier figures per district</caption><thead><tr>"
        '<th scope="col">District</th>'
        + "".join(f'<th scope="col" class="num">{_e(h)}</th>' for h in heads)
        + '<th scope="col">Flag</th><th scope="col">Note</th></tr></thead><tbody>'
    ]
    for s in rows:
        is_city = s.district == stats.CITY
        name = "City (each person once)" if is_city else names.get(s.district, s.district)
        is_flag = s.flagged and not s.suppressed
        classes = "city" if is_city else ("flagged" if is_flag else "")
        if s.suppressed and not is_city:
            classes = "suppressed"
        out.append(
            f'<tr class="{classes}" data-district="{_e(s.district)}">'
            f'<th scope="row">{_e(name)}</th>'
        )
        if s.suppressed:
            out.append(f'<td class="num suppressed" colspan="{len(heads)}">suppressed</td>')
        else:
            numbers = (
                _int(s.persons),
                _int(s.events),
                _int(s.censored),
                _days(s.median_days),
                _days(s.p90_days),
                _ratio(s.hazard_ratio),
                _ci(s.hr_low, s.hr_high),
                _p(s.logrank_p),
                _p(s.p_holm),
            )
            out.extend(f'<td class="num">{_e(n)}</td>' for n in numbers)
        marker = f"⚑ flagged: {_wait_direction(s)}" if _wait_direction(s) else "⚑ flagged"
        out.append(f"<td>{_flag_marker(marker) if is_flag else ''}</td>")
        note = "" if s.suppressed else (s.note or "")
        out.append(f'<td class="note">{_e(note)}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _waits_section(waits: WaitReport | None, names: Mapping[str, str]) -> str:
    out = [
        '<section id="waits"><h2>Waiting times</h2>',
        '<p class="lead">Each wait as time to an event: a person still waiting at the'
        " report's as-of time (or whose case closed first) is <em>censored</em>, counted"
        " as waiting so far, never dropped nor counted as a zero wait. The curves are"
        " Kaplan-Meier estimates of the share still waiting; medians and 90th percentiles"
        " are read from them (— when too many still wait for the curve to get that low)."
        " Each district is compared with the rest of the city with need level as strata"
        " (stratified log-rank test; Cox hazard ratio: below 1 means its persons wait"
        " longer).</p>",
    ]
    if waits is None or not waits.summaries:
        out.append("<p>No waits to report.</p></section>")
        return "".join(out)
    flagged = [s for s in waits.summaries if s.flagged and not s.suppressed]
    out.append(
        f'<p class="rule">Flag rule: Holm-adjusted log-rank p &lt; {waits.alpha:g} over'
        f" {waits.comparisons} comparisons (district × wait).</p>"
    )
    if flagged:
        items = "".join(
            f"<li>{_e(names.get(s.district, s.district))},"
            f" {_e(WAIT_TEXT.get(s.wait, (s.wait, ''))[0])}: {_e(_wait_direction(s))}"
            f" (hazard ratio {_e(_ratio(s.hazard_ratio))}, Holm p {_e(_p(s.p_holm))})</li>"
            for s in flagged
        )
        out.append(f'<p class="summary flags">{len(flagged)} flagged:</p><ul>{items}</ul>')
    by_wait: dict[str, list[WaitSummary]] = {}
    for s in waits.summaries:
        by_wait.setdefault(s.wait, []).append(s)
    order = [w for w in WAIT_TEXT if w in by_wait] + sorted(set(by_wait) - set(WAIT_TEXT))
    for wait in order:
        label, what = WAIT_TEXT.get(wait, (wait.replace("_", " ").capitalize(), ""))
        rows = sorted(
            by_wait[wait],
            key=lambda s: (s.district != stats.CITY, names.get(s.district, s.district)),
        )
        lines = [
            charts.KmLine(
                "City" if s.district == stats.CITY else names.get(s.district, s.district),
                s.curve,
                city=s.district == stats.CITY,
            )
            for s in rows
            if not s.suppressed and s.curve
        ]
        figure = ""
        if lines:
            desc = f"Kaplan-Meier curves of {label.lower()}: share still waiting by days. " + (
                "; ".join(
                    f"{names.get(s.district, s.district)}: median {_days(s.median_days)},"
                    f" 90th percentile {_days(s.p90_days)}"
                    for s in rows
                    if not s.suppressed
                )
            )
            svg = charts.inline(charts.km_curves(lines), f"km-{wait}", label, desc)
            figure = f"<figure><figcaption>Share still waiting</figcaption>{svg}</figure>"
        else:
            figure = "<p>Every district is suppressed: no curve to draw.</p>"
        out.append(
            f'<section class="wait" id="wait-{_e(wait)}"><h3>{_e(label)}</h3><p>{_e(what)}</p>'
            f"{figure}{_wait_table(wait, label, rows, names)}</section>"
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
    bars = [
        charts.Bar(
            names.get(r.district, r.district),
            v,
            "suppressed" if r.suppressed else (_pct(v) if v is not None else f"{DASH} no cases"),
        )
        for r, v in zip(districts, values, strict=True)
    ]
    desc = f"Bar chart of {label.lower()} per district in {period}" + (
        f"; dashed line: city {_pct(city_value)}" if city_value is not None else ""
    )
    chart = charts.bars(bars, city=city_value, city_text=f"city {_pct(city_value)}")
    return charts.inline(chart, f"bars-{period}-{field}", f"{label}, {period}", desc)


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


# --- overdue referrals and follow-ups --------------------------------------------------


def _overdue_section(overdue: Overdue | None, names: Mapping[str, str]) -> str:
    """Per district and for the city, what was overdue on the day (small counts shown as
    suppressed, never as numbers)."""
    out = ['<section id="overdue"><h2>Overdue referrals and follow-ups</h2>']
    if overdue is None:
        out.append("<p>Not counted for this report.</p></section>")
        return "".join(out)
    day = overdue.day.isoformat()
    out.append(
        f'<p class="lead">As of {_e(day)} (end of the day, city time): referrals not'
        f" answered (accepted, declined or withdrawn) more than {overdue.answer_days} days"
        f" after they were requested, and follow-ups not done (completed or missed) more than"
        f" {overdue.window_days} days after they were due. A referral counts in the case's"
        " district on the day, a follow-up in the district it was scheduled in. Districts"
        " with nothing overdue are not listed.</p>"
    )
    out.append(
        f'<table class="overdue" data-day="{_e(day)}"><caption>Overdue on {_e(day)}: referrals'
        f" unanswered after {overdue.answer_days} days, follow-ups more than"
        f" {overdue.window_days} days past due</caption><thead><tr>"
        '<th scope="col">District</th><th scope="col" class="num">Referrals overdue</th>'
        '<th scope="col" class="num">Follow-ups overdue</th></tr></thead><tbody>'
    )
    for c in overdue.counts:
        is_city = c.district == CITY
        name = "City (all districts)" if is_city else names.get(c.district, c.district)
        cells = "".join(
            '<td class="num suppressed">suppressed</td>'
            if n is None
            else f'<td class="num">{_e(n)}</td>'
            for n in (c.referrals_overdue, c.followups_overdue)
        )
        out.append(
            f'<tr class="{"city" if is_city else ""}" data-district="{_e(c.district)}">'
            f'<th scope="row">{_e(name)}</th>{cells}</tr>'
        )
    out.append("</tbody></table></section>")
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
    made: AuditReport,
    *,
    title: str,
    generated_at: datetime,
    period_from: date,
    period_to: date,
    structure: str,
    district_names: Mapping[str, str] | None = None,
    record: Mapping[str, Any] | None = None,
    waits: WaitReport | None = None,
    overdue: Overdue | None = None,
) -> str:
    """The whole report as one HTML5 document that needs nothing but itself to be read:
    the audit `made` (its cells, funnels and flag rule), the waits, the follow-up report,
    the overdue counts; with `record`, a provenance block that holds it."""
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
        "<li>A district is <strong>flagged</strong> (⚑, highlighted in red) when"
        f" {_rule_text(made.flag_rule, made.comparisons, made.alpha)}. “Lower” means fewer"
        " persons got this than expected from the city's rates for persons like them.</li>"
        "<li>Waiting times count persons still waiting as censored (Kaplan-Meier), not as"
        " finished.</li>"
        f"<li>{DASH} means the figure could not be computed (no cases to count); the note"
        " says why.</li></ul></div>"
        '<nav><ul><li><a href="#audit">Equal-access audit</a></li>'
        '<li><a href="#waits">Waiting times</a></li>'
        '<li><a href="#followup">Follow-up report</a></li>'
        '<li><a href="#overdue">Overdue</a></li>'
        + ('<li><a href="#provenance">Provenance</a></li>' if record is not None else "")
        + "</ul></nav></header>"
    )
    provenance = _provenance_section(record) if record is not None else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"{header}<main>{_audit_section(made, names)}{_waits_section(waits, names)}"
        f"{_followup_section(report, names)}{_overdue_section(overdue, names)}"
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
    flag_rule: str = "holm",
    answer_days: int = ANSWER_DAYS,
    window_days: int = WINDOW_DAYS,
) -> str:
    """Read the follow-up report, the audit, the waits and the overdue counts from the
    projections in `schema` and render them with their record; `structure` is "current" or
    "as-recorded", `period` "year" or "month"; `as_of` (default: now) the instant the
    figures are computed as of; `flag_rule` "holm" (default) or "band"; `answer_days` and
    `window_days` the overdue rule's days (Settings.referral_answer_days and
    followup_window_days)."""
    params = Parameters(
        start,
        end,
        structure,
        period,
        as_of or default_as_of(),
        flag_rule=flag_rule,
        answer_days=answer_days,
        window_days=window_days,
    )
    return build_report(conn, schema, params)[0]


def build_report(
    conn: psycopg.Connection[Any], schema: str, params: Parameters
) -> tuple[str, Report]:
    """The HTML document and the report it shows (rows, audit, waits, record), read in one
    snapshot of `schema`; `conn` must have no transaction in progress."""
    registry = DistrictRegistry.load()
    made = snapshot(conn, schema, params, registry)
    assert made.audit is not None  # a snapshot always computes the audit
    document = render(
        made.rows,
        made.audit,
        title=DEFAULT_TITLE,
        generated_at=datetime.now(ZoneInfo(TIME_ZONE)),
        period_from=params.start,
        period_to=params.end,
        structure=params.structure,
        district_names=display_names(registry),
        record=made.record,
        waits=made.waits,
        overdue=made.overdue,
    )
    return document, made


def display_names(registry: DistrictRegistry) -> dict[str, str]:
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
