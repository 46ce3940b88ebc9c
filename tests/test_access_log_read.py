"""The auditor's side of the access log, end to end: reads and refusals made through the
reporting API on a real server with tokens from the development OpenID provider (a real
process), committed to the access-log store by the guard, then listed by `likvard
access-log` as a subprocess (straight from the store) and by `GET /access-log` (from the
read model the store's events are projected into)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from likvard.access_log import open_store
from likvard.access_log_audit import search
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.domain import CITY_TZ
from likvard.inbox import Incoming, decode_event
from likvard.topics import SERVICE_TOPICS
from services.projections import readmodels
from services.projections.api import create_app
from tests.identity import bearer, token
from tests.support import serving

pytestmark = pytest.mark.integration

EMERGENCY = "Likvard-Emergency-Reason"


def worker(district: str, subject: str) -> dict[str, str]:
    """A case worker of `district` (their subject is the actor in the access log)."""
    return bearer("case-worker", districts=[district], subject=subject)


def case_history(case_id: str) -> list[Incoming]:
    """A Nordost case transferred to Hisingen five days ago (as the worker projects it)."""
    now = datetime.now(UTC)
    intake = {
        "person": "ef" * 32,
        "district": "nordost",
        "substances": ["ALCOHOL"],
        "referral_source": "SELF",
        "children_in_household": "NO",
        "birth_year": 1975,
    }
    moved = {"from_district": "nordost", "to_district": "hisingen", "reason": "PERSON_MOVED"}
    history: list[tuple[str, int, str, dict[str, Any]]] = [
        ("IntakeRegistered", 10, "nordost", intake),
        ("CaseTransferred", 5, "hisingen", moved),
    ]
    events = []
    for version, (event_type, days, district, data) in enumerate(history, start=1):
        event_id = str(uuid.uuid4())
        at = now - timedelta(days=days)
        metadata = {
            "event_id": event_id,
            "event_type": event_type,
            "case_id": case_id,
            "stream_version": version,
            "occurred_at": at,
            "recorded_at": at,
            "producer": "likvard-intake",
            "district": district,
            "actor": "cw-1",
            "correlation_id": "c",
            "causation_id": None,
            "traceparent": None,
        }
        topic = SERVICE_TOPICS["intake"]
        events.append(Incoming(topic, 0, version, event_id, event_type, case_id, metadata, data))
    return events


@dataclass
class Reporting:
    client: httpx.Client
    database_url: str
    schema: str  # the read models
    access_schema: str  # the access-log store
    case_id: str

    def project_access_log(self, catalogue: Catalogue) -> int:
        """Fold the access-log store's events into the read models, as the worker would
        from the topic (here without Kafka): returns how many were new."""
        store = open_store(Settings(database_url=self.database_url), schema=self.access_schema)
        try:
            events = [
                decode_event(catalogue, store.topic, 0, e.global_position, e.data)
                for e in store.read_all()
            ]
        finally:
            store.pool.close()
        with psycopg.connect(self.database_url, autocommit=True) as conn, conn.transaction():
            return readmodels.apply(conn, self.schema, events)


@pytest.fixture
def reporting(
    database_url: str, schema: str, new_schema: Callable[[str], str]
) -> Iterator[Reporting]:
    case_id = str(uuid.uuid4())
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, schema)
        readmodels.apply(conn, schema, case_history(case_id))
    access_schema = new_schema("alog")
    app = create_app(
        Settings(database_url=database_url), schema=schema, access_log_schema=access_schema
    )
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        yield Reporting(client, database_url, schema, access_schema, case_id)


def likvard_access_log(
    database_url: str, *args: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LIKVARD_DATABASE_URL=database_url)
    env.pop("LIKVARD_ACCESS_LOG_DATABASE_URL", None)
    env.pop("LIKVARD_TOKEN", None)
    if token is not None:
        env["LIKVARD_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "likvard.cli", "access-log", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def listed(database_url: str, schema: str, *args: str) -> list[dict[str, Any]]:
    result = likvard_access_log(database_url, "--schema", schema, "--json", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def make_reads(r: Reporting) -> None:
    """Five timeline requests of the case, one after the other, and an analyst's attempt
    at the access log."""
    path = f"/cases/{r.case_id}/timeline"
    statuses = [
        r.client.get(path, headers=worker("hisingen", "cw-hisingen-7")).status_code,
        r.client.get(path, headers=worker("centrum", "cw-centrum-5")).status_code,
        r.client.get(
            path, headers=worker("centrum", "cw-centrum-5") | {EMERGENCY: "child-at-risk"}
        ).status_code,
        r.client.get(path, headers=worker("nordost", "cw-nordost-3")).status_code,
        r.client.get(path, headers=bearer("analyst", subject="analyst-2")).status_code,
        r.client.get("/access-log", headers=bearer("analyst", subject="analyst-2")).status_code,
    ]
    # the receiving district, another district refused, its emergency read, the sending
    # district within 30 days, an analyst refused a case and refused the access log
    assert statuses == [200, 403, 200, 200, 403, 403]


# (actor, outcome, reason, emergency reason) of the case's entries, in order
EXPECTED = [
    ("cw-hisingen-7", "allowed", "own-district", None),
    ("cw-centrum-5", "refused", "not-your-district", None),
    ("cw-centrum-5", "allowed", "emergency", "child-at-risk"),
    ("cw-nordost-3", "allowed", "former-district", None),
    ("analyst-2", "refused", "role-not-allowed", None),
]


def summary(entries: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["actor"], e["outcome"], e["reason"], e["emergency_reason"]) for e in entries]


def test_likvard_access_log_lists_every_read_of_a_case_in_order(reporting: Reporting) -> None:
    r = reporting
    make_reads(r)
    entries = listed(r.database_url, r.access_schema, "--case", r.case_id)
    assert summary(entries) == EXPECTED
    assert [e["accessed_at"] for e in entries] == sorted(e["accessed_at"] for e in entries)
    assert {e["resource"] for e in entries} == {f"case:{r.case_id}"}
    assert {e["action"] for e in entries} == {"case.history"}
    assert {e["service"] for e in entries} == {"projections"}
    assert entries[0]["roles"] == "case-worker" and entries[-1]["roles"] == "analyst"

    emergency = listed(r.database_url, r.access_schema, "--emergency")
    assert summary(emergency) == [EXPECTED[2]]
    by_actor = listed(r.database_url, r.access_schema, "--actor", "cw-centrum-5")
    assert summary(by_actor) == EXPECTED[1:3]
    # the analyst's refused read of the access log is of no case: listed by actor
    analyst = listed(r.database_url, r.access_schema, "--actor", "analyst-2")
    assert [(e["resource"], e["case_id"], e["outcome"]) for e in analyst] == [
        (f"case:{r.case_id}", r.case_id, "refused"),
        ("access-log", None, "refused"),
    ]
    today = date.today()
    window = ["--from", str(today - timedelta(days=1)), "--to", str(today + timedelta(days=1))]
    assert len(listed(r.database_url, r.access_schema, "--case", r.case_id, *window)) == 5
    tomorrow = str(today + timedelta(days=2))
    assert listed(r.database_url, r.access_schema, "--from", tomorrow) == []

    table = likvard_access_log(r.database_url, "--schema", r.access_schema, "--case", r.case_id)
    assert table.returncode == 0, table.stderr
    lines = [line for line in table.stdout.splitlines() if r.case_id in line]
    assert len(lines) == 5
    assert "refused" in lines[1] and "not-your-district" in lines[1]
    assert "child-at-risk" in lines[2]
    assert "5 entries" in table.stderr

    bad = likvard_access_log(r.database_url, "--from", "2025-03-02", "--to", "2025-03-01")
    assert bad.returncode == 2 and "--to is before --from" in bad.stderr


def test_get_access_log_answers_the_projected_entries(
    reporting: Reporting, catalogue: Catalogue
) -> None:
    r = reporting
    make_reads(r)
    assert r.project_access_log(catalogue) == 6
    assert r.project_access_log(catalogue) == 0  # re-delivered: nothing twice

    auditor = bearer("auditor", subject="auditor-1")

    def get(**params: Any) -> httpx.Response:
        return r.client.get("/access-log", params=params, headers=auditor)

    answer = get(case_id=r.case_id)
    assert answer.status_code == 200, answer.text
    page = answer.json()
    assert summary(page["entries"]) == EXPECTED and page["next"] is None
    store_order = listed(r.database_url, r.access_schema, "--case", r.case_id)
    assert [e["event_id"] for e in page["entries"]] == [e["event_id"] for e in store_order]

    assert summary(get(actor="cw-centrum-5").json()["entries"]) == EXPECTED[1:3]
    assert summary(get(emergency="true").json()["entries"]) == [EXPECTED[2]]
    assert len(get(emergency="false").json()["entries"]) == 5
    assert [e["resource"] for e in get(outcome="refused").json()["entries"]] == [
        f"case:{r.case_id}",
        f"case:{r.case_id}",
        "access-log",
    ]
    today = datetime.now(CITY_TZ).date()  # the days are the city's
    assert len(get(**{"from": str(today), "to": str(today)}).json()["entries"]) == 6
    week = {"from": str(today - timedelta(days=3)), "to": str(today + timedelta(days=3))}
    assert len(get(**week).json()["entries"]) == 6
    assert get(**{"to": str(today - timedelta(days=2))}).json()["entries"] == []
    assert get(**{"from": "2025-03-02", "to": "2025-03-01"}).status_code == 422

    # pages of two, each `next` the `after` of the following one
    seen, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"after": after} if after else {})
        body = get(**params).json()
        seen += [e["event_id"] for e in body["entries"]]
        after = body["next"]
        if after is None:
            break
    assert seen == [e["event_id"] for e in get().json()["entries"]]
    assert len(seen) == 6
    assert get(after=str(uuid.uuid4())).status_code == 422

    # the auditor reads the timeline too (recorded); the analyst may read neither
    timeline = r.client.get(f"/cases/{r.case_id}/timeline", headers=auditor)
    assert timeline.status_code == 200
    assert [e["event_type"] for e in timeline.json()] == ["IntakeRegistered", "CaseTransferred"]
    analyst = bearer("analyst", subject="analyst-2")
    refused = r.client.get("/access-log", params={"case_id": r.case_id}, headers=analyst)
    assert refused.status_code == 403
    logged = listed(r.database_url, r.access_schema, "--actor", "analyst-2")
    assert [(e["resource"], e["outcome"]) for e in logged][-1] == ("access-log", "refused")
    audited = listed(r.database_url, r.access_schema, "--actor", "auditor-1")
    assert summary(audited) == [("auditor-1", "allowed", "auditor", None)]
    assert r.client.get("/access-log").status_code == 401


def test_likvard_access_log_is_for_auditors_and_logs_the_operator(reporting: Reporting) -> None:
    r = reporting
    auditor, analyst = f"auditor-{uuid.uuid4().hex[:8]}", f"analyst-{uuid.uuid4().hex[:8]}"
    args = ("--schema", r.access_schema, "--json")
    ok = likvard_access_log(r.database_url, *args, token=token("auditor", subject=auditor))
    assert ok.returncode == 0, ok.stderr
    refused = likvard_access_log(r.database_url, *args, token=token("analyst", subject=analyst))
    assert refused.returncode == 1
    assert "not allowed" in refused.stderr and refused.stdout == ""
    # the operators' reads are in the command line's access log (service cli)
    settings = Settings(database_url=r.database_url)
    logged = [(e.actor, e.outcome, e.resource, e.service) for a in (auditor, analyst)
              for e in search(settings, actor=a)]  # fmt: skip
    assert logged == [
        (auditor, "allowed", "access-log", "cli"),
        (analyst, "refused", "access-log", "cli"),
    ]
