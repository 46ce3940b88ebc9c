"""The console's analysis pages: the pure parts (the audit's selection of persons, the
indicators' line chart, the filters, the chart embedding) without a database; then the
three pages, the CSV and the HTML report through the projections app on a real uvicorn
server and PostgreSQL, signed in with a sealed session cookie holding a token of the
development OpenID provider.

The cases: centrum, nordost and hisingen with 40 cases each (one person each, intakes
every 14 days from 5 January 2024, so 14 of each district's are from 2025 on), sydvast with
3 (suppressed everywhere). Need level by k % 3, gender WOMAN for even k; an intervention
for even k in centrum and hisingen, for k % 3 == 0 in nordost; a first visit for every
case, (k % 7) + 1 days after intake."""

from __future__ import annotations

import csv
import io
import re
import time
import typing
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta

import httpx
import psycopg
import pytest
from psycopg import sql

from likvard.domain import AGE_BANDS
from likvard.inbox import Incoming
from services.projections import api, audit, charts
from services.projections.audit import PersonOutcome
from services.projections.console import analysis_views
from services.projections.console.session import (
    LANGUAGE_COOKIE,
    SESSION_COOKIE,
    CookieBox,
    new_session,
)
from services.projections.tests.reporting_app import reporting_app
from services.projections.tests.test_reports import Case
from tests.identity import bearer, token

SECRET = "a-console-secret-for-the-tests-only-0123456789"

# --- pure --------------------------------------------------------------------------------


def person(name: str, day: date | None, need: str = "LOW", **kw: str) -> PersonOutcome:
    return PersonOutcome(name, "centrum", need, {"m": True}, intake_day=day, **kw)


def test_select_keeps_the_persons_asked_for() -> None:
    rows = [
        person("a", date(2024, 1, 1), gender="WOMAN", age_band="18-24"),
        person("b", date(2024, 6, 30), "HIGH", gender="MAN", age_band="25-34"),
        person("c", date(2025, 1, 1), "HIGH", gender="WOMAN", age_band="25-34"),
        person("d", None, "HIGH"),
    ]

    def names(found: list[PersonOutcome]) -> list[str]:
        return [r.person for r in found]

    assert names(audit.select(rows)) == ["a", "b", "c", "d"]
    assert names(audit.select(rows, start=date(2024, 6, 30))) == ["b", "c"]
    assert names(audit.select(rows, end=date(2024, 6, 30))) == ["a", "b"]
    both = audit.select(rows, start=date(2024, 1, 2), end=date(2024, 12, 31))
    assert names(both) == ["b"]
    assert names(audit.select(rows, need_level="HIGH")) == ["b", "c", "d"]
    assert names(audit.select(rows, gender="WOMAN")) == ["a", "c"]
    assert names(audit.select(rows, age_band="25-34", need_level="HIGH")) == ["b", "c"]
    assert audit.select(rows, gender="OTHER") == []
    with pytest.raises(ValueError, match="before"):
        audit.select(rows, start=date(2024, 2, 1), end=date(2024, 1, 1))


def test_the_api_offers_the_filters_the_audit_knows() -> None:
    assert typing.get_args(api.NeedLevelQuery) == audit.NEED_LEVELS
    assert typing.get_args(api.GenderQuery) == audit.GENDERS
    assert typing.get_args(api.AgeBandQuery) == analysis_views.AGE_BAND_CODES
    assert analysis_views.AGE_BAND_CODES[:-1] == tuple(code for _, _, code in AGE_BANDS)


def test_lines_over_time_never_draws_a_missing_or_suppressed_figure() -> None:
    periods = ["2023", "2024", "2025", "2026 to date"]
    series = [
        charts.Series("Centrum", [0.5, None, 0.6, 0.7]),
        charts.Series("Nordost", [None, None, None, 0.2]),
        charts.Series("City", [0.55, 0.5, 0.6, 0.65], city=True),
    ]
    points = charts.series_points(series, periods)
    drawn = {(p["who"], p["period"]) for p in points}
    assert ("Centrum", "2024") not in drawn and ("Nordost", "2023") not in drawn
    assert len(points) == 3 + 1 + 4
    # a gap breaks the line: Centrum's 2023 is not joined to its 2025
    centrum = {p["period"]: p["segment"] for p in points if p["who"] == "Centrum"}
    assert centrum["2023"] != centrum["2025"] == centrum["2026 to date"]
    assert all(p["city"] for p in points if p["who"] == "City")
    spec = charts.lines_over_time(series, periods, y_title="share", share=True).to_dict()
    values = [v for layer in spec["layer"] for v in layer["data"]["values"] if "value" in v]
    assert sorted((v["who"], v["period"]) for v in values) == sorted([*drawn, *drawn])  # line, dots
    svg = charts.inline(
        charts.lines_over_time(series, periods, y_title="days", share=False), "t", "T", "D"
    )
    assert svg.startswith('<svg role="img"') and "Centrum" in svg
    with pytest.raises(ValueError, match="values"):
        charts.series_points([charts.Series("x", [1.0])], periods)


def test_a_chart_is_inline_unless_it_has_a_style_attribute() -> None:
    plain = '<svg role="img" viewBox="0 0 1 1"><rect fill="white"/></svg>'
    assert analysis_views.embed(plain, "A chart") == plain
    styled = '<svg role="img" viewBox="0 0 1 1"><rect style="fill:red"/></svg>'
    img = analysis_views.embed(styled, 'A "chart"')
    assert img.startswith('<img src="data:image/svg+xml;base64,')
    assert 'alt="A &quot;chart&quot;"' in img


def test_filters_ignore_what_the_form_does_not_offer() -> None:
    chosen, ignored = analysis_views.audit_filters(
        {"structure": "as-recorded", "from": "2025-01-01", "need_level": "HIGH", "gender": "X"}
    )
    assert (chosen.structure, chosen.start, chosen.need_level) == (
        "as-recorded",
        date(2025, 1, 1),
        "HIGH",
    )
    assert chosen.gender is None and ignored == ["gender"]
    assert chosen.given() == {
        "report": "equal-access",
        "structure": "as-recorded",
        "district": None,
        "min_cell": 5,
        "flag_rule": "holm",
        "from": "2025-01-01",
        "need_level": "HIGH",
    }
    assert "gender" not in chosen.query() and "from=2025-01-01" in chosen.query()
    bad, ignored = analysis_views.audit_filters(
        {"from": "2025-02-01", "to": "2025-01-01", "flag_rule": "x"}
    )
    assert (bad.start, bad.end, bad.flag_rule) == (None, None, "holm")
    assert ignored == ["to", "flag_rule"]
    assert analysis_views.audit_filters({})[0].given() == {
        "report": "equal-access",
        "structure": "current",
        "district": None,
        "min_cell": 5,
        "flag_rule": "holm",
    }


def test_indicator_years_are_five_full_years_and_this_one_from_the_data_on() -> None:
    today = date(2026, 12, 3)
    years = analysis_views.indicator_years(today, date(2019, 5, 1))
    assert [y.year for y in years] == [2021, 2022, 2023, 2024, 2025, 2026]
    assert (years[-1].start, years[-1].end, years[-1].to_date) == (date(2026, 1, 1), today, True)
    assert (years[0].end, years[0].to_date) == (date(2021, 12, 31), False)
    assert [y.year for y in analysis_views.indicator_years(today, date(2024, 3, 1))] == [
        2024,
        2025,
        2026,
    ]
    assert analysis_views.indicator_years(today, None) == []


# --- through the app -----------------------------------------------------------------------

START = datetime(2024, 1, 5, 9, 0, tzinfo=UTC)
SIZES = {"centrum": 40, "nordost": 40, "hisingen": 40, "sydvast": 3}
CASE_IDS: list[str] = []
PERSONS: list[str] = []


def cases() -> list[Incoming]:
    events: list[Incoming] = []
    for district, n in SIZES.items():
        for k in range(n):
            case_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"console-analysis/{district}/{k}"))
            who = f"pz-{district}-{k:03d}"
            CASE_IDS.append(case_id)
            PERSONS.append(who)
            c = Case(case_id, district, START + timedelta(days=14 * k))
            c(
                "i",
                "IntakeRegistered",
                0,
                person=who,
                district=district,
                substances=["ALCOHOL"],
                referral_source="SELF",
                children_in_household="NO",
                gender="WOMAN" if k % 2 == 0 else "MAN",
            )
            c("i", "AssessmentCompleted", 1, need_level=("LOW", "MODERATE", "HIGH")[k % 3])
            c("i", "FirstVisitHeld", (k % 7) + 1)
            treated = k % 3 == 0 if district == "nordost" else k % 2 == 0
            if treated:
                c("r", "ReferralRequested", 1)
                c("r", "InterventionStarted", 2 + (k % 5) * 5, guideline_priority=1)
            events += c.events
    return events


EVENTS = cases()


@pytest.fixture
def app_url(
    database_url: str,
    schema: str,
    new_schema: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[str, str]]:
    """The projections app serving the console; its base URL and access-log schema."""
    monkeypatch.setenv("LIKVARD_CONSOLE_SECRET", SECRET)
    al = new_schema("al")
    with reporting_app(database_url, schema, al, EVENTS) as base_url:
        yield base_url, al


def browser(base_url: str, role: str, **claims: typing.Any) -> httpx.Client:
    """A signed-in browser: the sealed session cookie of a token for `role`, in English."""
    sealed = CookieBox(SECRET.encode()).seal(
        SESSION_COOKIE, new_session(token(role, **claims), int(time.time()) + 3600)
    )
    return httpx.Client(
        base_url=base_url,
        timeout=60,
        cookies={SESSION_COOKIE: sealed, LANGUAGE_COOKIE: "en"},
    )


def row(page: str, table: str, district: str) -> str:
    """The text of one district's row in the table marked `table` (tags dropped)."""
    start = page.index(table)
    body = page[start : page.index("</table>", start)]
    found = re.search(rf'<tr data-district="{district}">(.*?)</tr>', body, re.DOTALL)
    assert found, f"no row of {district} in {table}"
    return " ".join(re.sub(r"<[^>]+>", " ", found.group(1)).split())


def assert_page(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text[:2000]
    assert r.headers["content-type"].startswith("text/html")
    assert "style-src 'self'" in r.headers["content-security-policy"]
    page = r.text
    assert "<script" not in page.lower() and " style=" not in page.lower()
    assert not any(c in page for c in CASE_IDS) and not any(p in page for p in PERSONS)
    return page


@pytest.mark.integration
def test_the_equal_access_page(app_url: tuple[str, str]) -> None:
    base_url, _ = app_url
    with browser(base_url, "analyst") as b:
        page = assert_page(b.get("/console/equal-access"))
        filtered = assert_page(b.get("/console/equal-access", params={"from": "2025-01-01"}))
        as_csv = b.get("/console/equal-access.csv", params={"from": "2025-01-01"})
        report = b.get("/console/report.html", params={"from": "2024-01-01", "to": "2025-12-31"})
    assert "<h1>Equal access</h1>" in page
    sections = page.count('<section id="metric-')
    assert sections >= 3
    # a ratio chart per metric with a district shown, else the reason there is none
    none = page.count("Every district is suppressed: no chart to draw.")
    assert page.count('aria-labelledby="ratios-') == sections - none >= 1
    assert 'aria-labelledby="funnel-specialist_access-t' in page  # and a funnel where drawn
    assert page.count("<table data-metric=") == sections
    assert page.count("<caption") >= sections
    assert '<th scope="col">' in page and "<label for=" in page
    table = '<table data-metric="specialist_access">'
    centrum = row(page, table, "centrum")
    assert centrum.startswith("Centrum 40 50.0 %"), centrum
    suppressed = row(page, table, "sydvast")
    assert suppressed == "Sydväst suppressed" and not re.search(r"\d", suppressed)
    assert 'class="suppressed"' in page
    # the period changes the figures: 14 of centrum's persons had their intake from 2025
    assert row(filtered, table, "centrum").startswith("Centrum 14 ")
    assert 'value="2025-01-01"' in filtered
    assert "Provenance" in page and "heads_sha256" not in page and "SHA-256" in page
    assert "/console/equal-access.csv?structure=current&amp;from=2025-01-01" in filtered

    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.headers["content-disposition"].startswith("attachment")
    with httpx.Client(base_url=base_url, timeout=60, headers=bearer("analyst")) as client:
        from_api = client.get(
            "/reports/equal-access", params={"format": "csv", "from": "2025-01-01"}
        )
        unfiltered = client.get("/reports/equal-access", params={"format": "csv"})
    assert as_csv.text == from_api.text != unfiltered.text
    rows = {(r["district"], r["metric"]): r for r in csv.DictReader(io.StringIO(as_csv.text))}
    assert rows["centrum", "specialist_access"]["persons"] == "14"
    assert ("sydvast", "specialist_access") not in rows  # no intake of sydvast's from 2025
    every = {(r["district"], r["metric"]): r for r in csv.DictReader(io.StringIO(unfiltered.text))}
    assert every["sydvast", "specialist_access"]["persons"] == ""
    assert every["sydvast", "specialist_access"]["suppressed"] == "true"
    assert '"from":"2025-01-01"' in as_csv.headers["likvard-provenance"]
    assert '"from"' not in unfiltered.headers["likvard-provenance"]  # only when asked for

    assert report.status_code == 200
    assert report.headers["content-type"].startswith("text/html")
    assert report.headers["content-disposition"].startswith("attachment")
    assert 'id="likvard-record"' in report.text and "2025-12-31" in report.text


@pytest.mark.integration
def test_the_indicators_and_waits_pages(app_url: tuple[str, str]) -> None:
    base_url, _ = app_url
    with browser(base_url, "analyst") as b:
        page = assert_page(b.get("/console/indicators"))
        recorded = assert_page(b.get("/console/indicators", params={"structure": "as-recorded"}))
        waits = assert_page(b.get("/console/waits"))
    assert "<h1>Indicators</h1>" in page
    table = '<table data-indicator="U35537">'
    assert f"{datetime.now(UTC).year} to date" in page
    # 2024: each district's first visits within 1-7 days; sydvast's three are suppressed
    visits = row(page, table, "centrum")
    assert visits.startswith("Centrum 4.0") or visits.startswith("Centrum 3.0"), visits
    sydvast = row(page, table, "sydvast")
    assert sydvast.startswith("Sydväst suppressed") and not re.search(r"\d", sydvast)
    assert page.count("<svg") >= 1 and page.count("<table data-indicator=") >= 1
    assert "selected>As recorded at intake" in recorded

    assert "<h1>Waiting times</h1>" in waits
    first_visit = '<table data-wait="intake_to_first_visit">'
    assert waits.count("<svg") >= 2 and waits.count("<table data-wait=") >= 2
    city = row(waits, first_visit, "city")
    assert city.startswith("City 123 123 0 "), city
    assert row(waits, first_visit, "sydvast") == "Sydväst suppressed"


@pytest.mark.integration
def test_a_case_worker_is_refused_and_logged(app_url: tuple[str, str], database_url: str) -> None:
    base_url, al = app_url
    with browser(base_url, "case-worker", districts=("nordost",)) as b:
        answers = [b.get(f"/console/{p}") for p in ("equal-access", "indicators", "waits")]
        csv_answer = b.get("/console/equal-access.csv")
    for r in [*answers, csv_answer]:
        assert r.status_code == 403
        assert r.headers["content-type"].startswith("text/html")
        assert "Not allowed" in r.text
    with psycopg.connect(database_url) as conn:
        logged = conn.execute(
            sql.SQL(
                "SELECT payload->>'resource', payload->>'reason' FROM {}.events"
                " WHERE payload->>'outcome' = 'refused'"
            ).format(sql.Identifier(al))
        ).fetchall()
    resources = sorted(resource for resource, _ in logged)
    assert resources == [
        "report:equal-access",
        "report:equal-access",
        "report:indicators",
        "report:waits",
    ]
    assert {reason for _, reason in logged} == {"role-not-allowed"}
