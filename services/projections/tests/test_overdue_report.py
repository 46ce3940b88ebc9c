"""The overdue counts wired into the report: the HTML table (pure), the record's figures
and parameters (pure), and on a hand-built history folded into a real PostgreSQL the
GET /reports/overdue route (as an analyst, tokens of the development OpenID provider) and
the HTML report built over it.

The history (times Europe/Stockholm; report day 31 March 2024, 14 days to answer a
referral, 30 days' window for a follow-up): Nordost 6 referrals requested on 1 March,
unanswered (overdue), and one of 20 March (not yet); a Lundby case (an old code, Hisingen
in the current structure) 5 unanswered of 1 March; Sydväst 2 unanswered (a small count,
suppressed), 5 follow-ups due on 1 February and never done (overdue) and one due on
1 February missed on 10 March (done).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest

from likvard.config import Settings
from services.projections import readmodels
from services.projections.api import create_app
from services.projections.audit import AuditReport
from services.projections.html_report import build, render
from services.projections.overdue import OverdueCounts
from services.projections.reproduce import Overdue, Parameters, ReproduceError, figures
from services.projections.tests.test_html_report import Node, numeric_cells, parse
from tests.identity import bearer
from tests.support import serving
from tests.test_overdue import History, at

LOCAL = ZoneInfo("Europe/Stockholm")
DAY = date(2024, 3, 31)
COUNTS = [
    OverdueCounts(DAY, "nordost", 6, 0),
    OverdueCounts(DAY, "sydvast", None, 5),
    OverdueCounts(DAY, "city", 8, 5),
]


def overdue_rows(root: Node) -> dict[str, list[str]]:
    (table,) = root.find("table", data_day=DAY.isoformat())
    return {
        r.attrs["data-district"]: numeric_cells(r)
        for r in table.find("tr")
        if "data-district" in r.attrs
    }


# --- pure -----------------------------------------------------------------------------


def page(overdue: Overdue | None) -> Node:
    doc = render(
        [],
        AuditReport([], {}, 0, "holm", 0.05),
        title="t",
        generated_at=datetime(2024, 4, 2, 9, tzinfo=LOCAL),
        period_from=date(2024, 1, 1),
        period_to=DAY,
        structure="current",
        district_names={"nordost": "Nordost <N>", "sydvast": "Sydväst"},
        overdue=overdue,
    )
    tree = parse(doc)
    assert tree.errors == []
    return tree.root


def test_the_html_report_shows_the_overdue_table_with_its_day_settings() -> None:
    root = page(Overdue(DAY, 14, 30, COUNTS))
    (section,) = root.find("section", id="overdue")
    text = section.content()
    assert "Overdue referrals and follow-ups" in text
    assert "As of 2024-03-31" in text and "more than 14 days" in text and "30 days" in text
    assert overdue_rows(section) == {
        "nordost": ["6", "0"],
        "sydvast": ["suppressed", "5"],  # a small count is never a number
        "city": ["8", "5"],
    }
    (city,) = section.find("tr", data_district="city")
    assert city.find("th")[0].content() == "City (all districts)"
    assert "Nordost <N>" in text  # the name, escaped in the markup and read back
    assert root.find("a", href="#overdue")


def test_a_report_without_overdue_counts_says_so() -> None:
    (section,) = page(None).find("section", id="overdue")
    assert "Not counted" in section.content() and not section.find("table")


def test_the_record_holds_the_counts_as_figures_and_the_days_as_parameters() -> None:
    made = figures([], [], overdue=Overdue(DAY, 14, 30, COUNTS))
    assert made["overdue/nordost/referrals_overdue"] == 6
    assert made["overdue/sydvast/referrals_overdue"] is None
    assert made["overdue/city/followups_overdue"] == 5
    assert len([k for k in made if k.startswith("overdue/")]) == 6
    params = Parameters(DAY, DAY, "current", "year", at(4, 2), answer_days=10, window_days=20)
    given = params.to_json()
    assert (given["answer_days"], given["window_days"], given["overdue_on"]) == (
        10,
        20,
        "2024-03-31",
    )
    assert Parameters.from_json(given) == params
    # A record made before the overdue counts: reproduced without them.
    older = {k: v for k, v in given.items() if k not in ("answer_days", "window_days")}
    assert Parameters.from_json(older).answer_days is None
    with pytest.raises(ReproduceError):
        Parameters.from_json(given | {"answer_days": "14"})
    with pytest.raises(ValueError, match="both"):
        Parameters(DAY, DAY, "current", "year", at(4, 2), answer_days=None)


def test_the_overdue_day_is_the_last_day_unless_the_as_of_day_is_earlier() -> None:
    params = Parameters(date(2024, 1, 1), date(2024, 12, 31), "current", "year", at(3, 31, 23))
    assert params.overdue_day == DAY
    assert Parameters(date(2024, 1, 1), DAY, "current", "year", at(9, 1)).overdue_day == DAY
    assert (params.answer_days, params.window_days) == (14, 30)  # Settings' defaults


# --- on a real PostgreSQL ---------------------------------------------------------------


def history() -> History:
    h = History()
    north, old, south = h.case("nordost"), h.case("lundby"), h.case("sydvast")
    for _ in range(6):
        h.referral(north, "nordost", at(3, 1))
    h.referral(north, "nordost", at(3, 20))
    for _ in range(5):
        h.referral(old, "lundby", at(3, 1))
    for _ in range(2):
        h.referral(south, "sydvast", at(3, 1))
    for _ in range(5):
        h.followup(south, "sydvast", date(2024, 2, 1))
    done = h.followup(south, "sydvast", date(2024, 2, 1))
    h.missed(south, done, at(3, 10), "sydvast")
    return h


@pytest.fixture
def folded(database_url: str, schema: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, schema)
        readmodels.apply(conn, schema, history().events)
    return schema


@pytest.fixture
def api(database_url: str, folded: str, new_schema: Callable[[str], str]) -> Iterator[httpx.Client]:
    settings = Settings(database_url=database_url, referral_answer_days=14, followup_window_days=30)
    app = create_app(settings, schema=folded, access_log_schema=new_schema("al"))
    with (
        serving(app) as base_url,
        httpx.Client(base_url=base_url, timeout=30, headers=bearer("analyst")) as client,
    ):
        yield client


EXPECTED = [
    {"day": "2024-03-31", "district": "hisingen", "referrals_overdue": 5, "followups_overdue": 0},
    {"day": "2024-03-31", "district": "nordost", "referrals_overdue": 6, "followups_overdue": 0},
    {"day": "2024-03-31", "district": "sydvast", "referrals_overdue": None, "followups_overdue": 5},
    {"day": "2024-03-31", "district": "city", "referrals_overdue": 13, "followups_overdue": 5},
]


@pytest.mark.integration
def test_the_overdue_route_counts_per_district_without_case_ids(api: httpx.Client) -> None:
    r = api.get("/reports/overdue", params={"day": "2024-03-31"})
    assert r.status_code == 200, r.text
    assert r.json() == EXPECTED
    assert "case-" not in r.text  # counts only
    given = json.loads(r.headers["Likvard-Provenance"])["parameters"]
    assert (given["report"], given["day"], given["answer_days"], given["window_days"]) == (
        "overdue",
        "2024-03-31",
        14,
        30,
    )
    # As recorded at intake: the old code keeps its own row.
    recorded = api.get("/reports/overdue", params={"day": "2024-03-31", "structure": "as-recorded"})
    assert [row["district"] for row in recorded.json()] == ["lundby", "nordost", "sydvast", "city"]
    # A day before 15 March nothing of 1 March is overdue; follow-ups due 1 February are.
    early = api.get("/reports/overdue", params={"day": "2024-03-14", "district": "city"})
    assert early.json() == [
        {"day": "2024-03-14", "district": "city", "referrals_overdue": 0, "followups_overdue": 5}
    ]
    as_csv = api.get(
        "/reports/overdue", params={"day": "2024-03-31", "format": "csv", "district": "nordost"}
    )
    assert list(csv.reader(io.StringIO(as_csv.text))) == [
        ["day", "district", "referrals_overdue", "followups_overdue"],
        ["2024-03-31", "nordost", "6", "0"],
    ]
    wrapped = api.get("/reports/overdue", params={"day": "2024-03-31", "provenance": "true"})
    assert wrapped.json()["rows"] == EXPECTED and "offsets" in wrapped.json()["provenance"]


@pytest.mark.integration
def test_the_overdue_route_is_for_analysts_and_auditors(api: httpx.Client) -> None:
    assert api.get("/reports/overdue", headers=bearer("auditor")).status_code == 200
    worker = bearer("case-worker", districts=["nordost"])
    assert api.get("/reports/overdue", headers=worker).status_code == 403
    bad = api.get("/reports/overdue", params={"district": "atlantis"})
    assert bad.status_code == 422 and bad.headers["content-type"].startswith(
        "application/problem+json"
    )
    lundby = api.get("/reports/overdue", params={"district": "lundby"})  # not a current one
    assert lundby.status_code == 422


@pytest.mark.integration
def test_the_html_report_counts_overdue_items_on_its_last_day(
    database_url: str, folded: str
) -> None:
    with psycopg.connect(database_url) as conn:
        doc = build(conn, folded, start=date(2024, 1, 1), end=DAY, as_of=at(4, 2), window_days=60)
    root = parse(doc).root
    # With a 60-day window the follow-ups due 1 February (59 days) are not overdue yet.
    assert overdue_rows(root) == {
        "hisingen": ["5", "0"],
        "nordost": ["6", "0"],
        "sydvast": ["suppressed", "0"],
        "city": ["13", "0"],
    }
    assert "more than 60 days" in root.find("section", id="overdue")[0].content()
    record: dict[str, Any] = json.loads(root.find("pre", id="likvard-record")[0].content())
    assert record["figures"]["overdue/city/referrals_overdue"] == 13
    assert record["provenance"]["parameters"]["window_days"] == 60
