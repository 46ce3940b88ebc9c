"""Read models on a real PostgreSQL: order-independent, idempotent, replayable.

Events are built as decoded `Incoming` objects (no Kafka needed); arrival orders and batch
splits come from fixed seeds.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from likvard.inbox import Incoming
from services.projections import readmodels

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
TOPICS = {
    "intake": "likvard.intake.v1",
    "referral": "likvard.referral.v1",
    "followup": "likvard.followup.v1",
}
C1, C2 = "case-0001", "case-0002"
OFFSETS: dict[str, int] = {}


class Stream:
    """Builds one service's stream of one case: versions count up, offsets per topic."""

    def __init__(self, service: str, case_id: str, district: str) -> None:
        self.topic, self.case_id, self.district, self.version = (
            TOPICS[service],
            case_id,
            district,
            0,
        )

    def __call__(self, event_type: str, days: float, **data: Any) -> Incoming:
        self.version += 1
        offset = OFFSETS.get(self.topic, 0)
        OFFSETS[self.topic] = offset + 1
        event_id = str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"{self.topic}/{self.case_id}/{self.version}")
        )
        at = T0 + timedelta(days=days)
        metadata = {
            "event_id": event_id,
            "event_type": event_type,
            "case_id": self.case_id,
            "stream_version": self.version,
            "occurred_at": at,
            "recorded_at": at + timedelta(seconds=2),
            "producer": f"likvard-{self.topic.split('.')[1]}",
            "district": self.district,
            "actor": "cw-1",
            "correlation_id": "c",
            "causation_id": None,
            "traceparent": None,
        }
        return Incoming(self.topic, 0, offset, event_id, event_type, self.case_id, metadata, data)


def _uuid(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


def history() -> list[Incoming]:
    """Two cases across the three topics, each topic's events in stream order."""
    i1, r1, f1 = (Stream(s, C1, "centrum") for s in ("intake", "referral", "followup"))
    i2, r2, f2 = (Stream(s, C2, "sydvast") for s in ("intake", "referral", "followup"))
    intake = {
        "person": "ab" * 32,
        "district": "centrum",
        "substances": ["ALCOHOL", "PHARMACEUTICALS"],
        "referral_source": "HEALTHCARE",
        "children_in_household": "YES",
        "birth_year": 1979,
    }
    return [
        i1("IntakeRegistered", 0, **intake),
        i1("AssessmentCompleted", 1, assessment_id=_uuid(1), instrument="AUDIT",
           scores=[{"scale": "total", "value": 19}], need_level="MODERATE"),
        r1("ReferralRequested", 2, referral_id=_uuid(10), unit_id="unit-9",
           intervention_code="MAT-ALC", person_district="centrum", unit_district="hisingen",
           recipient_kind="CITY_SOCIAL_SERVICES", consent_id=None, consent_override=None),
        r1("ReferredAcrossDistrict", 2.1, referral_id=_uuid(10), unit_id="unit-9",
           from_district="centrum", to_district="hisingen"),
        r1("ReferralAccepted", 3, referral_id=_uuid(10), planned_start=None),
        f1("ChildrenInHouseholdRecorded", 4, number_of_children=2, youngest_age=7),
        f1("FamilyMemberEngaged", 4.2, member_id=_uuid(20), relation="CHILD", is_child=True,
           support_offered=["CHILD_SUPPORT_GROUP"], accepted=True),
        i1("CaseTransferred", 5, from_district="centrum", to_district="nordost",
           reason="PERSON_MOVED"),
        r1("InterventionStarted", 7, intervention_id=_uuid(30), referral_id=_uuid(10),
           intervention_code="MAT-ALC", unit_id="unit-9", guideline_priority=1),
        i1("AssessmentCompleted", 10, assessment_id=_uuid(2), instrument="ASI",
           scores=[{"scale": "alcohol", "value": 5}], need_level="HIGH"),
        r1("ReferralRequested", 12, referral_id=_uuid(11), unit_id="unit-3",
           intervention_code="RELAPSE-PREV", person_district="nordost",
           unit_district="nordost", recipient_kind="NON_PROFIT", consent_id=_uuid(40),
           consent_override=None),
        r1("InterventionEnded", 40, intervention_id=_uuid(30), referral_id=_uuid(10),
           intervention_code="MAT-ALC", started_at=T0 + timedelta(days=7),
           outcome="COMPLETED_AS_PLANNED"),
        f1("FollowUpScheduled", 41, followup_id=_uuid(50), kind="POST_INTERVENTION_INTERVIEW",
           due_on=(T0 + timedelta(days=70)).date(), intervention_id=_uuid(30),
           referral_id=_uuid(10), district="nordost"),
        i1("CaseClosed", 60, reason="GOALS_REACHED"),
        f1("FollowUpCompleted", 65, followup_id=_uuid(50), kind="POST_INTERVENTION_INTERVIEW",
           days_of_use_last_30=0, housing="OWN_HOME", occupation="EMPLOYED",
           self_rated_health=4, goals_reached="YES", situation_improved="BETTER"),
        i1("CaseReopened", 90, reason="RELAPSE"),
        i2("IntakeRegistered", 1, **{**intake, "person": "cd" * 32, "district": "sydvast",
           "substances": ["GAMBLING"], "referral_source": "SELF",
           "children_in_household": "NO"}),
        i2("AssessmentCompleted", 2, assessment_id=_uuid(3), instrument="PGSI",
           scores=[{"scale": "total", "value": 12}], need_level="LOW"),
        r2("ReferralRequested", 3, referral_id=_uuid(12), unit_id="unit-5",
           intervention_code="CBT-GAMBLING", person_district="sydvast",
           unit_district="sydvast", recipient_kind="CITY_SOCIAL_SERVICES", consent_id=None,
           consent_override=None),
        f2("FollowUpScheduled", 4, followup_id=_uuid(51), kind="OTHER",
           due_on=(T0 + timedelta(days=30)).date(), intervention_id=None, referral_id=None,
           district="sydvast"),
        f2("FollowUpMissed", 31, followup_id=_uuid(51), kind="OTHER", reason="NO_CONTACT"),
    ]  # fmt: skip


EVENTS = history()


def project(database_url: str, schema: str, batches: Sequence[Sequence[Incoming]]) -> list[int]:
    """Migrate and apply each batch in its own transaction; the counts of new events."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, schema)
        counts = []
        for batch in batches:
            with conn.transaction():
                counts.append(readmodels.apply(conn, schema, batch))
        return counts


def sums(database_url: str, schema: str) -> dict[str, str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return readmodels.checksum(conn, schema)


def facts(database_url: str, schema: str, case_id: str) -> dict[str, Any]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = readmodels.case_facts(conn, schema, case_id)
    assert row is not None
    return row


def test_in_order_case_facts(database_url: str, schema: str) -> None:
    assert project(database_url, schema, [EVENTS]) == [len(EVENTS)]
    c1 = facts(database_url, schema, C1)
    assert c1["person"] == "ab" * 32
    assert (c1["district_at_intake"], c1["district_now"]) == ("centrum", "nordost")
    assert c1["district_now_version"] == 3
    assert c1["need_level"] == "HIGH"
    assert c1["need_level_at"] == T0 + timedelta(days=10)
    assert c1["substances"] == ["ALCOHOL", "PHARMACEUTICALS"]
    assert (c1["referral_source"], c1["children_in_household"]) == ("HEALTHCARE", "YES")
    assert c1["intake_at"] == T0
    assert c1["first_referral_at"] == T0 + timedelta(days=2)
    assert c1["first_intervention_at"] == T0 + timedelta(days=7)
    assert (c1["referrals"], c1["referrals_across"], c1["referrals_accepted"]) == (2, 1, 1)
    assert (c1["interventions"], c1["interventions_guideline_top"]) == (1, 1)
    assert c1["interventions_ended"] == 1
    assert (c1["family_members_engaged"], c1["child_engaged"], c1["children_recorded"]) == (
        1,
        True,
        2,
    )
    assert (c1["followups_scheduled"], c1["followups_completed"], c1["followups_missed"]) == (
        1,
        1,
        0,
    )
    assert (c1["goals_reached_yes"], c1["situation_improved_better"]) == (1, 1)
    assert (c1["status"], c1["closed_at"], c1["reopened"]) == ("open", T0 + timedelta(days=60), 1)
    assert c1["events"] == 16
    c2 = facts(database_url, schema, C2)
    assert (c2["district_at_intake"], c2["district_now"], c2["need_level"]) == (
        "sydvast",
        "sydvast",
        "LOW",
    )
    assert (c2["referrals"], c2["followups_scheduled"], c2["followups_missed"]) == (1, 1, 1)
    assert (c2["child_engaged"], c2["interventions"], c2["first_intervention_at"]) == (
        False,
        0,
        None,
    )


def test_timeline_in_occurrence_order(database_url: str, schema: str) -> None:
    project(database_url, schema, [list(reversed(EVENTS))])
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = readmodels.timeline(conn, schema, C1)
    expected = sorted(
        (e for e in EVENTS if e.case_id == C1), key=lambda e: e.metadata["occurred_at"]
    )
    assert [r["event_id"] for r in rows] == [uuid.UUID(e.event_id) for e in expected]
    first = rows[0]
    assert (first["event_type"], first["topic"], first["stream_version"]) == (
        "IntakeRegistered",
        "likvard.intake.v1",
        1,
    )
    assert first["payload"]["district"] == "centrum"
    ended = next(r for r in rows if r["event_type"] == "InterventionEnded")
    assert ended["payload"]["started_at"] == (T0 + timedelta(days=7)).isoformat()


def test_any_order_split_and_duplicates_same_checksums(
    database_url: str, schema: str, new_schema: Callable[[str], str]
) -> None:
    project(database_url, schema, [EVENTS])
    reference = sums(database_url, schema)
    for seed in (1, 2, 3, 4, 5):
        rng = random.Random(seed)
        shuffled = rng.sample(EVENTS, len(EVENTS))
        cuts = sorted(rng.sample(range(1, len(shuffled)), rng.randint(1, 6)))
        batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]
        # re-delivery: some events come again, in a later batch and within the same one
        batches.append(rng.sample(EVENTS, 6) + rng.sample(EVENTS, 3))
        batches[0] = batches[0] + batches[0][:1]
        target = new_schema("rm")
        counts = project(database_url, target, batches)
        assert sum(counts) == len(EVENTS), seed
        assert sums(database_url, target) == reference, seed


def test_referral_before_intake_ends_in_same_facts(
    database_url: str, schema: str, new_schema: Callable[[str], str]
) -> None:
    project(database_url, schema, [EVENTS])
    by_topic = {t: [e for e in EVENTS if e.topic == t] for t in TOPICS.values()}
    early = new_schema("rm")
    project(database_url, early, [by_topic[TOPICS["referral"]]])
    c1 = facts(database_url, early, C1)
    assert (c1["person"], c1["district_at_intake"], c1["district_now"]) == (None, None, None)
    assert (c1["referrals"], c1["first_referral_at"]) == (2, T0 + timedelta(days=2))
    project(database_url, early, [by_topic[TOPICS["followup"]], by_topic[TOPICS["intake"]]])
    assert facts(database_url, early, C1) == facts(database_url, schema, C1)
    assert sums(database_url, early) == sums(database_url, schema)


def test_reapplied_batch_changes_nothing(database_url: str, schema: str) -> None:
    half = EVENTS[: len(EVENTS) // 2]
    assert project(database_url, schema, [half]) == [len(half)]
    before = sums(database_url, schema)
    assert project(database_url, schema, [half, half[:3]]) == [0, 0]
    assert sums(database_url, schema) == before
    project(database_url, schema, [EVENTS])
    assert sums(database_url, schema) != before


# --- the care chain: gender, investigation, first visit, SIP, user assessments ---------
C3 = "case-0003"


def care_chain() -> list[Incoming]:
    """One case through the care chain (intake and follow-up topics), and a v2-style
    registration of another case without a gender."""
    i3, f3 = Stream("intake", C3, "hisingen"), Stream("followup", C3, "hisingen")
    i4 = Stream("intake", "case-0004", "nordost")
    intake = {
        "person": "ef" * 32,
        "district": "hisingen",
        "substances": ["NARCOTICS"],
        "referral_source": "SELF",
        "children_in_household": "NO",
        "birth_year": None,
        "age_band": "25-34",
        "archive_sample": False,
    }
    ratings = {
        "contact_easy": "YES",
        "clear_information": "PARTLY",
        "felt_understood": "YES",
        "influence": "NO_ANSWER",
        "whole_situation": "NO",
        "situation_improved": "YES",
    }
    return [
        i3("IntakeRegistered", 0, **intake, gender="WOMAN"),
        i3("InvestigationOpened", 1, investigation_id=_uuid(60), basis="APPLICATION"),
        i3("FirstVisitHeld", 3, visit_id=_uuid(61)),
        i3("InvestigationDecided", 20, investigation_id=_uuid(60), decision="PARTLY_GRANTED",
           intervention_kinds=["OUTPATIENT"]),
        i3("InvestigationOpened", 30, investigation_id=_uuid(62), basis="REPORT_OF_CONCERN"),
        i3("InvestigationDecided", 45, investigation_id=_uuid(62), decision="REFUSED",
           intervention_kinds=[]),
        i3("ConsentRecorded", 46, consent_id=_uuid(63), recipients=["HEALTHCARE"],
           valid_until=None),
        i3("CoordinatedPlanAgreed", 47, plan_id=_uuid(64), parties=["SOCIAL_SERVICES",
           "PSYCHIATRY"], lead="PSYCHIATRY", follow_up_on=(T0 + timedelta(days=90)).date(),
           consent_id=_uuid(63)),
        i3("CoordinatedPlanAgreed", 50, plan_id=_uuid(65), parties=["SOCIAL_SERVICES",
           "PRIMARY_CARE"], lead="SOCIAL_SERVICES",
           follow_up_on=(T0 + timedelta(days=60)).date(), consent_id=_uuid(63)),
        i3("CoordinatedPlanFollowedUp", 88, plan_id=_uuid(65)),
        i3("CoordinatedPlanFollowedUp", 92, plan_id=_uuid(64)),
        f3("UserAssessmentRecorded", 95, assessment_id=_uuid(66), **ratings),
        f3("UserAssessmentRecorded", 180, assessment_id=_uuid(67),
           **{**ratings, "influence": "YES", "clear_information": "NO_ANSWER"}),
        i4("IntakeRegistered", 2, **{**intake, "person": "12" * 32, "district": "nordost"}),
    ]  # fmt: skip


CARE_CHAIN = care_chain()


def test_the_care_chain_facts(database_url: str, schema: str) -> None:
    assert project(database_url, schema, [CARE_CHAIN]) == [len(CARE_CHAIN)]
    c3 = facts(database_url, schema, C3)
    assert c3["gender"] == "WOMAN"
    # The first opening and the first decision; the decision of the latest (day 45).
    assert c3["investigation_opened_at"] == T0 + timedelta(days=1)
    assert c3["investigation_decided_at"] == T0 + timedelta(days=20)
    assert (c3["investigation_decision"], c3["investigation_decision_at"]) == (
        "REFUSED",
        T0 + timedelta(days=45),
    )
    assert c3["first_visit_at"] == T0 + timedelta(days=3)
    # The first plan agreed (day 47) and the first follow-up of any plan (day 88).
    assert (c3["sip_agreed_at"], c3["sip_followed_up_at"]) == (
        T0 + timedelta(days=47),
        T0 + timedelta(days=88),
    )
    # Two assessments: contact YES+YES; information PARTLY + NO_ANSWER (1 answered, 0 yes);
    # understood YES+YES; influence NO_ANSWER + YES (1 answered, 1 yes); whole NO+NO (2
    # answered, 0 yes); improved YES+YES.
    assert c3["user_assessments"] == 2
    assert {i: (c3[f"ua_{i}_yes"], c3[f"ua_{i}_answered"]) for i in readmodels.UA_ITEMS} == {
        "contact_easy": (2, 2),
        "clear_information": (0, 1),
        "felt_understood": (2, 2),
        "influence": (1, 1),
        "whole_situation": (0, 2),
        "situation_improved": (2, 2),
    }
    assert c3["events"] == len(CARE_CHAIN) - 1
    # A registration decoded from v1 or v2 (no gender written) is NOT_STATED.
    c4 = facts(database_url, schema, "case-0004")
    assert (c4["gender"], c4["investigation_opened_at"], c4["user_assessments"]) == (
        "NOT_STATED",
        None,
        0,
    )
    assert c4["ua_influence_answered"] == 0


def test_the_care_chain_folds_the_same_in_any_order_and_split(
    database_url: str, schema: str, new_schema: Callable[[str], str]
) -> None:
    everything = EVENTS + CARE_CHAIN
    project(database_url, schema, [everything])
    reference = sums(database_url, schema)
    for seed in (7, 8, 9):
        rng = random.Random(seed)
        shuffled = rng.sample(everything, len(everything))
        cut = rng.randint(1, len(shuffled) - 1)
        target = new_schema("rm")
        counts = project(
            database_url, target, [shuffled[:cut], shuffled[cut:], rng.sample(CARE_CHAIN, 4)]
        )
        assert sum(counts) == len(everything), seed
        assert sums(database_url, target) == reference, seed
        assert facts(database_url, target, C3) == facts(database_url, schema, C3)


def test_migrate_adds_the_care_chain_columns_to_an_older_table_in_the_fresh_order(
    database_url: str, schema: str, new_schema: Callable[[str], str]
) -> None:
    added = [c.name for c in readmodels.FACTS[readmodels.FACT_NAMES.index("gender") - 1 :]]
    assert added[0] == "gender" and "ua_situation_improved_answered" in added
    project(database_url, schema, [EVENTS])
    with psycopg.connect(database_url, autocommit=True) as conn:
        drops = ", ".join(f"DROP COLUMN {name}" for name in added)
        conn.execute(f"ALTER TABLE {schema}.case_facts {drops}")  # as an older version made it
        with conn.transaction():
            readmodels.migrate(conn, schema)
            readmodels.migrate(conn, schema)  # idempotent
        with conn.transaction():
            readmodels.apply(conn, schema, CARE_CHAIN)
    fresh = new_schema("rm")
    project(database_url, fresh, [EVENTS, CARE_CHAIN])
    assert list(facts(database_url, schema, C3)) == list(facts(database_url, fresh, C3))
    assert facts(database_url, schema, C3) == facts(database_url, fresh, C3)
    assert facts(database_url, schema, C3)["ua_contact_easy_yes"] == 2
    # The cases projected before the columns existed have no gender until a replay (the
    # rest of their facts stand).
    migrated, replayed = facts(database_url, schema, C1), facts(database_url, fresh, C1)
    assert (migrated["gender"], replayed["gender"]) == (None, "NOT_STATED")
    assert {**migrated, "gender": "NOT_STATED"} == replayed
