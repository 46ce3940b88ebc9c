"""What the analysis pages show, shaped for their templates (no I/O): the filters read
from a query string, the indicators' years, and per metric, indicator or wait its chart
(rendered by `charts`, in the viewer's language) and the figures of its table.

Every chart is drawn by `charts` (Altair, rendered to SVG by vl-convert). vl-convert
writes SVG presentation attributes (`fill="..."`), never `style="..."`, so the SVG is
inlined as it is under the console's CSP (`style-src 'self'`, no 'unsafe-inline'); `embed`
checks that on every chart and would make it an `<img>` of a data: URL if a renderer ever
wrote a style attribute. A suppressed figure is never a point: `charts.ratio_rows`,
`charts.funnel_dots` and `charts.series_points` leave it out.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any
from urllib.parse import urlencode

from likvard.domain import AGE_BANDS
from services.projections import audit, charts, html_report, indicators, reports, reproduce, stats
from services.projections.console import i18n
from services.projections.console.web import Console, Viewer

STRUCTURES: tuple[reports.Structure, ...] = ("current", "as-recorded")
FLAG_RULES: tuple[audit.FlagRule, ...] = ("holm", "band")
AGE_BAND_CODES: tuple[str, ...] = (*(code for _, _, code in AGE_BANDS), "UNKNOWN")
NEED_LABELS = {"LOW": "Low", "MODERATE": "Moderate", "HIGH": "High"}  # message ids
GENDER_LABELS = {"WOMAN": "Woman", "MAN": "Man", "OTHER": "Other", "NOT_STATED": "Not stated"}
YEARS = 5  # full years before the current one on the indicators page
CHART_LOCALES: dict[str, charts.ChartLocale] = {"sv": "sv-SE", "en": "en-GB"}
_STYLE_ATTRIBUTE = re.compile(r"<[^>]*\sstyle\s*=", re.IGNORECASE)
# English message ids of the audit's and the waits' headings (html_report's texts)
METRIC_TEXT = html_report.METRIC_TEXT
WAIT_TEXT = html_report.WAIT_TEXT


def embed(svg: str, alt: str) -> str:
    """The chart for the page: the SVG inline when it holds no style attribute (which a
    CSP without 'unsafe-inline' would block), else an <img> of it as a data: URL."""
    if not _STYLE_ATTRIBUTE.search(svg):
        return svg
    document = svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)
    data = base64.b64encode(document.encode()).decode("ascii")
    return f'<img src="data:image/svg+xml;base64,{data}" alt="{html.escape(alt, quote=True)}">'


# --- the filters ------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilters(reproduce.EqualAccessAsked):
    """What the equal-access page is asked for (None: every one): the API's filters, and
    the query string of its download links."""

    def query(self) -> str:
        """The filters as a query string (for the download links), only those set."""
        pairs = {
            "structure": self.structure,
            "from": self.start.isoformat() if self.start else None,
            "to": self.end.isoformat() if self.end else None,
            "need_level": self.need_level,
            "gender": self.gender,
            "age_band": self.age_band,
            "flag_rule": self.flag_rule,
        }
        return urlencode({k: v for k, v in pairs.items() if v})


def _choice(
    query: Mapping[str, str], name: str, allowed: Sequence[str], problems: list[str]
) -> str | None:
    value = query.get(name) or None
    if value is not None and value not in allowed:
        problems.append(name)
        return None
    return value


def _day(query: Mapping[str, str], name: str, problems: list[str]) -> date | None:
    value = query.get(name) or None
    if value is None:
        return None
    try:
        found = date.fromisoformat(value)
    except ValueError:
        problems.append(name)
        return None
    if not 1900 <= found.year <= 2099:
        problems.append(name)
        return None
    return found


def audit_filters(query: Mapping[str, str]) -> tuple[AuditFilters, list[str]]:
    """The filters asked for, and the names of those ignored (not a value of the form)."""
    problems: list[str] = []
    structure = structure_of(query, problems)
    start, end = _day(query, "from", problems), _day(query, "to", problems)
    if start is not None and end is not None and end < start:
        problems.append("to")
        start = end = None
    found = _choice(query, "flag_rule", FLAG_RULES, problems)
    rule: audit.FlagRule = "band" if found == "band" else "holm"
    return (
        AuditFilters(
            structure=structure,
            start=start,
            end=end,
            need_level=_choice(query, "need_level", audit.NEED_LEVELS, problems),
            gender=_choice(query, "gender", audit.GENDERS, problems),
            age_band=_choice(query, "age_band", AGE_BAND_CODES, problems),
            flag_rule=rule,
        ),
        problems,
    )


def structure_of(query: Mapping[str, str], problems: list[str]) -> reports.Structure:
    """The district structure asked for (current by default)."""
    found = _choice(query, "structure", STRUCTURES, problems)
    return "as-recorded" if found == "as-recorded" else "current"


# --- the indicators' periods ------------------------------------------------------------


@dataclass(frozen=True)
class Year:
    """One column of the indicators: a calendar year, the current one up to today."""

    year: int
    start: date
    end: date
    to_date: bool


def indicator_years(today: date, first: date | None, years: int = YEARS) -> list[Year]:
    """The last `years` full years and the current year to date, from the year of the
    first intake on (no column for years before the data begins; none without data)."""
    if first is None:
        return []
    begin = max(today.year - years, min(first.year, today.year))
    return [
        Year(y, date(y, 1, 1), today if y == today.year else date(y, 12, 31), y == today.year)
        for y in range(begin, today.year + 1)
    ]


# --- what the templates show --------------------------------------------------------------


@dataclass(frozen=True)
class MetricSection:
    metric: str
    title: str
    what: str
    ratio_chart: str | None  # None: every district suppressed
    funnel_chart: str | None
    funnel: stats.Funnel | None
    cells: list[audit.AuditCell]
    directions: dict[str, str]  # a flagged district: "lower" or "higher"


@dataclass(frozen=True)
class IndicatorSection:
    indicator: indicators.Indicator
    title: str
    chart: str | None
    rows: list[tuple[str, str, list[indicators.Figure | None]]]  # code, name, per year
    available: bool = True


@dataclass(frozen=True)
class WaitSection:
    wait: str
    title: str
    what: str
    chart: str | None
    rows: list[stats.WaitSummary] = field(default_factory=list)


class Words:
    """The viewer's language for the texts drawn in charts and their descriptions."""

    def __init__(self, console: Console, viewer: Viewer) -> None:
        self.lang = viewer.language
        self._ = console.gettext(viewer.language)
        self.chart = charts.ENGLISH.translated(self._)
        self.locale = CHART_LOCALES.get(self.lang)

    def num(self, value: float | None, digits: int = 2) -> str:
        return i18n.number(value, self.lang, digits)

    def share(self, value: float | None) -> str:
        return i18n.share(value, self.lang)

    def interval(self, low: float | None, high: float | None) -> str:
        return "–" if low is None or high is None else f"{self.num(low)}–{self.num(high)}"

    def inline(self, chart: Any, ident: str, title: str, desc: str) -> str:
        return embed(charts.inline(chart, ident, title, desc, locale=self.locale), title)


def direction(cell: audit.AuditCell, rule: audit.FlagRule) -> str:
    """Which way a cell deviates ("lower"/"higher") by the ratio its flag rule judges."""
    value = html_report.judged(cell, rule)
    return "" if value is None else ("lower" if value < 1 else "higher")


def metric_sections(
    made: audit.AuditReport, names: Mapping[str, str], w: Words
) -> list[MetricSection]:
    _ = w._
    out: list[MetricSection] = []
    for metric in html_report.metric_order(made.cells):
        title, what = METRIC_TEXT.get(metric, (metric.replace("_", " ").capitalize(), ""))
        title, what = _(title), _(what) if what else ""
        cells = sorted(
            (c for c in made.cells if c.metric == metric),
            key=lambda c: (names.get(c.district, c.district), c.district),
        )

        def text(c: audit.AuditCell) -> str:
            if c.sr is None and c.adjusted_ratio is None:
                return _("not computable")
            written = f"SR {w.num(c.sr)} ({w.interval(c.sr_low, c.sr_high)})"
            way = direction(c, made.flag_rule)
            return written + (f" {_('flagged')}, {_(way)}" if c.flagged and way else "")

        rows = charts.ratio_rows(cells, names, suppressed_text=_("suppressed"), text=text)
        band = html_report.BAND if made.flag_rule == "band" else None
        x_title = _("ratio to the city (log scale; 1 = as the city)")
        ratio = None
        if any(not c.suppressed for c in cells):
            ratio = w.inline(
                charts.ratios(rows, band=band, x_title=x_title, words=w.chart),
                f"ratios-{metric}",
                _("%(metric)s: standardised ratios") % {"metric": title},
                _(
                    "Dot-and-whisker chart of %(metric)s: per district the standardised ratio"
                    " with its 95%% interval and the model-based need-adjusted ratio with its"
                    " 95%% interval, on a log scale. %(flagged)s flagged. The table below gives"
                    " every figure."
                )
                % {"metric": title, "flagged": sum(1 for c in cells if c.flagged)},
            )
        fun = made.funnels.get(metric)
        limits = (_("95%% limits") % {}, _("99.8%% limits") % {})  # %% as every other id
        city = _("city %(rate)s") % {"rate": w.share(fun.target)} if fun else None
        drawn = charts.audit_funnel(
            cells, names, fun, limit_names=limits, words=w.chart, city_text=city
        )
        funnel = None
        if drawn is not None and fun is not None:
            funnel = w.inline(
                drawn,
                f"funnel-{metric}",
                _("%(metric)s: funnel plot") % {"metric": title},
                _(
                    "Funnel plot of %(metric)s: each district's standardised rate against its"
                    " number of eligible persons, with 95%% and 99.8%% control limits around"
                    " the city rate %(rate)s. The table below gives every figure."
                )
                % {"metric": title, "rate": w.share(fun.target)},
            )
        ways = {c.district: direction(c, made.flag_rule) for c in cells if c.flagged}
        out.append(MetricSection(metric, title, what, ratio, funnel, fun, cells, ways))
    return out


def indicator_section(
    indicator: indicators.Indicator,
    years: Sequence[Year],
    figures: Sequence[Sequence[indicators.Figure]],
    names: Mapping[str, str],
    labels: Sequence[str],
    w: Words,
) -> IndicatorSection:
    """One indicator: the table district x year (None: no figure that year) and its chart
    (districts never drawn in a year they are suppressed or have no figure)."""
    _ = w._
    title = indicator.title_sv if w.lang == "sv" else indicator.title_en
    by: dict[str, list[indicators.Figure | None]] = {}
    for i, found in enumerate(figures):
        for f in found:
            if f.group is None:
                by.setdefault(f.district, [None] * len(years))[i] = f
    codes = sorted((c for c in by if c != reports.CITY), key=lambda c: (names.get(c, c), c)) + (
        [reports.CITY] if reports.CITY in by else []
    )
    rows = [(c, _("City") if c == reports.CITY else names.get(c, c), by[c]) for c in codes]
    series = [
        charts.Series(
            name,
            [None if f is None or f.suppressed else f.value for f in values],
            city=code == reports.CITY,
        )
        for code, name, values in rows
    ]
    drawn = [s for s in series if any(v is not None for v in s.values)]
    chart = None
    if drawn:
        share = indicator.kind is indicators.Kind.SHARE
        axis = {
            indicators.Kind.SHARE: _("share"),
            indicators.Kind.MEAN_DAYS: _("mean days"),
            indicators.Kind.MEDIAN_DAYS: _("median days"),
        }[indicator.kind]
        chart = w.inline(
            charts.lines_over_time(drawn, labels, y_title=axis, share=share, words=w.chart),
            f"indicator-{indicator.id}",
            title,
            _(
                "Line chart of %(indicator)s per year, a line per district and the city"
                " dashed; a suppressed year is not drawn. The table below gives every figure."
            )
            % {"indicator": title},
        )
    return IndicatorSection(indicator, title, chart, rows)


def wait_sections(made: stats.WaitReport, names: Mapping[str, str], w: Words) -> list[WaitSection]:
    _ = w._
    by: dict[str, list[stats.WaitSummary]] = {}
    for s in made.summaries:
        by.setdefault(s.wait, []).append(s)
    order = [x for x in WAIT_TEXT if x in by] + sorted(set(by) - set(WAIT_TEXT))
    out: list[WaitSection] = []
    for wait in order:
        title, what = WAIT_TEXT.get(wait, (wait.replace("_", " ").capitalize(), ""))
        title, what = _(title), _(what) if what else ""
        rows = sorted(
            by[wait],
            key=lambda s: (s.district != stats.CITY, names.get(s.district, s.district)),
        )
        lines = [
            charts.KmLine(
                _("City") if s.district == stats.CITY else names.get(s.district, s.district),
                s.curve,
                city=s.district == stats.CITY,
            )
            for s in rows
            if not s.suppressed and s.curve
        ]
        chart = None
        if lines:
            chart = w.inline(
                charts.km_curves(lines, words=w.chart),
                f"km-{wait}",
                title,
                _(
                    "Kaplan-Meier curves of %(wait)s: the share still waiting by days waited,"
                    " a curve per district and the city dashed. The table below gives the"
                    " median, the 90th percentile and the comparison of each district."
                )
                % {"wait": title},
            )
        out.append(WaitSection(wait, title, what, chart, rows))
    return out
