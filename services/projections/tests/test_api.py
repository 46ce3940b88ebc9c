"""The reporting API on a real uvicorn server and PostgreSQL, over the generated cases of
`test_reports` (58 cases, 57 persons, four current districts and the old code lundby),
signed in with tokens of the development OpenID provider (a real process, conftest.py):
the reports as an analyst, timelines as an auditor or a case worker."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Iterator
from datetime import date, datetime

import httpx
import psycopg
import pytest

from likvard.config import Settings
from services.projections import readmodels, reports, stats
from services.projections.api import create_app
from services.projections.audit import AuditCell, audit_report
from services.projections.tests.test_reports import EVENTS
from tests.identity import bearer
from tests.support import serving

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


@pytest.fixture
def api(database_url: str, schema: str, new_schema: Callable[[str], str]) -> Iterator[httpx.Client]:
    """The API as an analyst (the reports' role); other roles pass their own header."""
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, schema)
        readmodels.apply(conn, schema, EVENTS)
    app = create_app(
        Settings(database_url=database_url), schema=schema, access_log_schema=new_schema("al")
    )
    with (
        serving(app) as base_url,
        httpx.Client(base_url=base_url, timeout=30, headers=bearer("analyst")) as client,
    ):
        yield client


def test_followup_report_json_is_the_report_of_the_read_models(
    api: httpx.Client, database_url: str, schema: str
) -> None:
    r = api.get("/reports/followup", params={"from": "2024-01-01", "to": "2024-12-31"})
    assert r.status_code == 200, r.text
    with psycopg.connect(database_url) as conn:
        expected = reports.followup_report(
            conn, schema, start=date(2024, 1, 1), end=date(2024, 12, 31), period="month"
        )
    assert r.json() == [dataclasses.asdict(row) for row in expected]
    by_key = {(row["period"], row["district"]): row for row in r.json()}
    assert by_key["2024-01", "city"]["persons"] == 35
    sydvast = by_key["2024-01", "sydvast"]
    assert sydvast["suppressed"] is True
    assert all(sydvast[n] is None for n in reports.NUMBERS)


def test_followup_report_as_csv(api: httpx.Client) -> None:
    r = api.get(
        "/reports/followup",
        params={"from": "2024-01-01", "to": "2024-12-31", "period": "year", "format": "csv"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == [f.name for f in dataclasses.fields(reports.ReportRow)]
    assert [(row["period"], row["district"]) for row in rows] == [
        ("2024", "centrum"),
        ("2024", "hisingen"),
        ("2024", "nordost"),
        ("2024", "sydvast"),
        ("2024", "city"),
    ]
    city = rows[-1]
    assert (city["persons"], city["new_intakes"], city["suppressed"]) == ("57", "58", "false")
    sydvast = rows[3]
    assert sydvast["suppressed"] == "true"
    assert all(sydvast[n] == "" for n in reports.NUMBERS)


def test_district_filter_and_structures(api: httpx.Client) -> None:
    window = {"from": "2024-01-01", "to": "2024-12-31", "period": "year"}
    only = api.get("/reports/followup", params=window | {"district": "hisingen"}).json()
    assert [(row["district"], row["persons"]) for row in only] == [("hisingen", 16)]
    # lundby was succeeded by hisingen: not a district of the current structure...
    r = api.get("/reports/followup", params=window | {"district": "lundby"})
    assert r.status_code == 422
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["type"].endswith("district-not-in-structure")
    assert "hisingen" in r.json()["detail"]
    # ...but it is as recorded (4 persons: suppressed)
    recorded = api.get(
        "/reports/followup",
        params=window | {"district": "lundby", "structure": "as-recorded"},
    ).json()
    assert [(row["district"], row["suppressed"]) for row in recorded] == [("lundby", True)]


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"from": "2024-02-01", "to": "2024-01-01"}, 422, "bad-period"),
        ({"from": "2024-01-01", "to": "2024-12-31", "district": "x"}, 422, "unknown-district"),
        ({"from": "2024-01-01", "to": "2024-12-31", "format": "xml"}, 422, None),
        ({"from": "2024-13-01", "to": "2024-12-31"}, 422, None),
        ({"to": "2024-12-31"}, 422, None),
    ],
)
def test_bad_report_requests_are_problems(
    api: httpx.Client, params: dict[str, str], status: int, code: str | None
) -> None:
    r = api.get("/reports/followup", params=params)
    assert r.status_code == status
    assert r.headers["content-type"] == PROBLEM
    if code:
        assert r.json()["type"].endswith(code)


def test_equal_access_is_the_audit_of_the_read_models(
    api: httpx.Client, database_url: str, schema: str
) -> None:
    r = api.get("/reports/equal-access")
    assert r.status_code == 200, r.text
    with psycopg.connect(database_url) as conn:
        rows = reports.audit_rows(conn, schema)
    made = audit_report(rows)  # Holm, the published rule, by default
    expected = made.cells
    assert r.json() == [dataclasses.asdict(c) for c in expected]
    assert r.headers["Likvard-Comparisons"] == str(made.comparisons)
    assert made.comparisons == sum(1 for c in expected if c.p_value is not None) > 0
    for cell in r.json():
        assert cell["flagged"] is cell["holm_flagged"]
        if not cell["suppressed"]:
            assert cell["comparisons"] == made.comparisons and cell["sr"] is not None
    band = api.get("/reports/equal-access", params={"flag_rule": "band"}).json()
    assert band == [dataclasses.asdict(c) for c in audit_report(rows, flag_rule="band").cells]
    assert all(c["flagged"] is c["band_flagged"] for c in band)
    wrapped = api.get("/reports/equal-access", params={"provenance": "true"}).json()
    assert wrapped["comparisons"] == made.comparisons
    assert wrapped["provenance"]["parameters"]["flag_rule"] == "holm"
    bad = api.get("/reports/equal-access", params={"flag_rule": "bonferroni"})
    assert bad.status_code == 422 and bad.headers["content-type"].startswith(PROBLEM)
    assert {c["district"] for c in r.json()} == {"centrum", "hisingen", "nordost", "sydvast"}
    for cell in r.json():
        if cell["suppressed"]:
            assert cell["persons"] is None and cell["rate"] is None and not cell["flagged"]

    only = api.get("/reports/equal-access", params={"district": "nordost"})
    assert only.json() and {c["district"] for c in only.json()} == {"nordost"}
    assert only.headers["Likvard-Comparisons"] == str(made.comparisons)  # the whole family
    as_csv = api.get("/reports/equal-access", params={"format": "csv"})
    header = as_csv.text.splitlines()[0].split(",")
    assert header == [f.name for f in dataclasses.fields(AuditCell)]
    assert len(as_csv.text.splitlines()) == len(expected) + 1


def test_waits_are_the_kaplan_meier_summaries_of_the_read_models(
    api: httpx.Client, database_url: str, schema: str
) -> None:
    r = api.get("/reports/waits")
    assert r.status_code == 200, r.text
    got = r.json()
    with psycopg.connect(database_url) as conn:
        rows = reports.wait_rows(conn, schema)
    as_of = datetime.fromisoformat(
        json.loads(r.headers["Likvard-Provenance"])["parameters"]["as_of"]
    )
    made = stats.wait_report(rows, as_of=as_of)
    assert got == json.loads(json.dumps([dataclasses.asdict(s) for s in made.summaries]))
    assert r.headers["Likvard-Comparisons"] == str(made.comparisons)
    assert {(s["wait"], s["district"]) for s in got} >= {(w, "city") for w in reports.WAITS}
    for s in got:
        assert set(s) == {f.name for f in dataclasses.fields(stats.WaitSummary)}  # no case id
        if s["suppressed"]:
            assert s["persons"] is None and s["median_days"] is None and s["curve"] == []
    only = api.get("/reports/waits", params={"district": "city", "format": "csv"})
    lines = only.text.splitlines()
    assert lines[0].split(",") == [
        f.name for f in dataclasses.fields(stats.WaitSummary) if f.name != "curve"
    ]
    assert len(lines) == 1 + len(reports.WAITS) and all(",city," in x for x in lines[1:])
    unknown = api.get("/reports/waits", params={"district": "atlantis"})
    assert unknown.status_code == 422 and unknown.headers["content-type"].startswith(PROBLEM)


def test_case_timeline_in_order_json_and_csv(api: httpx.Client) -> None:
    case = "case-centrum-01-00"
    auditor = bearer("auditor")
    r = api.get(f"/cases/{case}/timeline", headers=auditor)
    assert r.status_code == 200
    events = r.json()
    types = [e["event_type"] for e in events]
    assert types[0] == "IntakeRegistered"
    assert types == [
        e.event_type
        for e in sorted(
            (e for e in EVENTS if e.case_id == case),
            key=lambda e: (e.metadata["occurred_at"], e.metadata["stream_version"], e.event_id),
        )
    ]
    assert [e["occurred_at"] for e in events] == sorted(e["occurred_at"] for e in events)
    as_csv = list(
        csv.DictReader(
            io.StringIO(api.get(f"/cases/{case}/timeline?format=csv", headers=auditor).text)
        )
    )
    assert [row["event_type"] for row in as_csv] == types
    assert as_csv[0]["payload"].startswith("{")

    missing = api.get("/cases/no-such-case/timeline", headers=auditor)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM


def test_who_may_read_a_timeline(api: httpx.Client) -> None:
    case = "case-centrum-01-00"  # a centrum case
    path = f"/cases/{case}/timeline"
    own = api.get(path, headers=bearer("case-worker", districts=["centrum"]))
    assert own.status_code == 200
    other = bearer("case-worker", districts=["hisingen"])
    refused = api.get(path, headers=other)
    assert refused.status_code == 403
    assert refused.headers["content-type"] == PROBLEM
    assert "not-your-district" in refused.json()["detail"]
    emergency = api.get(path, headers=other | {"Likvard-Emergency-Reason": "child-at-risk"})
    assert emergency.status_code == 200
    assert emergency.json() == own.json()
    bad_reason = api.get(path, headers=other | {"Likvard-Emergency-Reason": "curious"})
    assert bad_reason.status_code == 403  # not one of the fixed codes
    assert "unknown-emergency-reason" in bad_reason.json()["detail"]
    assert api.get(path).status_code == 403  # the analyst: aggregate reports only
    for role in ("unit-staff", "records-officer", "ops"):
        assert api.get(path, headers=bearer(role)).status_code == 403, role
    # an id shaped like a personal identity number is no case: 404, nothing looked up
    number = api.get("/cases/19121212-1212/timeline", headers=bearer("auditor"))
    assert number.status_code == 404


@pytest.mark.parametrize("role", ["case-worker", "unit-staff", "records-officer", "ops"])
def test_reports_are_for_analysts_and_auditors(api: httpx.Client, role: str) -> None:
    window = {"from": "2024-01-01", "to": "2024-12-31"}
    for path, params in (
        ("/reports/followup", window),
        ("/reports/equal-access", {}),
        ("/reports/waits", {}),
    ):
        auditor = api.get(path, params=params, headers=bearer("auditor"))
        assert auditor.status_code == 200, path
        other = api.get(path, params=params, headers=bearer(role, districts=["centrum"]))
        assert other.status_code == 403, (path, role)
        # refused before the parameters are judged: a bad request is still a 403
        assert api.get(path, params={"from": "x"}, headers=bearer(role)).status_code == 403
    assert httpx.get(f"{api.base_url}/reports/equal-access").status_code == 401


def test_health_and_readiness(api: httpx.Client) -> None:
    assert httpx.get(f"{api.base_url}/healthz").status_code == 200
    assert httpx.get(f"{api.base_url}/readyz").status_code == 200
