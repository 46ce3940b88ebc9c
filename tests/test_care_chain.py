"""The care chain across all three services on real PostgreSQL and a real broker: a case
registered in one district is referred to a unit in another, accepted, given an
intervention; the follow-up service schedules its follow-ups exactly once. Each step is
taken by whoever may take it: a Nordost case worker registers and refers, the Hisingen
unit's staff accept and give the intervention (tokens from the development OpenID
provider)."""

from __future__ import annotations

import httpx
import pytest
from psycopg_pool import ConnectionPool

from likvard.codec import Catalogue
from likvard.known_cases import CaseDirectory
from likvard.republish import republish
from tests.identity import bearer
from tests.support import CareStack, consume, wait_for

pytestmark = pytest.mark.integration


def test_referral_across_districts_schedules_followups_exactly_once(
    care_stack: CareStack, kafka_bootstrap: str, catalogue: Catalogue, pool: ConnectionPool
) -> None:
    intake, referral, followup = care_stack.intake, care_stack.referral, care_stack.followup
    followup_inbox = care_stack.followup_inbox
    http = httpx.Client(
        timeout=30, headers=bearer("case-worker", districts=["nordost"], subject="cw-9")
    )
    r = http.post(
        f"{intake.base_url}/cases",
        json={
            "personal_identity_number": "19121212-1212",
            "district": "nordost",
            "substances": ["ALCOHOL"],
            "referral_source": "SELF",
            "children_in_household": "YES",
        },
    )
    assert r.status_code == 201, r.text
    case = r.json()["case_id"]

    def known_to_referral() -> bool:
        with pool.connection() as conn:
            return CaseDirectory(referral.schema).get(conn, case) is not None

    wait_for(known_to_referral, 60, "the referral service to learn the case from Kafka")

    from likvard.catalogue import ReferenceCatalogue

    unit = next(
        u
        for u in ReferenceCatalogue.load().units()
        if u.host_district == "hisingen" and u.recipient_kind == "CITY_SOCIAL_SERVICES"
    )
    r = http.post(
        f"{referral.base_url}/referrals",
        json={
            "case_id": case,
            "unit_id": unit.id,
            "intervention_code": sorted(unit.intervention_codes)[0],
        },
    )
    assert r.status_code == 201, r.text
    rid = r.json()["referral_id"]
    staff = bearer("unit-staff", unit=unit.id, subject="staff-9")
    accepted = http.post(f"{referral.base_url}/referrals/{rid}/accept", json={}, headers=staff)
    assert accepted.status_code == 200, accepted.text
    started = http.post(
        f"{referral.base_url}/referrals/{rid}/interventions", json={}, headers=staff
    )
    assert started.status_code == 201, started.text
    iid = started.json()["intervention_id"]
    ended = http.post(
        f"{referral.base_url}/interventions/{iid}/end",
        json={"outcome": "COMPLETED_AS_PLANNED"},
        headers=staff,
    )
    assert ended.status_code == 200, ended.text

    # ReferredAcrossDistrict is on Kafka, naming both districts, keyed by the case.
    records = consume(kafka_bootstrap, referral.topic, at_least=5)
    across = [
        catalogue.decode(x.value)
        for x in records
        if x.headers["event_type"] == b"ReferredAcrossDistrict"
    ]
    assert len(across) == 1
    assert (across[0].record["from_district"], across[0].record["to_district"]) == (
        "nordost",
        "hisingen",
    )
    assert {x.key for x in records} == {case.encode()}
    actors = [catalogue.decode(x.value).record["metadata"]["actor"] for x in records]
    assert actors == ["cw-9", "cw-9", "staff-9", "staff-9", "staff-9"]  # tokens' subjects

    def scheduled() -> list[str]:
        return [
            e.payload["kind"]
            for e in followup.store.read_stream(case)
            if e.event_type == "FollowUpScheduled"
        ]

    # A same-day intervention: no interview (that needs more than 7 days), ASI at 6 and 12.
    wait_for(lambda: len(scheduled()) == 2, 60, "two follow-ups to be scheduled")
    assert sorted(scheduled()) == ["ASI_12_MONTHS", "ASI_6_MONTHS"]
    listed = http.get(f"{followup.base_url}/cases/{case}/followups")
    assert listed.status_code == 200 and len(listed.json()["followups"]) == 2

    # Every referral event delivered again: nothing more is scheduled.
    seen_before = followup_inbox.stats.duplicates
    assert republish(referral.store, kafka_bootstrap) == 5
    wait_for(
        lambda: followup_inbox.stats.duplicates >= seen_before + 5,
        60,
        "the re-delivered referral events to reach the follow-up service",
    )
    assert len(scheduled()) == 2
    assert followup.store.verify() == []
