"""The HTML report renderer, without a database: audit cells from the synthetic generator
(seed 0, nordost's specialist access planted at half the rate, which is the one flag) and
hand-made follow-up rows. The document is parsed with the standard library's HTMLParser,
so the assertions look at elements, not at substrings that could match by accident."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from html.parser import HTMLParser
from zoneinfo import ZoneInfo

import pytest

from services.projections.audit import METRICS, AuditCell, audit, synthetic_rows
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


def cells() -> list[AuditCell]:
    """The synthetic audit with one cell suppressed (numbers planted, to prove they are
    dropped) and one whose adjusted ratio could not be computed."""
    out: list[AuditCell] = []
    bias = {("nordost", "specialist_access"): 0.5}
    for c in audit(synthetic_rows(0, 400, DISTRICTS, bias=bias)):
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
                note="suppressed: counts under 5",
            )
        elif (c.district, c.metric) == ("hisingen", "timely_start"):
            c = replace(
                c,
                adjusted_ratio=None,
                ci_low=None,
                ci_high=None,
                flagged=False,
                note="no need-level stratum with information",
            )
        out.append(c)
    return out


CELLS = cells()
ROWS = [
    report_row("centrum", 120),
    report_row("hisingen", 98, referrals_across_share=0.2),
    report_row("nordost", 140, referrals_across_share=None, closed_not_reopened_share=None),
    ReportRow("2024", "sydvast", True, *([PLANTED] * len(NUMBERS))),
    report_row("city", 350, referrals_across_share=0.26),
]


def document(rows: Sequence[ReportRow] = ROWS, audit_cells: Sequence[AuditCell] = CELLS) -> str:
    return render(
        rows,
        audit_cells,
        title="Follow-up & audit <2024>",
        generated_at=datetime(2025, 3, 1, 9, 30, tzinfo=ZoneInfo("Europe/Stockholm")),
        period_from=date(2024, 1, 1),
        period_to=date(2024, 12, 31),
        structure="current",
        district_names=NAMES,
    )


DOC = document()
TREE = parse(DOC)


def test_fixture_has_one_flag_and_planted_cells() -> None:
    flagged = [(c.district, c.metric) for c in CELLS if c.flagged]
    assert flagged == [("nordost", "specialist_access")]
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
    for node in TREE.root.walk():
        assert "src" not in node.attrs, node.tag
        assert node.attrs.get("href", "#").startswith("#"), node.attrs
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


def test_flagged_cell_is_marked_once() -> None:
    markers = [n for n in TREE.root.walk() if "flag-marker" in n.classes()]
    assert len(markers) == sum(c.flagged for c in CELLS) == 1
    (main,) = TREE.root.find("main")  # the header's how-to-read legend shows the glyph too
    assert main.content().count("⚑") == 1
    row = audit_row(TREE.root, "specialist_access", "nordost")
    assert "flagged" in row.classes()
    assert "⚑ flagged: lower" in row.content()
    for metric in METRICS:
        for district in DISTRICTS:
            if (district, metric) != ("nordost", "specialist_access"):
                other = audit_row(TREE.root, metric, district)
                assert "flagged" not in other.classes()
                assert "⚑" not in other.content()
    (plot,) = TREE.root.find(
        "svg", aria_labelledby="forest-specialist_access-t forest-specialist_access-d"
    )
    assert "flagged, lower" in plot.content()


def test_flag_direction_higher() -> None:
    (cell,) = [c for c in CELLS if (c.district, c.metric) == ("centrum", "timely_start")]
    high = replace(cell, adjusted_ratio=1.6, ci_low=1.3, ci_high=1.9, flagged=True)
    tree = parse(document(audit_cells=[high]))
    assert "⚑ flagged: higher" in audit_row(tree.root, "timely_start", "centrum").content()


def test_suppressed_cells_show_no_numbers() -> None:
    assert str(PLANTED) not in DOC
    assert "9.88" not in DOC and "98.8 %" not in DOC
    row = audit_row(TREE.root, "family_engagement", "sydvast")
    cells = numeric_cells(row)
    assert cells == ["suppressed"]
    assert not any(re.search(r"\d", c) for c in cells)
    (plot,) = TREE.root.find(
        "svg", aria_labelledby="forest-family_engagement-t forest-family_engagement-d"
    )
    assert "suppressed (fewer than 5)" in plot.content()
    follow = numeric_cells(followup_row(TREE.root, "2024", "sydvast"))
    assert follow == ["suppressed"]


def test_none_values_show_a_dash_and_the_note() -> None:
    row = audit_row(TREE.root, "timely_start", "hisingen")
    numbers = numeric_cells(row)
    assert numbers[4:6] == ["—", "—"]  # adjusted ratio, interval
    assert "no need-level stratum with information" in row.content()
    (plot,) = TREE.root.find("svg", aria_labelledby="forest-timely_start-t forest-timely_start-d")
    assert "not computable" in plot.content()
    nordost = numeric_cells(followup_row(TREE.root, "2024", "nordost"))
    assert nordost[4] == "—" and nordost[15] == "—"  # the two None shares


def test_numbers_are_formatted() -> None:
    centrum = numeric_cells(followup_row(TREE.root, "2024", "centrum"))
    assert centrum[:5] == ["120", "122", "117", "60", "45.7 %"]
    assert centrum[5:7] == ["14.5", "41.0"]
    nordost = numeric_cells(audit_row(TREE.root, "specialist_access", "nordost"))
    assert re.fullmatch(r"\d+\.\d %", nordost[1])  # a rate as a percentage
    assert re.fullmatch(r"\d\.\d\d–\d\.\d\d", nordost[5])  # the interval


def test_charts_are_svg_with_text_alternatives() -> None:
    svgs = TREE.root.find("svg")
    assert len(svgs) > 0
    forests = [s for s in svgs if s.attrs["aria-labelledby"].startswith("forest-")]
    bars = [s for s in svgs if s.attrs["aria-labelledby"].startswith("bars-")]
    assert len(forests) == len(METRICS)
    # five shares charted, but top guideline share is None everywhere: skipped
    assert len(bars) == 4
    assert not any("top_guideline_share" in s.attrs["aria-labelledby"] for s in bars)
    for svg in svgs:
        assert svg.attrs.get("role") == "img"
        title_id, desc_id = svg.attrs["aria-labelledby"].split()
        assert svg.find("title", id=title_id)[0].content()
        assert svg.find("desc", id=desc_id)[0].content()
    # the city's value is drawn as a reference line and labelled
    (across,) = [s for s in bars if "referrals_across_share" in s.attrs["aria-labelledby"]]
    assert "city 26.0 %" in across.content()


def test_district_names_are_escaped() -> None:
    assert "<b>" not in DOC
    assert "His &lt;b&gt;" in DOC
    assert "Follow-up &amp; audit &lt;2024&gt;" in DOC


def test_empty_inputs_still_make_a_document() -> None:
    doc = document(rows=[], audit_cells=[])
    tree = parse(doc)
    assert tree.errors == [] and tree.stack == [tree.root]
    assert "No intakes in the period." in doc
    assert "nothing to audit" in doc
    assert not tree.root.find("svg")


@pytest.mark.parametrize("structure", ["current", "as-recorded"])
def test_structure_is_described(structure: str) -> None:
    doc = render(
        [],
        [],
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
