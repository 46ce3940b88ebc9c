"""The follow-up decider: one case's family engagement and follow-ups, with no I/O.

The stream id is the case id. `decide(command, state)` says which events a command leads
to, or raises a `DomainError`; `evolve(state, event)` folds one event into the state. Event
payloads are exactly the Avro payloads of `schemas/followup/` (without metadata), so an
event decided here equals the same event decoded from Kafka, and district systems' events
fold the same way. Symbols are checked here as well as in the HTTP layer because district
systems produce events without going through it.

Scheduling is idempotent by `followup_id`: scheduling an id the case already has yields no
events (not an error). The process manager (`services.followup.scheduling`) derives the id
from the intervention and the kind, so a re-delivered InterventionEnded schedules nothing
new: exactly-once effect on at-least-once delivery.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any, Literal, assert_never, get_args

from likvard.domain import (
    CITY_TZ as CITY_TZ,
    DomainError as DomainError,
    DomainEvent as DomainEvent,
    RuleViolation as RuleViolation,
    local_date as local_date,
    require_symbol,
    require_uuid,
)

# --- Avro enum symbols ---------------------------------------------------------------
Relation = Literal["CHILD", "PARTNER", "PARENT", "SIBLING", "OTHER"]
Support = Literal[
    "INFORMATION",
    "COUNSELLING",
    "CRAFT",
    "SUPPORT_GROUP",
    "CHILD_SUPPORT_GROUP",
    "REFERRAL_ELSEWHERE",
    "OTHER",
]
FollowUpKind = Literal["POST_INTERVENTION_INTERVIEW", "ASI_6_MONTHS", "ASI_12_MONTHS", "OTHER"]
Housing = Literal["OWN_HOME", "SUPPORTED_HOUSING", "INSTITUTION", "HOMELESS", "OTHER", "UNKNOWN"]
Occupation = Literal[
    "EMPLOYED", "STUDYING", "UNEMPLOYED", "SICK_LEAVE_OR_PENSION", "OTHER", "UNKNOWN"
]
GoalsReached = Literal["YES", "PARTLY", "NO", "UNKNOWN"]
Improvement = Literal["BETTER", "SAME", "WORSE", "UNKNOWN"]
MissedReason = Literal["NO_CONTACT", "DECLINED", "MOVED", "DECEASED", "OTHER"]
Rating = Literal["YES", "PARTLY", "NO", "NO_ANSWER"]
FollowUpStatus = Literal["scheduled", "completed", "missed"]

RELATIONS: frozenset[str] = frozenset(get_args(Relation))
SUPPORTS: frozenset[str] = frozenset(get_args(Support))
FOLLOWUP_KINDS: frozenset[str] = frozenset(get_args(FollowUpKind))
HOUSING: frozenset[str] = frozenset(get_args(Housing))
OCCUPATIONS: frozenset[str] = frozenset(get_args(Occupation))
GOALS_REACHED: frozenset[str] = frozenset(get_args(GoalsReached))
IMPROVEMENTS: frozenset[str] = frozenset(get_args(Improvement))
MISSED_REASONS: frozenset[str] = frozenset(get_args(MissedReason))
RATINGS: frozenset[str] = frozenset(get_args(Rating))
USER_ASSESSMENT_ITEMS: tuple[str, ...] = (
    "contact_easy",
    "clear_information",
    "felt_understood",
    "influence",
    "whole_situation",
    "situation_improved",
)
"""The national user survey's items, in the contract's order (each rated on `Rating`)."""
RELATIONS_THAT_CAN_BE_A_CHILD: frozenset[str] = frozenset({"CHILD", "SIBLING", "OTHER"})
"""A partner or a parent of an adult is never a child; a person's child may be an adult."""

EVENT_TYPES: tuple[str, ...] = (
    "ChildrenInHouseholdRecorded",
    "FamilyMemberEngaged",
    "FollowUpScheduled",
    "FollowUpCompleted",
    "FollowUpMissed",
    "UserAssessmentRecorded",
)


MAX_CHILDREN = 20
MAX_CHILD_AGE = 17
MAX_DAYS_OF_USE = 30
HEALTH_RATINGS = range(1, 6)


# --- errors ----------------------------------------------------------------------------
class FollowUpNotFound(DomainError):
    """Completing or missing a follow-up the case never scheduled (HTTP 404)."""

    def __init__(self) -> None:
        super().__init__("followup-not-found", "No follow-up with this id is scheduled.")


# --- commands --------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordChildrenInHousehold:
    case_id: str
    occurred_at: datetime
    number_of_children: int
    youngest_age: int | None = None


@dataclass(frozen=True)
class EngageFamilyMember:
    case_id: str
    occurred_at: datetime
    member_id: str
    relation: str
    is_child: bool
    support_offered: tuple[str, ...]
    accepted: bool


@dataclass(frozen=True)
class ScheduleFollowUp:
    case_id: str
    occurred_at: datetime
    followup_id: str
    kind: str
    due_on: date
    intervention_id: str | None
    referral_id: str | None
    district: str


@dataclass(frozen=True)
class CompleteFollowUp:
    case_id: str
    occurred_at: datetime
    followup_id: str
    days_of_use_last_30: int | None
    housing: str
    occupation: str
    self_rated_health: int | None
    goals_reached: str
    situation_improved: str


@dataclass(frozen=True)
class MarkFollowUpMissed:
    case_id: str
    occurred_at: datetime
    followup_id: str
    reason: str


@dataclass(frozen=True)
class RecordUserAssessment:
    """The person's own rating on the national user-survey items (a fixed scale each)."""

    case_id: str
    occurred_at: datetime
    assessment_id: str
    contact_easy: str
    clear_information: str
    felt_understood: str
    influence: str
    whole_situation: str
    situation_improved: str


Command = (
    RecordChildrenInHousehold
    | EngageFamilyMember
    | ScheduleFollowUp
    | CompleteFollowUp
    | MarkFollowUpMissed
    | RecordUserAssessment
)


# --- events and state ------------------------------------------------------------------


@dataclass(frozen=True)
class FollowUp:
    """One follow-up of the case. `due_on` and `district` are None only when a district
    system reported a completed or missed follow-up whose scheduling this stream lacks."""

    kind: str
    due_on: date | None
    status: FollowUpStatus
    district: str | None


Engagement = tuple[str, str, frozenset[str], bool]
"""(member_id, relation, support offered, accepted): what makes an engagement a repeat."""


@dataclass(frozen=True)
class FollowUpState:
    """A case's follow-up stream folded from its events.

    `number_of_children` is None until recorded (the latest record by when it happened
    counts); `family_members` maps member_id -> relation; `followups` maps followup_id ->
    its kind, due date, status and district.
    """

    number_of_children: int | None = None
    youngest_age: int | None = None
    children_recorded_at: datetime | None = None
    family_members: Mapping[str, str] = field(default_factory=dict)
    engagements: frozenset[Engagement] = frozenset()
    child_engaged: bool = False
    followups: Mapping[str, FollowUp] = field(default_factory=dict)
    user_assessment_ids: frozenset[str] = frozenset()
    version: int = 0

    def due(self, on: date) -> dict[str, FollowUp]:
        """Follow-ups still scheduled (neither completed nor missed) and due on or before."""
        return {
            fid: f
            for fid, f in self.followups.items()
            if f.status == "scheduled" and f.due_on is not None and f.due_on <= on
        }


def initial_state() -> FollowUpState:
    return FollowUpState()


def evolve(state: FollowUpState, event: DomainEvent) -> FollowUpState:
    """Fold one event. Event types this version does not know are counted and skipped, so
    an older reader can still fold a stream that a newer producer extended."""
    d = event.data
    new = state
    match event.type:
        case "ChildrenInHouseholdRecorded":
            # Latest by when it happened: a district system may report an older one late.
            recorded_at = state.children_recorded_at
            if recorded_at is None or event.occurred_at >= recorded_at:
                new = replace(
                    state,
                    number_of_children=d["number_of_children"],
                    youngest_age=d.get("youngest_age"),
                    children_recorded_at=event.occurred_at,
                )
        case "FamilyMemberEngaged":
            member = d["member_id"]
            engagement = (member, d["relation"], frozenset(d["support_offered"]), d["accepted"])
            new = replace(
                state,
                family_members={member: d["relation"], **state.family_members},
                engagements=state.engagements | {engagement},
                child_engaged=state.child_engaged or bool(d["is_child"]),
            )
        case "FollowUpScheduled":
            fid = d["followup_id"]
            if fid not in state.followups:  # a repeat must not reset a done follow-up
                scheduled = FollowUp(d["kind"], d["due_on"], "scheduled", d["district"])
                new = replace(state, followups={**state.followups, fid: scheduled})
        case "FollowUpCompleted" | "FollowUpMissed":
            fid = d["followup_id"]
            status: FollowUpStatus = "completed" if event.type == "FollowUpCompleted" else "missed"
            before = state.followups.get(fid) or FollowUp(d["kind"], None, status, None)
            new = replace(state, followups={**state.followups, fid: replace(before, status=status)})
        case "UserAssessmentRecorded":
            ids = state.user_assessment_ids | {d["assessment_id"]}
            new = replace(state, user_assessment_ids=ids)
    return replace(new, version=state.version + 1)


def fold(events: Iterable[DomainEvent]) -> FollowUpState:
    state = initial_state()
    for event in events:
        state = evolve(state, event)
    return state


# --- decide ----------------------------------------------------------------------------
_EVENT_OF: Mapping[type, str] = {
    RecordChildrenInHousehold: "ChildrenInHouseholdRecorded",
    EngageFamilyMember: "FamilyMemberEngaged",
    ScheduleFollowUp: "FollowUpScheduled",
    CompleteFollowUp: "FollowUpCompleted",
    MarkFollowUpMissed: "FollowUpMissed",
    RecordUserAssessment: "UserAssessmentRecorded",
}


def decide(command: Command, state: FollowUpState) -> list[DomainEvent]:
    """The events this command leads to on this state; raises DomainError if refused.

    Scheduling a followup_id the case already has returns [] (idempotent)."""
    if command.occurred_at.tzinfo is None or command.occurred_at.utcoffset() is None:
        raise RuleViolation("occurred-at-naive", "The time of the command needs a time zone.")
    data: dict[str, Any] | None
    match command:
        case RecordChildrenInHousehold():
            data = _children(command)
        case EngageFamilyMember():
            data = _engage(command, state)
        case ScheduleFollowUp():
            data = _schedule(command, state)
        case CompleteFollowUp():
            data = _complete(command, state)
        case MarkFollowUpMissed():
            data = _missed(command, state)
        case RecordUserAssessment():
            data = _user_assessment(command, state)
        case _:
            assert_never(command)
    if data is None:
        return []
    return [DomainEvent(_EVENT_OF[type(command)], data, command.occurred_at)]


def _require_int_in(value: object, low: int, high: int, code: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RuleViolation(code, f"The {what} must be a whole number from {low} to {high}.")


def _children(c: RecordChildrenInHousehold) -> dict[str, Any]:
    _require_int_in(
        c.number_of_children,
        0,
        MAX_CHILDREN,
        "number-of-children-out-of-range",
        "number of children",
    )
    if c.youngest_age is not None:
        if c.number_of_children == 0:
            raise RuleViolation(
                "youngest-age-without-children",
                "The youngest child's age must be left out when there are no children.",
            )
        _require_int_in(
            c.youngest_age, 0, MAX_CHILD_AGE, "youngest-age-out-of-range", "youngest child's age"
        )
    return {"number_of_children": c.number_of_children, "youngest_age": c.youngest_age}


def _engage(c: EngageFamilyMember, state: FollowUpState) -> dict[str, Any]:
    """A member id names one person within the case: their relation is fixed once engaged.
    The same member may be engaged again (support offered again, or accepted this time);
    an engagement identical to an earlier one (same relation, same support offered, same
    answer) adds nothing and is refused as a double registration."""
    require_uuid(c.member_id, "family member id")
    require_symbol(c.relation, RELATIONS, "unknown-relation", "relation")
    if c.is_child and c.relation not in RELATIONS_THAT_CAN_BE_A_CHILD:
        raise RuleViolation(
            "relation-cannot-be-a-child",
            "A partner or parent of the person cannot be recorded as a child.",
        )
    if not c.support_offered:
        raise RuleViolation("support-offered-empty", "At least one kind of support is needed.")
    if any(s not in SUPPORTS for s in c.support_offered):
        raise RuleViolation(
            "unknown-support",
            "Each kind of support must be one of " + ", ".join(sorted(SUPPORTS)) + ".",
        )
    if len(set(c.support_offered)) != len(c.support_offered):
        raise RuleViolation(
            "support-offered-duplicated", "Each kind of support may be given only once."
        )
    known = state.family_members.get(c.member_id)
    if known is not None and known != c.relation:
        raise RuleViolation(
            "family-member-relation-changed",
            f"This family member is already engaged as {known}; a member's relation does not"
            " change (use a new member id for another person).",
        )
    engagement = (c.member_id, c.relation, frozenset(c.support_offered), c.accepted)
    if engagement in state.engagements:
        raise RuleViolation(
            "family-member-already-engaged",
            "This family member was already offered this support with the same answer.",
        )
    return {
        "member_id": c.member_id,
        "relation": c.relation,
        "is_child": c.is_child,
        "support_offered": list(c.support_offered),
        "accepted": c.accepted,
    }


def _schedule(c: ScheduleFollowUp, state: FollowUpState) -> dict[str, Any] | None:
    require_uuid(c.followup_id, "follow-up id")
    if c.followup_id in state.followups:
        # Idempotent: checked before the due date, so a re-delivery long after the
        # original scheduling still yields nothing rather than an error.
        return None
    require_symbol(c.kind, FOLLOWUP_KINDS, "unknown-followup-kind", "follow-up kind")
    if c.intervention_id is not None:
        require_uuid(c.intervention_id, "intervention id")
    if c.referral_id is not None:
        require_uuid(c.referral_id, "referral id")
    if not isinstance(c.district, str) or not c.district.strip():
        raise RuleViolation("district-missing", "The responsible district is needed.")
    if c.due_on < local_date(c.occurred_at):
        raise RuleViolation(
            "due-date-in-past", "The follow-up cannot be due before the day it is scheduled."
        )
    return {
        "followup_id": c.followup_id,
        "kind": c.kind,
        "due_on": c.due_on,
        "intervention_id": c.intervention_id,
        "referral_id": c.referral_id,
        "district": c.district,
    }


def _require_scheduled(followup_id: str, state: FollowUpState) -> FollowUp:
    followup = state.followups.get(followup_id)
    if followup is None:
        raise FollowUpNotFound()
    if followup.status == "completed":
        raise RuleViolation("followup-already-completed", "This follow-up is already completed.")
    if followup.status == "missed":
        raise RuleViolation("followup-already-missed", "This follow-up is already marked missed.")
    return followup


def _complete(c: CompleteFollowUp, state: FollowUpState) -> dict[str, Any]:
    followup = _require_scheduled(c.followup_id, state)
    if c.days_of_use_last_30 is not None:
        _require_int_in(
            c.days_of_use_last_30,
            0,
            MAX_DAYS_OF_USE,
            "days-of-use-out-of-range",
            "number of days of use in the last 30 days",
        )
    require_symbol(c.housing, HOUSING, "unknown-housing", "housing")
    require_symbol(c.occupation, OCCUPATIONS, "unknown-occupation", "occupation")
    if c.self_rated_health is not None:
        _require_int_in(
            c.self_rated_health,
            HEALTH_RATINGS.start,
            HEALTH_RATINGS.stop - 1,
            "self-rated-health-out-of-range",
            "self-rated health",
        )
    require_symbol(c.goals_reached, GOALS_REACHED, "unknown-goals-reached", "goals answer")
    require_symbol(c.situation_improved, IMPROVEMENTS, "unknown-improvement", "improvement answer")
    return {
        "followup_id": c.followup_id,
        "kind": followup.kind,
        "days_of_use_last_30": c.days_of_use_last_30,
        "housing": c.housing,
        "occupation": c.occupation,
        "self_rated_health": c.self_rated_health,
        "goals_reached": c.goals_reached,
        "situation_improved": c.situation_improved,
    }


def _missed(c: MarkFollowUpMissed, state: FollowUpState) -> dict[str, Any]:
    followup = _require_scheduled(c.followup_id, state)
    require_symbol(c.reason, MISSED_REASONS, "unknown-missed-reason", "reason")
    return {"followup_id": c.followup_id, "kind": followup.kind, "reason": c.reason}


def _user_assessment(c: RecordUserAssessment, state: FollowUpState) -> dict[str, Any]:
    """Every item is answered on the scale; NO_ANSWER is the person's choice not to answer,
    which the indicators leave out of their denominators."""
    require_uuid(c.assessment_id, "user assessment id")
    if c.assessment_id in state.user_assessment_ids:
        raise RuleViolation(
            "user-assessment-id-used", "This user assessment is already recorded on the case."
        )
    ratings = {item: getattr(c, item) for item in USER_ASSESSMENT_ITEMS}
    if any(r not in RATINGS for r in ratings.values()):
        raise RuleViolation(
            "unknown-rating", "Each rating must be one of " + ", ".join(sorted(RATINGS)) + "."
        )
    return {"assessment_id": c.assessment_id, **ratings}
