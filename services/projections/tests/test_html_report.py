"""The HTML report renderer, without a database: the audit of the synthetic generator
(seed 0, 400 persons per district, nordost's specialist access planted at half the rate),
hand-made waits and follow-up rows.

Under Holm (the published rule) the fixture flags two cells, both specialist access:
nordost lower (the planted disparity) and centrum *higher*. That second flag is right, not
a false alarm: the standardised ratio compares a district with the whole city, and
nordost's halved rate pulls the city rate down, so the other districts sit above it;
centrum, with most high-need persons (the highest specialist access), is the one whose
excess passes Holm over the 20 comparisons. The band rule compares with the rest of the
city and flags nordost alone. The document is parsed with the standard library's HTMLParser,
so the assertions look at elements, not at substrings that could match by accident."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from html.parser import HTMLParser
from zoneinfo import ZoneInfo

import pytest

from services.projections import stats
from services.projections.audit import METRICS, AuditReport, audit_report, synthetic_rows
from services.projections.html_report import render
from services.projections.reports import NUMBERS, ReportRow

DISTRICTS = ("nordost", "centrum", "sydvast", "hisingen")
NAMES = {"nordost": "Nordost", "centrum": "Centrum", "sydvast": "Sydväst", "hisingen": "His <b>"}
FORBIDDEN = ("http://", "https://", "<script", "<link", "@import", "url(")
VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"})
PLANTED = 98765  # a number that must never reach the page: it belongs to suppressed cells


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.walk()

    def find(self, tag: str, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.walk()
            if n.tag == tag and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def content(self) -> str:
        return "".join(self.text) + "".join(c.content() for c in self.children)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class TreeBuilder(HTMLParser):
    """Builds a tree and records every end tag that does not close the open element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.errors: list[str] = []
        self.doctype: str | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if len(self.stack) > 1 and self.stack[-1].tag == tag:
            self.stack.pop()
        else:
            self.errors.append(f"</{tag}> closes <{self.stack[-1].tag}>")

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


def parse(doc: str) -> TreeBuilder:
    builder = TreeBuilder()
    builder.feed(doc)
    builder.close()
    return builder


def audit_row(tree: Node, metric: str, district: str) -> Node:
    (table,) = tree.find("table", data_metric=metric)
    (row,) = table.find("tr", data_district=district)
    return row


def followup_row(tree: Node, period: str, district: str) -> Node:
    (table,) = tree.find("table", data_period=period)
    (row,) = table.find("tr", data_district=district)
    return row


def numeric_cells(row: Node) -> list[str]:
    return [td.content() for td in row.find("td") if "num" in td.classes()]


def report_row(district: str, persons: int, **numbers: float | int | None) -> ReportRow:
    base: dict[str, float | int | None] = {
        "persons": persons,
        "new_intakes": persons + 2,
        "assessed": persons - 3,
        "referrals": persons // 2,
        "referrals_across_share": 0.4567,
        "days_to_first_intervention_median": 14.5,
        "days_to_first_intervention_p90": 41.0,
        "top_guideline_share": None,
        "family_members_engaged": 7,
        "cases_with_children": 12,
        "family_engaged_share_with_children": 0.44,
        "followups_completed": 20,
        "followups_missed": 4,
        "goals_reached_share": 0.55,
        "situation_improved_share": 0.6,
        "closed_not_reopened_share": 0.81,
    }
    return ReportRow("2024", district, False, **(base | numbers))  # type: ignore[arg-type]


def made(flag_rule: str = "holm") -> AuditReport:
    """The synthetic audit with one cell suppressed (numbers planted, to prove they are
    dropped, funnel point included) and one whose ratios could not be computed."""
    out = []
    bias = {("nordost", "specialist_access"): 0.5}
    rows = synthetic_rows(0, 400, DISTRICTS, bias=bias)
    report = audit_report(rows, flag_rule=flag_rule)  # type: ignore[arg-type]
    for c in report.cells:
        if (c.district, c.metric) == ("sydvast", "family_engagement"):
            c = replace(
                c,
                suppressed=True,
                flagged=False,
                persons=PLANTED,
                rate=0.98765,
                adjusted_ratio=9.8765,
                ci_low=9.1,
                ci_high=9.9,
                sr=8.7654,
                sr_low=8.1,
                sr_high=8.9,
                note="suppressed: counts under 5",
            )
        elif (c.district, c.metric) == ("hisingen", "timely_start"):
            c = replace(
                c,
                adjusted_ratio=None,
                ci_low=None,
                ci_high=None,
                sr=None,
                sr_low=None,
                sr_high=None,
                flagged=False,
                note="no need-level stratum with information",
            )
        out.append(c)
    return replace(report, cells=out)


MADE = made()
CELLS = MADE.cells
AS_OF = datetime(2025, 3, 1, tzinfo=ZoneInfo("Europe/Stockholm"))


def waits() -> stats.WaitReport:
    """Two waits, 30 persons a district (every other one still waiting: censored at the
    as-of time), sydvast with 3 persons (suppressed)."""
    rows: dict[str, list[stats.WaitRow]] = {}
    for w, wait in enumerate(("intake_to_first_visit", "referral_to_start")):
        rows[wait] = []
        for i, district in enumerate(("centrum", "hisingen", "nordost")):
            for j in range(30):
                start = datetime(2024, 6, 1, tzinfo=ZoneInfo("Europe/Stockholm")) + timedelta(j)
                end = start + timedelta(days=j % 10 + 1 + 3 * i + w) if j % 2 == 0 else None
                rows[wait].append(stats.WaitRow(start, end, district, ("LOW", "HIGH")[j % 2]))
        for _ in range(3):
            start = datetime(2024, 6, 1, tzinfo=ZoneInfo("Europe/Stockholm"))
            rows[wait].append(stats.WaitRow(start, start + timedelta(days=2), "sydvast", "LOW"))
    return stats.wait_report(rows, as_of=AS_OF)


WAITS = waits()
ROWS = [
    report_row("centrum", 120),
    report_row("hisingen", 98, referrals_across_share=0.2),
    report_row("nordost", 140, referrals_across_share=None, closed_not_reopened_share=None),
    ReportRow("2024", "sydvast", True, *([PLANTED] * len(NUMBERS))),
    report_row("city", 350, referrals_across_share=0.26),
]


EMPTY = AuditReport([], {}, 0, "holm", 0.05)


def document(
    rows: Sequence[ReportRow] = ROWS,
    audit: AuditReport = MADE,
    wait_report: stats.WaitReport | None = WAITS,
) -> str:
    return render(
        rows,
        audit,
        title="Follow-up & audit <2024>",
        generated_at=datetime(2025, 3, 1, 9, 30, tzinfo=ZoneInfo("Europe/Stockholm")),
        period_from=date(2024, 1, 1),
        period_to=date(2024, 12, 31),
        structure="current",
        district_names=NAMES,
        waits=wait_report,
    )


DOC = document()
TREE = parse(DOC)


def svg(tree: Node, ident: str) -> Node:
    (found,) = tree.find("svg", aria_labelledby=f"{ident}-t {ident}-d")
    return found


def test_fixture_flags_two_cells_under_holm_and_one_under_the_band() -> None:
    flagged = [(c.district, c.metric) for c in CELLS if c.flagged]
    assert flagged == [("centrum", "specialist_access"), ("nordost", "specialist_access")]
    assert MADE.flag_rule == "holm" and MADE.comparisons == 20
    (nordost,) = [c for c in CELLS if (c.district, c.metric) == flagged[1]]
    assert nordost.sr is not None and nordost.sr < 1 and nordost.funnel_position == "low_99.8"
    band = [(c.district, c.metric) for c in made("band").cells if c.flagged]
    assert band == [("nordost", "specialist_access")]
    assert sum(c.suppressed for c in CELLS) == 1


def test_a_complete_balanced_document() -> None:
    assert DOC.startswith("<!DOCTYPE html>")
    assert TREE.doctype is not None and TREE.doctype.lower() == "doctype html"
    assert TREE.errors == []
    assert TREE.stack == [TREE.root]  # every element closed
    (html,) = TREE.root.find("html")
    assert [c.tag for c in html.children] == ["head", "body"]
    assert TREE.root.find("meta", charset="utf-8")
    (title,) = html.children[0].find("title")
    assert title.content() == "Follow-up & audit <2024>"  # escaped in the source, intact here
    for tag in ("header", "main", "section", "table", "svg"):
        assert TREE.root.find(tag), tag


def test_self_contained() -> None:
    lowered = DOC.lower()
    for needle in FORBIDDEN:
        assert needle not in lowered, needle
    assert "xmlns" not in lowered  # the renderer's namespace URLs are dropped (inline SVG)
    for node in TREE.root.walk():
        assert "src" not in node.attrs, node.tag
        assert node.attrs.get("href", "#").startswith("#"), node.attrs
        assert "xlink:href" not in node.attrs, node.tag
    assert TREE.root.find("style")  # the CSS is inline


def test_every_district_in_every_table() -> None:
    text = TREE.root.content()
    for name in NAMES.values():
        assert name in text
    for metric in METRICS:
        for district in DISTRICTS:
            assert audit_row(TREE.root, metric, district).find("th")[0].content() == NAMES[district]
    for district in (*DISTRICTS, "city"):
        followup_row(TREE.root, "2024", district)


def test_flagged_cells_are_marked_with_their_direction() -> None:
    (audit,) = TREE.root.find("section", id="audit")
    markers = [n for n in audit.walk() if "flag-marker" in n.classes()]
    assert len(markers) == sum(c.flagged for c in CELLS) == 2
    nordost = audit_row(TREE.root, "specialist_access", "nordost")
    assert "flagged" in nordost.classes() and "⚑ flagged: lower" in nordost.content()
    centrum = audit_row(TREE.root, "specialist_access", "centrum")
    assert "flagged" in centrum.classes() and "⚑ flagged: higher" in centrum.content()
    for metric in METRICS:
        for district in DISTRICTS:
            if metric != "specialist_access" or district not in ("nordost", "centrum"):
                other = audit_row(TREE.root, metric, district)
                assert "flagged" not in other.classes()
                assert "⚑" not in other.content()
    plot = svg(TREE.root, "ratios-specialist_access").content()
    assert "flagged, lower" in plot and "flagged, higher" in plot
    assert "2 flagged cells of 20 comparisons" in audit.content()


def test_the_flag_rule_is_stated() -> None:
    (audit,) = TREE.root.find("section", id="audit")
    (rule,) = [p for p in audit.find("p") if "rule" in p.classes()]
    assert "Holm-adjusted p < 0.05 over 20 comparisons" in rule.content()
    band = parse(document(audit=made("band")))
    (audit,) = band.root.find("section", id="audit")
    assert "the ratio is outside 0.8–1.25" in audit.content()
    assert "1 flagged cell of 20 comparisons" in audit.content()
    assert "flagged" not in audit_row(band.root, "specialist_access", "centrum").classes()


def test_funnel_plots_show_each_unsuppressed_district() -> None:
    for metric in METRICS:
        plot = svg(TREE.root, f"funnel-{metric}")
        desc = plot.find("desc")[0].content()
        assert "95% and 99.8% control limits" in desc
        shown = {n for n in NAMES.values() if n in desc}
        suppressed = metric == "family_engagement"
        assert shown == set(NAMES.values()) - ({"Sydväst"} if suppressed else set()), metric
    desc = svg(TREE.root, "funnel-specialist_access").find("desc")[0].content()
    assert "Nordost" in desc and "(flagged)" in desc
    assert "over-dispersion not applied: fewer than 10 units" in DOC


def test_suppressed_cells_show_no_numbers() -> None:
    assert str(PLANTED) not in DOC
    text = TREE.root.content()  # every text, SVG's included (its coordinates are no text)
    for planted in ("9.88", "98.8 %", "8.77", "8.10"):
        assert planted not in text, planted
    row = audit_row(TREE.root, "family_engagement", "sydvast")
    cells = numeric_cells(row)
    assert cells == ["suppressed"]
    assert not any(re.search(r"\d", c) for c in cells)
    assert "suppressed (fewer than 5)" in svg(TREE.root, "ratios-family_engagement").content()
    follow = numeric_cells(followup_row(TREE.root, "2024", "sydvast"))
    assert follow == ["suppressed"]


def test_none_values_show_a_dash_and_the_note() -> None:
    row = audit_row(TREE.root, "timely_start", "hisingen")
    numbers = numeric_cells(row)
    assert numbers[4:6] == ["—", "—"]  # adjusted ratio, interval
    assert numbers[9:11] == ["—", "—"]  # standardised ratio, interval
    assert "no need-level stratum with information" in row.content()
    assert "not computable" in svg(TREE.root, "ratios-timely_start").content()
    nordost = numeric_cells(followup_row(TREE.root, "2024", "nordost"))
    assert nordost[4] == "—" and nordost[15] == "—"  # the two None shares


def test_numbers_are_formatted() -> None:
    centrum = numeric_cells(followup_row(TREE.root, "2024", "centrum"))
    assert centrum[:5] == ["120", "122", "117", "60", "45.7 %"]
    assert centrum[5:7] == ["14.5", "41.0"]
    nordost = numeric_cells(audit_row(TREE.root, "specialist_access", "nordost"))
    assert re.fullmatch(r"\d+\.\d %", nordost[1])  # a rate as a percentage
    assert re.fullmatch(r"\d\.\d\d–\d\.\d\d", nordost[5])  # the interval
    assert nordost[9] == "0.66" and re.fullmatch(r"0\.\d\d–0\.\d\d", nordost[10])
    assert nordost[11] == "below 99.8 %" and nordost[13] == "< 0.001"  # funnel, Holm p


def test_charts_are_svg_with_text_alternatives() -> None:
    svgs = TREE.root.find("svg")
    kinds: dict[str, int] = {}
    for s in svgs:
        kind = s.attrs["aria-labelledby"].split("-")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    # five shares charted, but top guideline share is None everywhere: skipped
    assert kinds == {"ratios": len(METRICS), "funnel": len(METRICS), "km": 2, "bars": 4}
    assert not any("top_guideline_share" in s.attrs["aria-labelledby"] for s in svgs)
    for s in svgs:
        assert s.attrs.get("role") == "img"
        title_id, desc_id = s.attrs["aria-labelledby"].split()
        assert s.find("title", id=title_id)[0].content()
        assert s.find("desc", id=desc_id)[0].content()
        assert s.find("text"), "the renderer draws text"
    # the city's value is drawn as a reference line and labelled
    assert "city 26.0 %" in svg(TREE.root, "bars-2024-referrals_across_share").content()


def test_waits_show_curves_and_kaplan_meier_figures() -> None:
    (section,) = TREE.root.find("section", id="waits")
    assert f"over {WAITS.comparisons} comparisons (district × wait)" in section.content()
    for wait in ("intake_to_first_visit", "referral_to_start"):
        (table,) = section.find("table", data_wait=wait)
        plot = svg(TREE.root, f"km-{wait}")
        for summary in (s for s in WAITS.summaries if s.wait == wait):
            (row,) = table.find("tr", data_district=summary.district)
            numbers = numeric_cells(row)
            if summary.suppressed:
                assert numbers == ["suppressed"]  # sydvast, 3 persons
                continue
            assert numbers[2] == str(summary.censored)  # still waiting: censored, counted
            assert numbers[3] == f"{summary.median_days:.1f}"  # the KM median
            name = "City" if summary.district == "city" else NAMES[summary.district]
            assert name in plot.content()  # a curve (legend entry) per district
        assert "Sydväst" not in plot.content()
    (city,) = [s for s in WAITS.summaries if (s.wait, s.district) == ("referral_to_start", "city")]
    assert city.censored == 45 and city.persons == 93  # half of each district still waits


def test_district_names_are_escaped() -> None:
    assert "<b>" not in DOC
    assert "His &lt;b&gt;" in DOC
    assert "Follow-up &amp; audit &lt;2024&gt;" in DOC


def test_empty_inputs_still_make_a_document() -> None:
    doc = document(rows=[], audit=EMPTY, wait_report=None)
    tree = parse(doc)
    assert tree.errors == [] and tree.stack == [tree.root]
    assert "No intakes in the period." in doc
    assert "nothing to audit" in doc
    assert "No waits to report." in doc
    assert not tree.root.find("svg")


@pytest.mark.parametrize("structure", ["current", "as-recorded"])
def test_structure_is_described(structure: str) -> None:
    doc = render(
        [],
        EMPTY,
        title="t",
        generated_at=datetime(2025, 1, 1, tzinfo=ZoneInfo("Europe/Stockholm")),
        period_from=date(2024, 1, 1),
        period_to=date(2024, 6, 30),
        structure=structure,
    )
    expected = "successors" if structure == "current" else "as recorded at intake"
    assert expected in doc
    assert "2024-01-01 to 2024-06-30" in doc
    assert "2025-01-01 00:00 CET" in doc
