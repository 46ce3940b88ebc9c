"""Who may read and change a case, on the intake API with real tokens from the development
OpenID provider and the real access log: district scopes, a transfer (the receiving
district takes over, the sending one keeps reading for 30 days), emergency reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from likvard import access_log_audit
from likvard.config import Settings
from likvard.identity import Principal, Role
from likvard.policy import Action, allowed
from services.intake import domain as d
from services.intake.api import case_scope
from tests.identity import bearer
from tests.support import RunningService

NORDOST = "cw-nordost-auth"
HISINGEN = "cw-hisingen-auth"
NEW_CASE: dict[str, Any] = {
    "personal_identity_number": "19121212-1212",
    "district": "nordost",
    "substances": ["ALCOHOL"],
    "referral_source": "HEALTHCARE",
    "children_in_household": "NO",
}
CLOSE = {"reason": "GOALS_REACHED"}


def nordost() -> dict[str, str]:
    return bearer(Role.CASE_WORKER, districts=("nordost",), subject=NORDOST)


def hisingen() -> dict[str, str]:
    return bearer(Role.CASE_WORKER, districts=("hisingen",), subject=HISINGEN)


@pytest.fixture
def client(intake: RunningService) -> httpx.Client:
    return httpx.Client(base_url=intake.base_url, timeout=30)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


def register(client: httpx.Client) -> str:
    r = client.post("/cases", json=NEW_CASE, headers=nordost())
    assert r.status_code == 201, r.text
    return str(r.json()["case_id"])


def log_of(settings: Settings, case_id: str) -> list[tuple[str, str, str, str, str | None]]:
    """The case's access-log entries as (actor, action, outcome, reason, emergency)."""
    return [
        (e.actor, e.action, e.outcome, e.reason, e.emergency_reason)
        for e in access_log_audit.search(settings, case_id=case_id)
    ]


def status(r: httpx.Response) -> int:
    return r.status_code


@pytest.mark.integration
def test_a_hisingen_worker_cannot_read_or_change_a_nordost_case_and_is_logged(
    client: httpx.Client, intake: RunningService, settings: Settings
) -> None:
    case = register(client)
    read = client.get(f"/cases/{case}", headers=hisingen())
    assert read.status_code == 403
    assert read.headers["content-type"].startswith("application/problem+json")
    assert "not-your-district" in read.json()["detail"]
    assert status(client.get(f"/cases/{case}/events", headers=hisingen())) == 403
    assert status(client.post(f"/cases/{case}/close", json=CLOSE, headers=hisingen())) == 403
    assert intake.store.stream_version(case) == 1  # nothing changed
    assert status(client.get(f"/cases/{case}", headers=nordost())) == 200
    assert log_of(settings, case) == [
        (HISINGEN, "case.read", "refused", "not-your-district", None),
        (HISINGEN, "case.history", "refused", "not-your-district", None),
        (HISINGEN, "case.change", "refused", "not-your-district", None),
        (NORDOST, "case.read", "allowed", "own-district", None),
    ]


@pytest.mark.integration
def test_after_a_transfer_the_receiving_district_takes_over_and_the_sender_reads(
    client: httpx.Client, intake: RunningService, settings: Settings
) -> None:
    case = register(client)
    moved = client.post(
        f"/cases/{case}/transfer",
        json={"to_district": "hisingen", "reason": "PERSON_MOVED"},
        headers=nordost(),
    )
    assert moved.status_code == 200, moved.text
    assert intake.store.read_stream(case)[1].metadata["actor"] == NORDOST

    assert client.get(f"/cases/{case}", headers=hisingen()).json()["district"] == "hisingen"
    assert status(client.get(f"/cases/{case}/events", headers=hisingen())) == 200
    assessed = client.post(
        f"/cases/{case}/assessments",
        json={
            "instrument": "AUDIT",
            "scores": [{"scale": "total", "value": 9}],
            "need_level": "LOW",
        },
        headers=hisingen(),
    )
    assert assessed.status_code == 200, assessed.text

    assert status(client.get(f"/cases/{case}", headers=nordost())) == 200
    assert status(client.get(f"/cases/{case}/events", headers=nordost())) == 200
    assert status(client.post(f"/cases/{case}/close", json=CLOSE, headers=nordost())) == 403
    assert intake.store.stream_version(case) == 3
    entries = log_of(settings, case)
    assert entries[-3:] == [
        (NORDOST, "case.read", "allowed", "former-district", None),
        (NORDOST, "case.history", "allowed", "former-district", None),
        (NORDOST, "case.change", "refused", "not-your-district", None),
    ]
    assert (HISINGEN, "case.change", "allowed", "own-district", None) in entries


@pytest.mark.integration
def test_an_emergency_read_outside_the_district_is_allowed_logged_and_flagged(
    client: httpx.Client, settings: Settings
) -> None:
    case = register(client)
    emergency = {**hisingen(), "Likvard-Emergency-Reason": "child-at-risk"}
    read = client.get(f"/cases/{case}", headers=emergency)
    assert read.status_code == 200, read.text
    assert read.json()["district"] == "nordost"
    assert status(client.get(f"/cases/{case}/events", headers=emergency)) == 200
    # An emergency opens reads only, and only with a reason from the fixed list.
    assert status(client.post(f"/cases/{case}/close", json=CLOSE, headers=emergency)) == 403
    made_up = {**hisingen(), "Likvard-Emergency-Reason": "curious"}
    assert status(client.get(f"/cases/{case}", headers=made_up)) == 403

    assert log_of(settings, case) == [
        (HISINGEN, "case.read", "allowed", "emergency", "child-at-risk"),
        (HISINGEN, "case.history", "allowed", "emergency", "child-at-risk"),
        (HISINGEN, "case.change", "refused", "not-your-district", None),
        (HISINGEN, "case.read", "refused", "unknown-emergency-reason", None),
    ]
    flagged = access_log_audit.search(settings, case_id=case, emergency=True)
    assert [(e.action, e.emergency_reason) for e in flagged] == [
        ("case.read", "child-at-risk"),
        ("case.history", "child-at-risk"),
    ]


@pytest.mark.integration
def test_an_unknown_case_is_404_to_a_case_worker_and_403_to_other_roles(
    client: httpx.Client,
) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    assert status(client.get(f"/cases/{missing}", headers=hisingen())) == 404
    assert status(client.post(f"/cases/{missing}/close", json=CLOSE, headers=hisingen())) == 404
    assert status(client.get(f"/cases/{missing}", headers=bearer(Role.ANALYST))) == 403
    assert status(client.get(f"/cases/{missing}/events", headers=bearer(Role.AUDITOR))) == 404


def test_the_sending_district_reads_for_30_days_after_the_transfer_and_not_on_day_31() -> None:
    """The case's scope as the API builds it from the folded events, asked at two times."""
    at = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    events = [
        d.DomainEvent("IntakeRegistered", {**NEW_CASE, "person": "p" * 64}, at),
        d.DomainEvent(
            "CaseTransferred",
            {"from_district": "nordost", "to_district": "hisingen", "reason": "PERSON_MOVED"},
            at,
        ),
    ]
    scope = case_scope("c-1", d.fold(events))
    worker = Principal(NORDOST, frozenset({Role.CASE_WORKER}), frozenset({"nordost"}))
    day_30 = allowed(worker, Action.CASE_READ, scope, now=at + timedelta(days=30))
    day_31 = allowed(worker, Action.CASE_READ, scope, now=at + timedelta(days=31))
    assert (day_30.allow, day_30.reason) == (True, "former-district")
    assert (day_31.allow, day_31.reason) == (False, "former-district-expired")
    change = allowed(worker, Action.CASE_CHANGE, scope, now=at + timedelta(days=1))
    assert not change
