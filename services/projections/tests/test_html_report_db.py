"""`build` on a real PostgreSQL: the generated events of test_reports projected into a
fresh schema, then the whole HTML report read back from it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import psycopg
import pytest

from services.projections import readmodels
from services.projections.html_report import build
from services.projections.tests.test_html_report import (
    FORBIDDEN,
    Node,
    followup_row,
    numeric_cells,
    parse,
)
from services.projections.tests.test_reports import AS_OF, EVENTS

pytestmark = pytest.mark.integration

START, END = date(2024, 1, 1), date(2024, 12, 31)


def tables(root: Node, kind: str) -> list[Node]:
    return [t for t in root.find("table") if kind in t.classes()]


@pytest.fixture
def projected(database_url: str, schema: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, schema)
            readmodels.apply(conn, schema, EVENTS)
        yield conn


def test_build_current_structure(projected: psycopg.Connection[Any], schema: str) -> None:
    doc = build(projected, schema, start=START, end=END, period="month", as_of=AS_OF)
    tree = parse(doc)
    assert tree.errors == [] and tree.stack == [tree.root]
    lowered = doc.lower()
    for needle in FORBIDDEN:
        assert needle not in lowered, needle
    assert "person-" not in doc  # pseudonyms never reach the page
    text = tree.root.content()
    for name in ("Centrum", "Nordost", "Hisingen", "Sydväst"):  # names from the registry
        assert name in text
    # months of the report, districts in the current structure (lundby rolled up)
    assert [t.attrs["data-period"] for t in tables(tree.root, "followup")] == [
        "2024-01",
        "2024-02",
    ]
    districts = {
        r.attrs["data-district"] for r in tree.root.find("tr") if "data-district" in r.attrs
    }
    assert districts == {"centrum", "hisingen", "nordost", "sydvast", "city"}
    assert numeric_cells(followup_row(tree.root, "2024-01", "sydvast")) == ["suppressed"]
    centrum_row = followup_row(tree.root, "2024-01", "centrum")
    assert centrum_row.find("th")[0].content() == "Centrum"  # not the 2011 "Centrum"
    centrum = numeric_cells(centrum_row)
    assert centrum[:5] == ["12", "12", "9", "6", "50.0 %"]
    city = numeric_cells(followup_row(tree.root, "2024-01", "city"))
    assert (city[0], city[1], city[3]) == ("35", "36", "18")  # persons, intakes, referrals
    # the audit: standardised ratios and a table per metric, the flag rule (Holm) stated
    assert len(tables(tree.root, "audit")) == 5
    labels = [s.attrs["aria-labelledby"] for s in tree.root.find("svg")]
    assert len([a for a in labels if a.startswith("ratios-")]) == 5
    assert "Holm-adjusted p &lt; 0.05 over" in doc
    # the waits: a Kaplan-Meier table per wait, the city row first
    waits = tables(tree.root, "waits")
    assert {t.attrs["data-wait"] for t in waits} == {
        "intake_to_first_visit",
        "referral_to_answer",
        "referral_to_start",
        "intervention_end_to_followup",
    }
    assert all(t.find("tr", data_district="city") for t in waits)
    assert tree.root.find("section", id="provenance")


def test_build_as_recorded_keeps_old_districts(
    projected: psycopg.Connection[Any], schema: str
) -> None:
    doc = build(
        projected, schema, start=START, end=END, structure="as-recorded", period="year", as_of=AS_OF
    )
    tree = parse(doc)
    assert tree.errors == []
    assert "as recorded at intake" in doc
    row = followup_row(tree.root, "2024", "lundby")
    assert row.find("th")[0].content() == "Lundby"
    assert numeric_cells(row) == ["suppressed"]  # 4 persons


def test_build_rejects_unknown_options(projected: psycopg.Connection[Any], schema: str) -> None:
    with pytest.raises(ValueError, match="structure"):
        build(projected, schema, start=START, end=END, structure="future")
    with pytest.raises(ValueError, match="period"):
        build(projected, schema, start=START, end=END, period="week")
