"""Who may do what with family work and follow-ups, against the development OpenID provider
as a real process and the access log in PostgreSQL."""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from likvard import access_log_audit
from likvard.config import Settings
from services.followup.tests.test_api import (
    COMPLETE,
    Followup,
    assert_problem,
    followup as followup,  # the fixture
    incoming,
    intervention_ended,
    known_case,
    schedule,
)
from tests.identity import bearer

pytestmark = pytest.mark.integration


def subject(prefix: str) -> str:
    """A subject of this test's own (letters only: never shaped like an identity number)."""
    return prefix + "-" + "".join(random.choices(string.ascii_lowercase, k=12))


def worker(*districts: str, who: str | None = None) -> dict[str, str]:
    return bearer("case-worker", districts=districts, subject=who or f"cw-{'-'.join(districts)}")


@pytest.fixture
def client(followup: Followup) -> httpx.Client:
    return httpx.Client(base_url=followup.base_url, timeout=30)


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(database_url=database_url)


def test_a_hisingen_worker_cannot_change_or_read_a_nordost_case(
    client: httpx.Client, followup: Followup, settings: Settings
) -> None:
    case = known_case(followup, district="nordost")
    schedule(followup, intervention_ended(case))
    before = followup.store.count()
    who = subject("cw")
    hisingen = worker("hisingen", who=who)
    view = client.get(f"/cases/{case}/followups", headers=worker("nordost")).json()
    fid = view["followups"][0]["followup_id"]
    refused = [
        client.post(f"/cases/{case}/children", json={"number_of_children": 1}, headers=hisingen),
        client.post(f"/followups/{fid}/complete", json=COMPLETE, headers=hisingen),
        client.post(f"/followups/{fid}/missed", json={"reason": "MOVED"}, headers=hisingen),
        client.get(f"/cases/{case}/followups", headers=hisingen),
    ]
    for r in refused:
        assert_problem(r, 403, "forbidden")
    assert followup.store.count() == before
    logged = access_log_audit.search(settings, actor=who)
    assert [(e.action, e.case_id, e.outcome, e.reason) for e in logged] == [
        ("case.change", case, "refused", "not-your-district"),
        ("case.change", case, "refused", "not-your-district"),
        ("case.change", case, "refused", "not-your-district"),
        ("case.read", case, "refused", "not-your-district"),
    ]
    # Unit staff have no part in a case's family work.
    staff = bearer("unit-staff", unit="hisingen-anhorigstod", subject="staff-anhorig")
    assert_problem(
        client.post(f"/cases/{case}/children", json={"number_of_children": 1}, headers=staff),
        403,
        "forbidden",
    )
    done = client.post(f"/followups/{fid}/complete", json=COMPLETE, headers=worker("nordost"))
    assert done.status_code == 200, done.text
    assert followup.store.read_stream(case)[-1].metadata["actor"] == "cw-nordost"


def test_after_a_transfer_the_receiving_district_changes_and_the_sender_only_reads(
    client: httpx.Client, followup: Followup, settings: Settings
) -> None:
    case = known_case(followup, district="nordost")
    with followup.pool.connection() as conn:
        followup.directory.handle(
            conn,
            [
                incoming(
                    "CaseTransferred",
                    case,
                    {"from_district": "nordost", "to_district": "hisingen", "reason": "OTHER"},
                    district="hisingen",
                    version=2,
                )
            ],
        )
    children = {"number_of_children": 1}
    assert_problem(
        client.post(f"/cases/{case}/children", json=children, headers=worker("nordost")),
        403,
        "forbidden",
    )
    assert client.get(f"/cases/{case}/followups", headers=worker("nordost")).status_code == 200
    r = client.post(f"/cases/{case}/children", json=children, headers=worker("hisingen"))
    assert r.status_code == 200, r.text
    assert followup.store.read_stream(case)[0].metadata["district"] == "hisingen"
    reasons = [
        (e.action, e.actor, e.reason) for e in access_log_audit.search(settings, case_id=case)
    ]
    assert reasons == [
        ("case.change", "cw-nordost", "not-your-district"),
        ("case.read", "cw-nordost", "former-district"),
        ("case.change", "cw-hisingen", "own-district"),
    ]


def test_an_emergency_read_is_allowed_logged_and_flagged(
    client: httpx.Client, followup: Followup, settings: Settings
) -> None:
    case = known_case(followup, district="nordost")
    who = subject("cw")
    r = client.get(
        f"/cases/{case}/followups",
        headers={**worker("centrum", who=who), "Likvard-Emergency-Reason": "out-of-hours-duty"},
    )
    assert r.status_code == 200, r.text
    [entry] = access_log_audit.search(settings, actor=who, emergency=True)
    assert (entry.case_id, entry.reason, entry.emergency_reason) == (
        case,
        "emergency",
        "out-of-hours-duty",
    )
    bad = client.get(
        f"/cases/{case}/followups",
        headers={**worker("centrum", who=who), "Likvard-Emergency-Reason": "curious"},
    )
    assert_problem(bad, 403, "forbidden")


def test_due_answers_only_the_callers_districts_and_logs_each_case_shown(
    client: httpx.Client, followup: Followup, settings: Settings
) -> None:
    ended = datetime.now(UTC) - timedelta(days=60)
    north = [known_case(followup, district="nordost") for _ in range(2)]
    centrum = known_case(followup, district="centrum")
    for case in north:
        schedule(followup, intervention_ended(case, district="nordost", ended=ended))
    schedule(followup, intervention_ended(centrum, district="centrum", ended=ended))
    before = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    who = subject("cw")
    r = client.get("/followups/due", params={"before": before}, headers=worker("nordost", who=who))
    assert r.status_code == 200, r.text
    shown = [f["case_id"] for f in r.json()]
    assert set(shown) == set(north) and {f["district"] for f in r.json()} == {"nordost"}

    logged = access_log_audit.search(settings, actor=who)
    # One entry per district asked (Nordost and the older districts it took over), then
    # one per case shown.
    asked = {e.resource for e in logged if e.case_id is None}
    assert "district:nordost" in asked and "district:centrum" not in asked
    assert sorted(str(e.case_id) for e in logged if e.case_id) == sorted(north)  # once each
    assert all(e.action == "followups.due" and e.outcome == "allowed" for e in logged)

    other = client.get(
        "/followups/due",
        params={"before": before, "district": "centrum"},
        headers=worker("nordost", who=who),
    )
    assert_problem(other, 403, "forbidden")
    staff = bearer("unit-staff", unit="hisingen-anhorigstod", subject="staff-anhorig")
    assert_problem(client.get("/followups/due", params={"before": before}, headers=staff), 403)
    assert not access_log_audit.search(settings, case_id=centrum)  # never shown, never logged
    # a reason that is not on the fixed list is refused, with or without a district named
    for params in ({"before": before}, {"before": before, "district": "nordost"}):
        bad = client.get(
            "/followups/due",
            params=params,
            headers={**worker("nordost", who=who), "Likvard-Emergency-Reason": "curious"},
        )
        assert_problem(bad, 403, "forbidden")
