"""The indicators on the reporting API, on a real uvicorn server and PostgreSQL, signed in
with tokens of the development OpenID provider: an analyst gets figures without case ids,
an auditor gets the case ids and the access log has one entry per case shown, every other
role gets 403; and `likvard indicators` as an operator runs it.

The history (hand-built as in test_indicators): eight cases first referred in March 2024.
nordost: n1 2 answered referrals (1 accepted), n2..n5 one accepted each, n6 one declined:
6 persons, 7 answered, 5 accepted -> 5/7. centrum: c1 accepted, c2 declined: 2 persons,
suppressed. City: 9 answered, 6 accepted -> 6/9."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from likvard.access_log_audit import search
from likvard.config import Settings
from likvard.districts import DistrictRegistry
from services.projections import readmodels
from services.projections.api import create_app
from services.projections.indicators_api import FIGURE_COLUMNS, indicators_router
from tests.identity import bearer, token
from tests.support import serving
from tests.test_indicators import Case, at

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
MARCH = {"from": "2024-03-01", "to": "2024-03-31"}
INDICATOR = "likvard-referrals-accepted"
NORDOST = ["case-api-n1", *(f"case-api-n{i}" for i in range(2, 7))]
CENTRUM = ["case-api-c1", "case-api-c2"]


def cases() -> list[Case]:
    march = at(2024, 3, 5)
    made = [
        Case("api-n1", "nordost")
        .intake(march)
        .referral(march, "accepted")
        .referral(march, "declined"),
        *(
            Case(f"api-n{i}", "nordost").intake(march).referral(march, "accepted")
            for i in range(2, 6)
        ),
        Case("api-n6", "nordost").intake(march).referral(march, "declined"),
        Case("api-c1", "centrum").intake(march).referral(march, "accepted"),
        Case("api-c2", "centrum").intake(march).referral(march, "declined"),
    ]
    return made


@pytest.fixture
def loaded(database_url: str, schema: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, schema)
        readmodels.apply(conn, schema, [e for c in cases() for e in c.events])
    return schema


@pytest.fixture
def access_log_schema(new_schema: Callable[[str], str]) -> str:
    return new_schema("al")


@pytest.fixture
def api(database_url: str, loaded: str, access_log_schema: str) -> Iterator[httpx.Client]:
    app = create_app(
        Settings(database_url=database_url), schema=loaded, access_log_schema=access_log_schema
    )
    if not any(getattr(r, "path", None) == "/indicators" for r in app.routes):
        app.include_router(indicators_router(loaded, DistrictRegistry.load()))
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def test_an_analyst_gets_the_figures_and_no_case_ids(api: httpx.Client) -> None:
    listed = api.get("/indicators", headers=bearer("analyst"))
    assert listed.status_code == 200, listed.text
    ids = [d["id"] for d in listed.json()]
    assert {"U35537", "U35400", "U35401", "U35409", INDICATOR} <= set(ids)
    u35409 = next(d for d in listed.json() if d["id"] == "U35409")
    assert u35409["kolada"] is True and u35409["kind"] == "share"
    assert "reactualised_within_year" in u35409["numerator"]

    r = api.get(f"/indicators/{INDICATOR}", params=MARCH, headers=bearer("analyst"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["indicator"]["id"] == INDICATOR and body["structure"] == "current"
    figures = {f["district"]: f for f in body["figures"]}
    assert list(figures) == ["centrum", "nordost", "city"]
    nordost = figures["nordost"]
    assert (nordost["persons"], nordost["n"], nordost["numerator"]) == (6, 7, 5)
    assert nordost["value"] == pytest.approx(5 / 7)
    assert figures["centrum"]["suppressed"] is True and figures["centrum"]["value"] is None
    assert figures["city"]["value"] == pytest.approx(6 / 9)
    assert all(f["case_ids"] is None and f["numerator_case_ids"] is None for f in figures.values())
    assert "case-api" not in r.text

    as_csv = api.get(
        f"/indicators/{INDICATOR}", params=MARCH | {"format": "csv"}, headers=bearer("analyst")
    )
    assert as_csv.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert list(rows[0]) == FIGURE_COLUMNS
    assert [(row["district"], row["n"], row["case_ids"]) for row in rows] == [
        ("centrum", "", ""),
        ("nordost", "7", ""),
        ("city", "9", ""),
    ]


def test_an_auditor_gets_the_case_ids_and_each_is_in_the_access_log(
    api: httpx.Client, database_url: str, access_log_schema: str
) -> None:
    auditor = f"au-{uuid.uuid4().hex[:8]}"
    headers = bearer("auditor", subject=auditor)
    r = api.get(f"/indicators/{INDICATOR}", params=MARCH, headers=headers)
    assert r.status_code == 200, r.text
    figures = {f["district"]: f for f in r.json()["figures"]}
    assert figures["nordost"]["case_ids"] == sorted(NORDOST)
    assert figures["nordost"]["numerator_case_ids"] == [f"case-api-n{i}" for i in range(1, 6)]
    # a suppressed figure keeps its number hidden, but the auditor sees its cases
    assert figures["centrum"]["value"] is None and figures["centrum"]["case_ids"] == CENTRUM
    assert figures["city"]["case_ids"] == sorted(NORDOST + CENTRUM)

    logged = search(Settings(database_url=database_url), actor=auditor, schema=access_log_schema)
    reads = [e for e in logged if e.resource == f"indicator:{INDICATOR}"]
    assert sorted(e.case_id or "" for e in reads) == sorted(NORDOST + CENTRUM)
    assert {(e.action, e.outcome) for e in reads} == {("report.read", "allowed")}

    # figures alone: nothing case-level shown, nothing more logged
    plain = api.get(f"/indicators/{INDICATOR}", params=MARCH | {"cases": "false"}, headers=headers)
    assert plain.status_code == 200 and "case-api" not in plain.text
    again = search(Settings(database_url=database_url), actor=auditor, schema=access_log_schema)
    assert len([e for e in again if e.case_id]) == len(reads)


@pytest.mark.parametrize("role", ["case-worker", "unit-staff", "records-officer", "ops"])
def test_other_roles_are_refused(api: httpx.Client, role: str) -> None:
    headers = bearer(role, districts=["nordost"])
    for path, params in (("/indicators", {}), (f"/indicators/{INDICATOR}", MARCH)):
        r = api.get(path, params=params, headers=headers)
        assert r.status_code == 403, (path, role)
        assert r.headers["content-type"] == PROBLEM
        # refused before the parameters are judged
        assert api.get(path, params={"from": "x"}, headers=headers).status_code == 403
    assert api.get("/indicators").status_code == 401


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/indicators/U0", MARCH, 404, "unknown-indicator"),
        (f"/indicators/{INDICATOR}", {"from": "2024-03-31", "to": "2024-03-01"}, 422, "bad-period"),
        (f"/indicators/{INDICATOR}", MARCH | {"district": "x"}, 422, "unknown-district"),
        (
            f"/indicators/{INDICATOR}",
            MARCH | {"district": "lundby"},
            422,
            "district-not-in-structure",
        ),
        (f"/indicators/{INDICATOR}", MARCH | {"breakdown": "district_now"}, 422, None),
        (f"/indicators/{INDICATOR}", {"to": "2024-03-31"}, 422, None),
    ],
)
def test_bad_requests_are_problems(
    api: httpx.Client, path: str, params: dict[str, str], status: int, code: str | None
) -> None:
    r = api.get(path, params=params, headers=bearer("analyst"))
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    if code:
        assert r.json()["type"].endswith(code)


def test_district_filter_and_breakdown(api: httpx.Client) -> None:
    r = api.get(
        f"/indicators/{INDICATOR}",
        params=MARCH | {"district": "nordost", "breakdown": "age_band"},
        headers=bearer("analyst"),
    )
    assert r.status_code == 200, r.text
    # every case is 35-44: the group is the whole district
    assert [(f["district"], f["group"], f["n"]) for f in r.json()["figures"]] == [
        ("nordost", None, 7),
        ("nordost", "35-44", 7),
    ]


# `python -m likvard.cli`, with the indicators' module imported (it registers the command;
# likvard/cli/__init__.py imports it too once it lists it).
MAIN = "import likvard.cli, likvard.cli.indicators; likvard.cli.app()"


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MAIN, *args],
        env={**os.environ, "COLUMNS": "250", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_likvard_indicators_lists_and_computes(
    database_url: str, loaded: str, access_log_schema: str
) -> None:
    env = {"LIKVARD_DATABASE_URL": database_url, "LIKVARD_ACCESS_LOG_SCHEMA": access_log_schema}
    listed = run_cli(env, "indicators", "--schema", loaded)
    assert listed.returncode == 0, listed.stderr
    assert "U35409" in listed.stdout and INDICATOR in listed.stdout

    analyst = f"an-{uuid.uuid4().hex[:8]}"
    args = ("indicators", INDICATOR, "--from", "2024-03-01", "--to", "2024-03-31")
    r = run_cli(
        {**env, "LIKVARD_TOKEN": token("analyst", subject=analyst)},
        *args,
        "--schema",
        loaded,
        "--json",
    )
    assert r.returncode == 0, r.stderr
    figures = {f["district"]: f for f in map(json.loads, r.stdout.splitlines())}
    assert (figures["nordost"]["n"], figures["nordost"]["numerator"]) == (7, 5)
    assert figures["centrum"]["suppressed"] is True
    assert figures["nordost"]["case_ids"] is None

    table = run_cli(env, *args, "--schema", loaded, "--district", "nordost")
    assert table.returncode == 0, table.stderr
    assert "nordost" in table.stdout and "0.7143" in table.stdout and "city" not in table.stdout

    # the case ids: an auditor's verified token only (logged per case); others exit 1
    auditor = f"au-{uuid.uuid4().hex[:8]}"
    seen = run_cli(
        {**env, "LIKVARD_TOKEN": token("auditor", subject=auditor)},
        *args,
        "--schema",
        loaded,
        "--json",
        "--cases",
    )
    assert seen.returncode == 0, seen.stderr
    by: dict[str, Any] = {f["district"]: f for f in map(json.loads, seen.stdout.splitlines())}
    assert by["nordost"]["case_ids"] == sorted(NORDOST)
    for who in (token("analyst", subject=analyst), ""):
        refused = run_cli({**env, "LIKVARD_TOKEN": who}, *args, "--schema", loaded, "--cases")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "auditor" in refused.stderr and refused.stdout == ""

    logged = search(Settings(database_url=database_url), schema=access_log_schema)
    mine = [e for e in logged if e.actor == auditor and e.case_id]
    assert sorted(e.case_id or "" for e in mine) == sorted(NORDOST + CENTRUM)
    assert any(e.actor == analyst and e.action == "report.read" for e in logged)

    bad = run_cli(env, "indicators", "U0", "--schema", loaded)
    assert bad.returncode == 2 and "U0" in bad.stderr
