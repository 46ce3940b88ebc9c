"""District systems' follow-up events: given the case's follow-up stream and what the
service knows of the case, when this district event is ingested, then these events (or
this refusal, or nothing for a repeat). The follow-up decider judges them with the rules of
the HTTP API, and `check_matches` holds the district system to the kind of the follow-up
it completes or misses. Pure: no database, no Kafka."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from likvard.districts import DistrictRegistry
from likvard.inbox import Incoming
from likvard.ingest import Rejected, StreamView
from likvard.known_cases import KnownCase
from services.followup import domain as d
from services.followup.domain import DomainEvent
from services.followup.ingest import NEEDS_KNOWN_CASE, FollowUpRules
from tests.support import district_incoming, judged, refused_by

RULES = FollowUpRules(DistrictRegistry.load().is_known)

CASE = "6f1c2a9e-4b7d-4c1e-9a3f-0d2b8e5c7a10"
EVENT_ID = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"
MEMBER = "4f1c8d0e-5061-4273-8e4f-4a5b6c7d8e9f"
FOLLOWUP = "6b3e0f2a-7283-4495-8a61-6c7d8e9f0a1b"
OTHER_FOLLOWUP = "7c4f1a3b-8394-45a6-9b72-7d8e9f0a1b2c"
INTERVENTION = "8d5a2b4c-94a5-46b7-8c83-8e9f0a1b2c3d"
REFERRAL = "9e6b3c5d-a5b6-47c8-9d94-9f0a1b2c3d4e"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
T1 = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)
DUE = date(2026, 4, 8)

KNOWN = KnownCase(CASE, "nordost", "open", 3)
CLOSED = KnownCase(CASE, "nordost", "closed", 5)
UNKNOWN = KnownCase(CASE)  # a row without the case's registration (status "unknown")


# --- payloads, as fastavro decodes them ---------------------------------------------
def children(number: int = 2, youngest: int | None = 4) -> dict[str, Any]:
    return {"number_of_children": number, "youngest_age": youngest}


def engagement(
    relation: str = "CHILD", is_child: bool = True, accepted: bool = True
) -> dict[str, Any]:
    return {
        "member_id": MEMBER,
        "relation": relation,
        "is_child": is_child,
        "support_offered": ["CHILD_SUPPORT_GROUP", "INFORMATION"],
        "accepted": accepted,
    }


def schedule(
    followup_id: str = FOLLOWUP,
    kind: str = "POST_INTERVENTION_INTERVIEW",
    due_on: date = DUE,
    district: str = "nordost",
) -> dict[str, Any]:
    return {
        "followup_id": followup_id,
        "kind": kind,
        "due_on": due_on,
        "intervention_id": INTERVENTION,
        "referral_id": REFERRAL,
        "district": district,
    }


def completion(
    followup_id: str = FOLLOWUP, kind: str = "POST_INTERVENTION_INTERVIEW"
) -> dict[str, Any]:
    return {
        "followup_id": followup_id,
        "kind": kind,
        "days_of_use_last_30": 2,
        "housing": "OWN_HOME",
        "occupation": "EMPLOYED",
        "self_rated_health": 4,
        "goals_reached": "PARTLY",
        "situation_improved": "BETTER",
    }


def missing(
    followup_id: str = FOLLOWUP, kind: str = "POST_INTERVENTION_INTERVIEW"
) -> dict[str, Any]:
    return {"followup_id": followup_id, "kind": kind, "reason": "NO_CONTACT"}


# --- given, when, then ----------------------------------------------------------------
def rated(**ratings: str) -> dict[str, Any]:
    return {
        "assessment_id": MEMBER,
        **dict.fromkeys(d.USER_ASSESSMENT_ITEMS, "YES"),
        "influence": "PARTLY",
        **ratings,
    }


def scheduled(district: str = "nordost", **data: Any) -> DomainEvent:
    return DomainEvent("FollowUpScheduled", schedule(district=district, **data), T0)


def completed() -> DomainEvent:
    return DomainEvent("FollowUpCompleted", completion(), T0 + timedelta(days=1))


def given(*events: DomainEvent) -> StreamView:
    """The case's follow-up stream as the ingest processor shows it to the rules."""
    return StreamView(d.fold(events), len(events), CASE if events else None)


def district_event(event_type: str, data: dict[str, Any], at: datetime = T1) -> Incoming:
    """A district system's event as `open_envelope` hands it over."""
    return district_incoming(event_type, data, case_id=CASE, at=at, event_id=EVENT_ID)


def ingested(
    incoming: Incoming, stream: StreamView, case: KnownCase | None = KNOWN
) -> list[DomainEvent]:
    return judged(RULES, incoming, stream, case)


def refusal(incoming: Incoming, stream: StreamView, case: KnownCase | None = KNOWN) -> Rejected:
    return refused_by(RULES, incoming, stream, case)


def itself(incoming: Incoming) -> list[DomainEvent]:
    return [DomainEvent(incoming.event_type, incoming.data, incoming.metadata["occurred_at"])]


# --- accepted as sent -----------------------------------------------------------------
@dataclass(frozen=True)
class Accepted:
    history: tuple[DomainEvent, ...]
    event_type: str
    data: dict[str, Any]
    case: KnownCase | None = KNOWN


ACCEPTED = [
    Accepted((), "ChildrenInHouseholdRecorded", children()),
    Accepted((), "ChildrenInHouseholdRecorded", children(0, None)),
    # Family work and follow-up go on after a case is closed.
    Accepted((), "ChildrenInHouseholdRecorded", children(), case=CLOSED),
    Accepted((), "FamilyMemberEngaged", engagement()),
    Accepted((), "FamilyMemberEngaged", engagement("PARTNER", is_child=False)),
    Accepted(
        (DomainEvent("FamilyMemberEngaged", engagement(accepted=False), T0),),
        "FamilyMemberEngaged",
        engagement(accepted=True),
    ),
    Accepted((), "FollowUpScheduled", schedule()),
    Accepted((), "FollowUpScheduled", schedule(kind="ASI_6_MONTHS", district="hisingen")),
    Accepted((), "FollowUpScheduled", schedule(due_on=T1.date())),
    Accepted((scheduled(),), "FollowUpCompleted", completion()),
    Accepted((scheduled(),), "FollowUpMissed", missing()),
    # Completing or missing needs the follow-up, not the known case.
    Accepted((scheduled(),), "FollowUpCompleted", completion(), case=None),
    Accepted((scheduled(),), "FollowUpMissed", missing(), case=UNKNOWN),
    Accepted((), "UserAssessmentRecorded", rated()),
    Accepted((scheduled(), completed()), "UserAssessmentRecorded", rated(contact_easy="NO_ANSWER")),
    Accepted((), "UserAssessmentRecorded", rated(), case=CLOSED),
]


@pytest.mark.parametrize(
    "case", ACCEPTED, ids=[f"{n}-{a.event_type}" for n, a in enumerate(ACCEPTED)]
)
def test_a_district_event_that_keeps_the_rules_is_stored_as_sent(case: Accepted) -> None:
    incoming = district_event(case.event_type, case.data)
    assert ingested(incoming, given(*case.history), case.case) == itself(incoming)


def test_every_follow_up_event_type_can_be_ingested() -> None:
    assert {a.event_type for a in ACCEPTED} == set(d.EVENT_TYPES)


def test_a_repeated_scheduling_stores_nothing() -> None:
    # The same follow-up again (a re-sent record under a new event id): a duplicate.
    incoming = district_event("FollowUpScheduled", schedule())
    assert ingested(incoming, given(scheduled())) == []


def test_a_scheduling_repeated_after_the_follow_up_was_done_stores_nothing() -> None:
    # Long after, with a due date now in the past: still a repeat, not an error.
    incoming = district_event("FollowUpScheduled", schedule(due_on=date(2026, 3, 3)))
    history = (scheduled(due_on=date(2026, 3, 3)), completed())

    assert ingested(incoming, given(*history)) == []
    assert given(*history).state.followups[FOLLOWUP].status == "completed"


def test_a_completed_follow_up_is_done() -> None:
    history = [scheduled()]
    incoming = district_event("FollowUpCompleted", completion())

    state = d.fold([*history, *ingested(incoming, given(*history))])

    assert state.followups[FOLLOWUP].status == "completed"
    assert state.due(date(2026, 12, 31)) == {}


# --- refused --------------------------------------------------------------------------
@dataclass(frozen=True)
class Refused:
    history: tuple[DomainEvent, ...]
    event_type: str
    data: dict[str, Any]
    code: str
    case: KnownCase | None = KNOWN


REFUSED = [
    # The family and scheduling need a case the service knows from intake.
    *(
        Refused((), event_type, data, "case-not-known", case)
        for event_type, data in [
            ("ChildrenInHouseholdRecorded", children()),
            ("FamilyMemberEngaged", engagement()),
            ("FollowUpScheduled", schedule()),
            ("UserAssessmentRecorded", rated()),
        ]
        for case in (None, UNKNOWN)
    ),
    # Even a repeated scheduling, while the case is not known.
    Refused((scheduled(),), "FollowUpScheduled", schedule(), "case-not-known", None),
    # Completing or missing needs a scheduled follow-up.
    Refused((), "FollowUpCompleted", completion(), "followup-not-found"),
    Refused((scheduled(),), "FollowUpCompleted", completion(OTHER_FOLLOWUP), "followup-not-found"),
    Refused((), "FollowUpMissed", missing(), "followup-not-found"),
    Refused(
        (scheduled(), completed()), "FollowUpCompleted", completion(), "followup-already-completed"
    ),
    Refused((scheduled(), completed()), "FollowUpMissed", missing(), "followup-already-completed"),
    Refused(
        (scheduled(), DomainEvent("FollowUpMissed", missing(), T0)),
        "FollowUpCompleted",
        completion(),
        "followup-already-missed",
    ),
    # The kind is the scheduled follow-up's, not the district system's.
    Refused(
        (scheduled(),),
        "FollowUpCompleted",
        completion(kind="ASI_12_MONTHS"),
        "derived-fields-differ",
    ),
    Refused((scheduled(),), "FollowUpMissed", missing(kind="OTHER"), "derived-fields-differ"),
    # The decider's rules, as for the HTTP API.
    Refused((), "ChildrenInHouseholdRecorded", children(21, 4), "number-of-children-out-of-range"),
    Refused((), "ChildrenInHouseholdRecorded", children(0, 4), "youngest-age-without-children"),
    Refused((), "ChildrenInHouseholdRecorded", children(1, 18), "youngest-age-out-of-range"),
    Refused(
        (), "FamilyMemberEngaged", engagement("PARENT", is_child=True), "relation-cannot-be-a-child"
    ),
    Refused(
        (DomainEvent("FamilyMemberEngaged", engagement(), T0),),
        "FamilyMemberEngaged",
        engagement(),
        "family-member-already-engaged",
    ),
    Refused(
        (DomainEvent("FamilyMemberEngaged", engagement(), T0),),
        "FamilyMemberEngaged",
        engagement("SIBLING"),
        "family-member-relation-changed",
    ),
    Refused((), "FollowUpScheduled", schedule(due_on=date(2026, 3, 8)), "due-date-in-past"),
    Refused((), "FollowUpScheduled", schedule(kind="ASI_24_MONTHS"), "unknown-followup-kind"),
    Refused((), "FollowUpScheduled", schedule(district=" "), "district-missing"),
    Refused(
        (scheduled(),),
        "FollowUpCompleted",
        {**completion(), "self_rated_health": 6},
        "self-rated-health-out-of-range",
    ),
    Refused((), "UserAssessmentRecorded", rated(felt_understood="MOSTLY"), "unknown-rating"),
    Refused(
        (DomainEvent("UserAssessmentRecorded", rated(), T0),),
        "UserAssessmentRecorded",
        rated(),
        "user-assessment-id-used",
    ),
]


@pytest.mark.parametrize("case", REFUSED, ids=[f"{r.code}-{r.event_type}" for r in REFUSED])
def test_a_district_event_that_breaks_a_rule_is_refused(case: Refused) -> None:
    incoming = district_event(case.event_type, case.data)
    rejected = refusal(incoming, given(*case.history), case.case)
    assert (rejected.stage, rejected.code) == ("rule", case.code)


def test_a_mismatched_kind_is_named_not_quoted() -> None:
    incoming = district_event("FollowUpCompleted", completion(kind="ASI_12_MONTHS"))
    rejected = refusal(incoming, given(scheduled()))
    assert "kind" in rejected.reason
    assert "ASI_12_MONTHS" not in rejected.reason


def test_an_unknown_case_is_one_to_retry_later() -> None:
    rejected = refusal(district_event("FollowUpScheduled", schedule()), given(), None)
    assert "retry" in rejected.reason


def test_a_follow_up_scheduled_in_an_unknown_district_is_refused() -> None:
    incoming = district_event("FollowUpScheduled", schedule(district="atlantis"))
    rejected = refusal(incoming, given())
    assert rejected.stage == "rule" and rejected.code == "unknown-district"
    assert "atlantis" not in rejected.reason


# --- the rules' wiring ------------------------------------------------------------------
def test_the_stream_is_the_case_and_every_event_looks_up_the_case() -> None:
    assert RULES.service == "followup"
    for event_type, data in [
        ("ChildrenInHouseholdRecorded", children()),
        ("FollowUpScheduled", schedule()),
        ("FollowUpCompleted", completion()),
    ]:
        incoming = district_event(event_type, data)
        assert RULES.stream_id(incoming) == CASE
        assert RULES.needs_case(incoming) is True
    assert {
        "ChildrenInHouseholdRecorded",
        "FamilyMemberEngaged",
        "FollowUpScheduled",
        "UserAssessmentRecorded",
    } == NEEDS_KNOWN_CASE


def district_after(incoming: Incoming, stream: StreamView, case: KnownCase | None) -> str | None:
    """The district the processor puts in the stored event's metadata (asked after the
    event is folded in, as the processor does)."""
    decided = ingested(incoming, stream, case)
    state = stream.state
    for event in decided:
        state = d.evolve(state, event)
    return RULES.district(incoming, state, case)


def test_a_scheduled_follow_up_is_in_the_district_it_names() -> None:
    moved = KnownCase(CASE, "centrum", "open", 6)
    incoming = district_event("FollowUpScheduled", schedule(district="hisingen"))
    assert district_after(incoming, given(), moved) == "hisingen"


def test_a_completed_follow_up_is_in_the_cases_district_now() -> None:
    moved = KnownCase(CASE, "centrum", "open", 6)
    incoming = district_event("FollowUpCompleted", completion())
    assert district_after(incoming, given(scheduled("nordost")), moved) == "centrum"


@pytest.mark.parametrize("case", [None, UNKNOWN], ids=["no-row", "unknown-status"])
def test_without_a_known_district_a_follow_up_is_in_the_district_it_was_scheduled_in(
    case: KnownCase | None,
) -> None:
    incoming = district_event("FollowUpMissed", missing())
    assert district_after(incoming, given(scheduled("sydvast")), case) == "sydvast"


def test_family_work_is_in_the_cases_district() -> None:
    incoming = district_event("FamilyMemberEngaged", engagement())
    assert district_after(incoming, given(scheduled("sydvast")), KNOWN) == "nordost"


def test_without_any_district_the_services_default_applies() -> None:
    incoming = district_event("ChildrenInHouseholdRecorded", children())
    state = given(scheduled("sydvast")).state
    assert RULES.district(incoming, state, None) is None
