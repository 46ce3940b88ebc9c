"""The intake decider: a case's commands, events and state, with no I/O.

`decide(command, state, districts)` says which events a command leads to, or raises a
`DomainError`; `evolve(state, event)` folds one event into the state. Event payloads are
exactly the Avro payloads of `schemas/intake/` (without metadata), so an event decided here
equals the same event decoded from Kafka, and district systems' events fold the same way.
Symbols are checked here as well as in the HTTP layer because district systems produce
events without going through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any, Literal, Protocol, assert_never, get_args

from likvard.domain import (
    AGE_BANDS,
    CITY_TZ as CITY_TZ,
    DomainError as DomainError,
    DomainEvent as DomainEvent,
    RuleViolation as RuleViolation,
    age_band,
    local_date as local_date,
    require_symbol,
    require_uuid,
)
from likvard.identity import looks_like_identity_number
from likvard.policy import Transfer
from services.intake.instruments import INSTRUMENTS, Score as Score, score_problems

# --- Avro enum symbols ---------------------------------------------------------------
Substance = Literal["ALCOHOL", "NARCOTICS", "PHARMACEUTICALS", "GAMBLING"]
ReferralSource = Literal[
    "SELF", "RELATIVE", "HEALTHCARE", "POLICE", "PRISON_PROBATION", "NON_PROFIT", "OTHER"
]
ChildrenInHousehold = Literal["YES", "NO", "UNKNOWN"]
Instrument = Literal["AUDIT", "DUDIT", "ASI_GRUND", "ASI_UPPFOLJNING", "ADDIS", "PGSI", "NODS_PERC"]
NeedLevel = Literal["LOW", "MODERATE", "HIGH"]
ConsentRecipient = Literal["HEALTHCARE", "PRISON_PROBATION", "NON_PROFIT"]
TransferReason = Literal["PERSON_MOVED", "REORGANISATION", "OTHER"]
CloseReason = Literal[
    "GOALS_REACHED",
    "PLANNED_END",
    "PERSON_DECLINED",
    "NO_CONTACT",
    "MOVED_OUT_OF_CITY",
    "DECEASED",
    "OTHER",
]
ReopenReason = Literal["RELAPSE", "NEW_NEED", "CLOSED_IN_ERROR", "OTHER"]
LegalBasis = Literal[
    "RETENTION_PERIOD_ENDED", "ERASURE_REQUEST", "WRONGLY_RECORDED", "AUTHORITY_DECISION"
]
Gender = Literal["WOMAN", "MAN", "OTHER", "NOT_STATED"]
InvestigationBasis = Literal["APPLICATION", "REPORT_OF_CONCERN", "OTHER"]
InvestigationDecision = Literal["GRANTED", "PARTLY_GRANTED", "REFUSED"]
InterventionKind = Literal["RESIDENTIAL", "OUTPATIENT", "SUPPORT_CONTACT", "HOUSING", "OTHER"]
Party = Literal["SOCIAL_SERVICES", "PRIMARY_CARE", "PSYCHIATRY", "ADDICTION_CARE", "OTHER_REGION"]
CaseStatus = Literal["unregistered", "open", "closed"]

SUBSTANCES: frozenset[str] = frozenset(get_args(Substance))
REFERRAL_SOURCES: frozenset[str] = frozenset(get_args(ReferralSource))
CHILDREN_IN_HOUSEHOLD: frozenset[str] = frozenset(get_args(ChildrenInHousehold))
INSTRUMENT_CODES: frozenset[str] = frozenset(INSTRUMENTS)
NEED_LEVELS: frozenset[str] = frozenset(get_args(NeedLevel))
CONSENT_RECIPIENTS: frozenset[str] = frozenset(get_args(ConsentRecipient))
TRANSFER_REASONS: frozenset[str] = frozenset(get_args(TransferReason))
CLOSE_REASONS: frozenset[str] = frozenset(get_args(CloseReason))
REOPEN_REASONS: frozenset[str] = frozenset(get_args(ReopenReason))
LEGAL_BASES: frozenset[str] = frozenset(get_args(LegalBasis))
AGE_BAND_CODES: frozenset[str] = frozenset(code for _, _, code in AGE_BANDS)
GENDERS: frozenset[str] = frozenset(get_args(Gender))
INVESTIGATION_BASES: frozenset[str] = frozenset(get_args(InvestigationBasis))
INVESTIGATION_DECISIONS: frozenset[str] = frozenset(get_args(InvestigationDecision))
INTERVENTION_KINDS: frozenset[str] = frozenset(get_args(InterventionKind))
PARTIES: frozenset[str] = frozenset(get_args(Party))
GENDER_NOT_STATED = "NOT_STATED"
"""The gender of a registration that names none (every one written before contract v3)."""
SOCIAL_SERVICES = "SOCIAL_SERVICES"
PLAN_CONSENT_RECIPIENT = "HEALTHCARE"
"""A coordinated plan shares the case with the region's care: the consent must cover it."""

EVENT_TYPES: tuple[str, ...] = (
    "IntakeRegistered",
    "AssessmentCompleted",
    "CarePlanAgreed",
    "ConsentRecorded",
    "ConsentWithdrawn",
    "CaseTransferred",
    "CaseClosed",
    "CaseReopened",
    "PersonalDataErased",
    "InvestigationOpened",
    "InvestigationDecided",
    "FirstVisitHeld",
    "CoordinatedPlanAgreed",
    "CoordinatedPlanFollowedUp",
)


MAX_GOALS = 20
MAX_GOAL_LENGTH = 500
ADULT_AGE = 18
_PSEUDONYM = re.compile(r"[0-9a-f]{64}")


class DistrictLookup(Protocol):
    """What the decider needs of `likvard.districts.DistrictRegistry`."""

    def is_known(self, code: str, /) -> bool: ...
    def valid_on(self, code: str, day: date, /) -> bool: ...


# --- errors ----------------------------------------------------------------------------
class CaseNotFound(DomainError):
    """A command on a case that was never registered (HTTP 404)."""

    def __init__(self) -> None:
        super().__init__("case-not-found", "No case has this id.")


class CaseAlreadyExists(DomainError):
    """A registration for a case id that already has a stream."""

    def __init__(self) -> None:
        super().__init__("case-already-exists", "A case with this id is already registered.")


class InvestigationNotFound(DomainError):
    """A decision on an investigation the case never opened (HTTP 404)."""

    def __init__(self) -> None:
        super().__init__(
            "investigation-not-found", "No investigation with this id is opened on the case."
        )


class CoordinatedPlanNotFound(DomainError):
    """A follow-up of a coordinated plan the case never agreed (HTTP 404)."""

    def __init__(self) -> None:
        super().__init__(
            "coordinated-plan-not-found", "No coordinated plan with this id is agreed on the case."
        )


# --- commands --------------------------------------------------------------------------
@dataclass(frozen=True)
class RegisterIntake:
    case_id: str
    occurred_at: datetime
    person: str
    district: str
    substances: tuple[str, ...]
    referral_source: str
    children_in_household: str
    birth_year: int | None = None
    archive_sample: bool = False
    age_band: str | None = None  # derived from birth_year when not given
    gender: str = GENDER_NOT_STATED


@dataclass(frozen=True)
class CompleteAssessment:
    case_id: str
    occurred_at: datetime
    assessment_id: str
    instrument: str
    scores: tuple[Score, ...]
    need_level: str


@dataclass(frozen=True)
class AgreeCarePlan:
    case_id: str
    occurred_at: datetime
    plan_id: str
    goals: tuple[str, ...]
    person_participated: bool
    review_on: date | None = None


@dataclass(frozen=True)
class RecordConsent:
    case_id: str
    occurred_at: datetime
    consent_id: str
    recipients: tuple[str, ...]
    valid_until: date | None = None


@dataclass(frozen=True)
class WithdrawConsent:
    case_id: str
    occurred_at: datetime
    consent_id: str


@dataclass(frozen=True)
class TransferCase:
    case_id: str
    occurred_at: datetime
    to_district: str
    reason: str


@dataclass(frozen=True)
class CloseCase:
    case_id: str
    occurred_at: datetime
    reason: str


@dataclass(frozen=True)
class ReopenCase:
    case_id: str
    occurred_at: datetime
    reason: str


@dataclass(frozen=True)
class ErasePersonalData:
    """Record that the person's data keys were destroyed (erasure or culling): the case's
    sealed details are erased from now on; nothing else changes."""

    case_id: str
    occurred_at: datetime
    legal_basis: str
    key_ids: tuple[str, ...]


@dataclass(frozen=True)
class OpenInvestigation:
    """Open an investigation of the person's need (SoL 11 kap. 1 §)."""

    case_id: str
    occurred_at: datetime
    investigation_id: str
    basis: str


@dataclass(frozen=True)
class DecideInvestigation:
    """Decide an open investigation: granted, partly granted or refused, with the kinds of
    intervention decided (none when refused)."""

    case_id: str
    occurred_at: datetime
    investigation_id: str
    decision: str
    intervention_kinds: tuple[str, ...]


@dataclass(frozen=True)
class HoldFirstVisit:
    """Record the first personal visit after the first contact (once per case)."""

    case_id: str
    occurred_at: datetime
    visit_id: str


@dataclass(frozen=True)
class AgreeCoordinatedPlan:
    """Record a coordinated individual plan (SIP) agreed with the region's care."""

    case_id: str
    occurred_at: datetime
    plan_id: str
    parties: tuple[str, ...]
    lead: str
    follow_up_on: date
    consent_id: str


@dataclass(frozen=True)
class FollowUpCoordinatedPlan:
    case_id: str
    occurred_at: datetime
    plan_id: str


Command = (
    RegisterIntake
    | CompleteAssessment
    | AgreeCarePlan
    | RecordConsent
    | WithdrawConsent
    | TransferCase
    | CloseCase
    | ReopenCase
    | ErasePersonalData
    | OpenInvestigation
    | DecideInvestigation
    | HoldFirstVisit
    | AgreeCoordinatedPlan
    | FollowUpCoordinatedPlan
)


# --- events and state ------------------------------------------------------------------


@dataclass(frozen=True)
class CaseState:
    """A case folded from its events ("unregistered" until its IntakeRegistered).

    `consents` holds the consents not withdrawn (consent_id -> recipients); whether one is
    in force also depends on the day, see `consent_active`. `investigations` maps
    investigation_id -> (opened at, its decision or None while open); `coordinated_plans`
    maps plan_id -> (agreed at, whether it was followed up).
    """

    exists: bool = False
    status: CaseStatus = "unregistered"
    district: str | None = None
    person: str | None = None
    substances: tuple[str, ...] = ()
    referral_source: str | None = None
    children_in_household: str | None = None
    age_band: str | None = None
    gender: str | None = None
    archive_sample: bool = False
    registered_at: datetime | None = None
    closed_at: datetime | None = None
    assessment_ids: frozenset[str] = frozenset()
    need_level: str | None = None
    need_level_at: datetime | None = None
    care_plan_ids: frozenset[str] = frozenset()
    consent_ids: frozenset[str] = frozenset()
    consents: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    consent_valid_until: Mapping[str, date | None] = field(default_factory=dict)
    # The districts the case left and when, oldest first: the policy lets a sending
    # district read the case for a while after a transfer.
    transfers: tuple[Transfer, ...] = ()
    # The data keys destroyed by erasure or culling (their ids): the sealed details are gone.
    erased_key_ids: frozenset[str] = frozenset()
    erased: bool = False
    investigations: Mapping[str, tuple[datetime, str | None]] = field(default_factory=dict)
    first_visit_at: datetime | None = None
    coordinated_plans: Mapping[str, tuple[datetime, bool]] = field(default_factory=dict)
    version: int = 0

    @property
    def is_open(self) -> bool:
        return self.status == "open"

    def consent_active(self, consent_id: str, on: date) -> bool:
        """Recorded, not withdrawn, and not expired on this day (valid_until inclusive)."""
        if consent_id not in self.consents:
            return False
        until = self.consent_valid_until.get(consent_id)
        return until is None or on <= until

    def active_consents(self, on: date) -> dict[str, tuple[str, ...]]:
        return {cid: r for cid, r in self.consents.items() if self.consent_active(cid, on)}

    def consents_cover(self, recipient: str, on: date) -> bool:
        """Whether a consent in force on this day lets the case be shared with recipient."""
        return any(recipient in r for r in self.active_consents(on).values())

    @property
    def open_investigations(self) -> frozenset[str]:
        return frozenset(i for i, (_, decision) in self.investigations.items() if decision is None)


def initial_state() -> CaseState:
    return CaseState()


def evolve(state: CaseState, event: DomainEvent) -> CaseState:
    """Fold one event. Event types this version does not know are counted and skipped, so
    an older reader can still fold a stream that a newer producer extended."""
    d = event.data
    new = state
    match event.type:
        case "IntakeRegistered":
            new = replace(
                state,
                exists=True,
                status="open",
                district=d["district"],
                person=d["person"],
                substances=tuple(d["substances"]),
                referral_source=d["referral_source"],
                children_in_household=d["children_in_household"],
                age_band=d.get("age_band")
                or age_band(d.get("birth_year"), local_date(event.occurred_at).year),
                archive_sample=bool(d.get("archive_sample", False)),
                gender=d.get("gender") or GENDER_NOT_STATED,
                registered_at=event.occurred_at,
            )
        case "AssessmentCompleted":
            new = replace(state, assessment_ids=state.assessment_ids | {d["assessment_id"]})
            # Latest by when it happened: a district system may report an older one late.
            if state.need_level_at is None or event.occurred_at >= state.need_level_at:
                new = replace(new, need_level=d["need_level"], need_level_at=event.occurred_at)
        case "CarePlanAgreed":
            new = replace(state, care_plan_ids=state.care_plan_ids | {d["plan_id"]})
        case "ConsentRecorded":
            cid = d["consent_id"]
            new = replace(
                state,
                consent_ids=state.consent_ids | {cid},
                consents={**state.consents, cid: tuple(d["recipients"])},
                consent_valid_until={**state.consent_valid_until, cid: d.get("valid_until")},
            )
        case "ConsentWithdrawn":
            cid = d["consent_id"]
            new = replace(
                state,
                consents={k: v for k, v in state.consents.items() if k != cid},
                consent_valid_until={
                    k: v for k, v in state.consent_valid_until.items() if k != cid
                },
            )
        case "CaseTransferred":
            moved = Transfer(from_district=d["from_district"], at=event.occurred_at)
            new = replace(state, district=d["to_district"], transfers=(*state.transfers, moved))
        case "CaseClosed":
            new = replace(state, status="closed", closed_at=event.occurred_at)
        case "CaseReopened":
            new = replace(state, status="open", closed_at=None)
        case "PersonalDataErased":
            new = replace(
                state, erased=True, erased_key_ids=state.erased_key_ids | set(d["key_ids"])
            )
        case "InvestigationOpened":
            opened = {d["investigation_id"]: (event.occurred_at, None)}
            new = replace(state, investigations={**state.investigations, **opened})
        case "InvestigationDecided":
            iid = d["investigation_id"]
            opened_at = state.investigations.get(iid, (event.occurred_at, None))[0]
            decided = {iid: (opened_at, d["decision"])}
            new = replace(state, investigations={**state.investigations, **decided})
        case "FirstVisitHeld":
            if state.first_visit_at is None or event.occurred_at < state.first_visit_at:
                new = replace(state, first_visit_at=event.occurred_at)
        case "CoordinatedPlanAgreed":
            agreed = {d["plan_id"]: (event.occurred_at, False)}
            new = replace(state, coordinated_plans={**state.coordinated_plans, **agreed})
        case "CoordinatedPlanFollowedUp":
            pid = d["plan_id"]
            agreed_at = state.coordinated_plans.get(pid, (event.occurred_at, False))[0]
            followed = {pid: (agreed_at, True)}
            new = replace(state, coordinated_plans={**state.coordinated_plans, **followed})
    return replace(new, version=state.version + 1)


def fold(events: Iterable[DomainEvent]) -> CaseState:
    state = initial_state()
    for event in events:
        state = evolve(state, event)
    return state


# --- decide ----------------------------------------------------------------------------
_EVENT_OF: Mapping[type, str] = {
    RegisterIntake: "IntakeRegistered",
    CompleteAssessment: "AssessmentCompleted",
    AgreeCarePlan: "CarePlanAgreed",
    RecordConsent: "ConsentRecorded",
    WithdrawConsent: "ConsentWithdrawn",
    TransferCase: "CaseTransferred",
    CloseCase: "CaseClosed",
    ReopenCase: "CaseReopened",
    ErasePersonalData: "PersonalDataErased",
    OpenInvestigation: "InvestigationOpened",
    DecideInvestigation: "InvestigationDecided",
    HoldFirstVisit: "FirstVisitHeld",
    AgreeCoordinatedPlan: "CoordinatedPlanAgreed",
    FollowUpCoordinatedPlan: "CoordinatedPlanFollowedUp",
}


def decide(command: Command, state: CaseState, districts: DistrictLookup) -> list[DomainEvent]:
    """The events this command leads to on this state; raises DomainError if refused."""
    if command.occurred_at.tzinfo is None or command.occurred_at.utcoffset() is None:
        raise RuleViolation("occurred-at-naive", "The time of the command needs a time zone.")
    match command:
        case RegisterIntake():
            data = _register(command, state, districts)
        case CompleteAssessment():
            data = _assess(command, state)
        case AgreeCarePlan():
            data = _care_plan(command, state)
        case RecordConsent():
            data = _consent(command, state)
        case WithdrawConsent():
            data = _withdraw(command, state)
        case TransferCase():
            data = _transfer(command, state, districts)
        case CloseCase():
            data = _close(command, state)
        case ReopenCase():
            data = _reopen(command, state)
        case ErasePersonalData():
            erased = _erase(command, state)
            if erased is None:
                return []  # those keys are already recorded as erased: nothing new
            data = erased
        case OpenInvestigation():
            data = _open_investigation(command, state)
        case DecideInvestigation():
            data = _decide_investigation(command, state)
        case HoldFirstVisit():
            data = _first_visit(command, state)
        case AgreeCoordinatedPlan():
            data = _coordinated_plan(command, state)
        case FollowUpCoordinatedPlan():
            data = _follow_up_plan(command, state)
        case _:
            assert_never(command)
    return [DomainEvent(_EVENT_OF[type(command)], data, command.occurred_at)]


def _require_open(state: CaseState) -> None:
    if not state.exists:
        raise CaseNotFound()
    if state.status != "open":
        raise RuleViolation("case-closed", "The case is closed; reopen it first.")


def _require_district(code: str, day: date, districts: DistrictLookup, what: str) -> None:
    if not districts.is_known(code):
        raise RuleViolation("unknown-district", f"The {what} is not a known district code.")
    if not districts.valid_on(code, day):
        raise RuleViolation(
            "district-not-valid", f"The district {code} is not in operation on {day.isoformat()}."
        )


def _require_symbols(
    values: tuple[str, ...], allowed: frozenset[str], what: str, prefix: str
) -> None:
    if not values:
        raise RuleViolation(f"{prefix}-empty", f"At least one {what} is needed.")
    if any(v not in allowed for v in values):
        raise RuleViolation(
            f"unknown-{what.replace(' ', '-')}",
            f"Each {what} must be one of " + ", ".join(sorted(allowed)) + ".",
        )
    if len(set(values)) != len(values):
        raise RuleViolation(f"{prefix}-duplicated", f"Each {what} may be given only once.")


def _register(c: RegisterIntake, state: CaseState, districts: DistrictLookup) -> dict[str, Any]:
    if state.exists:
        raise CaseAlreadyExists()
    # 64 hex characters is the HMAC pseudonym; an all-digit string is an identity number
    # padded to that length, never a real pseudonym (probability 10**-13).
    if not _PSEUDONYM.fullmatch(c.person) or c.person.isdigit():
        raise RuleViolation(
            "person-not-pseudonym",
            "The person must be the keyed pseudonym (64 lowercase hex characters), "
            "never an identity number or a name.",
        )
    day = local_date(c.occurred_at)
    _require_district(c.district, day, districts, "district")
    _require_symbols(c.substances, SUBSTANCES, "substance", "substances")
    require_symbol(
        c.referral_source, REFERRAL_SOURCES, "unknown-referral-source", "referral source"
    )
    require_symbol(
        c.children_in_household,
        CHILDREN_IN_HOUSEHOLD,
        "unknown-children-in-household",
        "children in household answer",
    )
    latest = day.year - ADULT_AGE
    if c.birth_year is not None and not 1900 <= c.birth_year <= latest:
        raise RuleViolation(
            "birth-year-out-of-range",
            f"The birth year must be from 1900 to {latest}: the service is for adults.",
        )
    band = c.age_band if c.birth_year is None else age_band(c.birth_year, day.year)
    if band is not None and band not in AGE_BAND_CODES - {"0-17"}:
        raise RuleViolation(
            "unknown-age-band",
            "The age band must be one of " + ", ".join(sorted(AGE_BAND_CODES - {"0-17"})) + ".",
        )
    if c.age_band is not None and c.age_band != band:
        raise RuleViolation("age-band-mismatch", "The age band does not match the birth year.")
    require_symbol(c.gender, GENDERS, "unknown-gender", "gender")
    # The birth year goes into the event for the store to seal with the person's key; the
    # reports keep only the band.
    return {
        "person": c.person,
        "district": c.district,
        "substances": list(c.substances),
        "referral_source": c.referral_source,
        "children_in_household": c.children_in_household,
        "birth_year": c.birth_year,
        "age_band": band,
        "archive_sample": c.archive_sample,
        "gender": c.gender,
    }


def _assess(c: CompleteAssessment, state: CaseState) -> dict[str, Any]:
    _require_open(state)
    require_uuid(c.assessment_id, "assessment id")
    if c.assessment_id in state.assessment_ids:
        raise RuleViolation(
            "assessment-id-used", "This assessment is already recorded on the case."
        )
    require_symbol(c.instrument, INSTRUMENT_CODES, "unknown-instrument", "instrument")
    problems = score_problems(c.instrument, c.scores)
    if problems:
        sentence = "; ".join(problems)
        raise RuleViolation("invalid-scores", sentence[0].upper() + sentence[1:] + ".")
    require_symbol(c.need_level, NEED_LEVELS, "unknown-need-level", "need level")
    return {
        "assessment_id": c.assessment_id,
        "instrument": c.instrument,
        "scores": [{"scale": s.scale, "value": s.value} for s in c.scores],
        "need_level": c.need_level,
    }


def _care_plan(c: AgreeCarePlan, state: CaseState) -> dict[str, Any]:
    _require_open(state)
    require_uuid(c.plan_id, "care plan id")
    if c.plan_id in state.care_plan_ids:
        raise RuleViolation("care-plan-id-used", "This care plan is already recorded on the case.")
    if not 1 <= len(c.goals) <= MAX_GOALS:
        raise RuleViolation("goals-count", f"A care plan needs 1 to {MAX_GOALS} goals.")
    if any(not g.strip() for g in c.goals):
        raise RuleViolation("goal-blank", "A goal may not be blank.")
    if any(len(g) > MAX_GOAL_LENGTH for g in c.goals):
        raise RuleViolation("goal-too-long", f"A goal may be at most {MAX_GOAL_LENGTH} characters.")
    require_no_identity_number(c.goals, "goal")
    if c.review_on is not None and c.review_on < local_date(c.occurred_at):
        raise RuleViolation(
            "review-date-in-past", "The review date may not be before the plan's date."
        )
    return {
        "plan_id": c.plan_id,
        "goals": list(c.goals),
        "person_participated": c.person_participated,
        "review_on": c.review_on,
    }


def require_no_identity_number(texts: Iterable[str], what: str) -> None:
    """Free text must not hold a personal or coordination number (Luhn-checked): the
    pseudonym is the only way a person is named. The refusal never repeats the text."""
    if any(looks_like_identity_number(t) for t in texts):
        raise RuleViolation(
            "identity-number-in-free-text",
            f"A {what} holds something shaped like a personal identity number; remove it"
            " (the person is identified by their pseudonym only).",
        )


def _consent(c: RecordConsent, state: CaseState) -> dict[str, Any]:
    _require_open(state)
    require_uuid(c.consent_id, "consent id")
    if c.consent_id in state.consent_ids:
        raise RuleViolation("consent-id-used", "This consent is already recorded on the case.")
    _require_symbols(c.recipients, CONSENT_RECIPIENTS, "consent recipient", "consent-recipients")
    if c.valid_until is not None and c.valid_until < local_date(c.occurred_at):
        raise RuleViolation(
            "consent-expiry-in-past", "The consent cannot end before the day it is given."
        )
    return {
        "consent_id": c.consent_id,
        "recipients": list(c.recipients),
        "valid_until": c.valid_until,
    }


def _withdraw(c: WithdrawConsent, state: CaseState) -> dict[str, Any]:
    # No open-case check: a person may always withdraw a consent, closed case or not.
    if not state.exists:
        raise CaseNotFound()
    if c.consent_id not in state.consent_ids:
        raise RuleViolation("consent-not-found", "No consent with this id is recorded on the case.")
    if c.consent_id not in state.consents:
        raise RuleViolation("consent-already-withdrawn", "This consent is already withdrawn.")
    if not state.consent_active(c.consent_id, local_date(c.occurred_at)):
        raise RuleViolation("consent-expired", "This consent has already expired.")
    return {"consent_id": c.consent_id}


def _transfer(c: TransferCase, state: CaseState, districts: DistrictLookup) -> dict[str, Any]:
    _require_open(state)
    _require_district(c.to_district, local_date(c.occurred_at), districts, "target district")
    if c.to_district == state.district:
        raise RuleViolation("same-district", "The case is already in this district.")
    require_symbol(c.reason, TRANSFER_REASONS, "unknown-transfer-reason", "transfer reason")
    return {"from_district": state.district, "to_district": c.to_district, "reason": c.reason}


def _close(c: CloseCase, state: CaseState) -> dict[str, Any]:
    if not state.exists:
        raise CaseNotFound()
    if state.status == "closed":
        raise RuleViolation("case-already-closed", "The case is already closed.")
    require_symbol(c.reason, CLOSE_REASONS, "unknown-close-reason", "close reason")
    return {"reason": c.reason}


def _reopen(c: ReopenCase, state: CaseState) -> dict[str, Any]:
    if not state.exists:
        raise CaseNotFound()
    if state.status != "closed":
        raise RuleViolation("case-not-closed", "Only a closed case can be reopened.")
    require_symbol(c.reason, REOPEN_REASONS, "unknown-reopen-reason", "reopen reason")
    return {"reason": c.reason}


def _erase(c: ErasePersonalData, state: CaseState) -> dict[str, Any] | None:
    # No open-case check: a closed case is erased as well, and culling is of closed cases.
    if not state.exists:
        raise CaseNotFound()
    require_symbol(c.legal_basis, LEGAL_BASES, "unknown-legal-basis", "legal basis")
    for key_id in c.key_ids:
        require_uuid(key_id, "key id")
    if state.erased and set(c.key_ids) <= state.erased_key_ids:
        return None
    return {"legal_basis": c.legal_basis, "key_ids": list(c.key_ids)}


# --- the care chain: investigation, first visit, coordinated plan ------------------------
def _require_codes(
    values: tuple[str, ...], allowed: frozenset[str], what: str, codes: tuple[str, str, str]
) -> None:
    """As `_require_symbols`, with the refusal codes (empty, unknown, duplicated) spelt
    out where they are used, so the district guide's table is checked against them."""
    empty, unknown, duplicated = codes
    if not values:
        raise RuleViolation(empty, f"At least one {what} is needed.")
    if any(v not in allowed for v in values):
        raise RuleViolation(
            unknown, f"Each {what} must be one of " + ", ".join(sorted(allowed)) + "."
        )
    if len(set(values)) != len(values):
        raise RuleViolation(duplicated, f"Each {what} may be given only once.")


def _open_investigation(c: OpenInvestigation, state: CaseState) -> dict[str, Any]:
    _require_open(state)
    require_uuid(c.investigation_id, "investigation id")
    if c.investigation_id in state.investigations:
        raise RuleViolation(
            "investigation-id-used", "This investigation is already recorded on the case."
        )
    if state.open_investigations:
        # One need is investigated at a time: a new application joins the open one.
        raise RuleViolation(
            "investigation-already-open",
            "The case has an open investigation; decide it before opening another.",
        )
    require_symbol(c.basis, INVESTIGATION_BASES, "unknown-investigation-basis", "basis")
    return {"investigation_id": c.investigation_id, "basis": c.basis}


def _decide_investigation(c: DecideInvestigation, state: CaseState) -> dict[str, Any]:
    _require_open(state)
    require_uuid(c.investigation_id, "investigation id")
    investigation = state.investigations.get(c.investigation_id)
    if investigation is None:
        raise InvestigationNotFound()
    opened_at, decided = investigation
    if decided is not None:
        raise RuleViolation(
            "investigation-already-decided", "This investigation is already decided."
        )
    require_symbol(
        c.decision, INVESTIGATION_DECISIONS, "unknown-investigation-decision", "decision"
    )
    if c.occurred_at < opened_at:
        raise RuleViolation(
            "decision-before-opening",
            "The decision cannot be before the investigation was opened.",
        )
    if c.decision == "REFUSED":
        if c.intervention_kinds:
            raise RuleViolation(
                "refused-with-interventions",
                "A refusal decides no intervention: leave the intervention kinds empty.",
            )
    else:
        _require_codes(
            c.intervention_kinds,
            INTERVENTION_KINDS,
            "intervention kind",
            (
                "intervention-kinds-empty",
                "unknown-intervention-kind",
                "intervention-kinds-duplicated",
            ),
        )
    return {
        "investigation_id": c.investigation_id,
        "decision": c.decision,
        "intervention_kinds": list(c.intervention_kinds),
    }


def _first_visit(c: HoldFirstVisit, state: CaseState) -> dict[str, Any]:
    _require_open(state)
    require_uuid(c.visit_id, "visit id")
    if state.first_visit_at is not None:
        raise RuleViolation(
            "first-visit-already-held", "The first personal visit is already recorded."
        )
    if state.registered_at is not None and c.occurred_at < state.registered_at:
        # The waiting time to the first visit counts from the intake: never negative.
        raise RuleViolation(
            "first-visit-before-intake", "The first visit cannot be before the case's intake."
        )
    return {"visit_id": c.visit_id}


def _coordinated_plan(c: AgreeCoordinatedPlan, state: CaseState) -> dict[str, Any]:
    _require_open(state)
    require_uuid(c.plan_id, "coordinated plan id")
    if c.plan_id in state.coordinated_plans:
        raise RuleViolation(
            "coordinated-plan-id-used", "This coordinated plan is already recorded on the case."
        )
    _require_codes(
        c.parties, PARTIES, "party", ("parties-empty", "unknown-party", "parties-duplicated")
    )
    if SOCIAL_SERVICES not in c.parties or len(c.parties) < 2:
        raise RuleViolation(
            "parties-too-few",
            "A coordinated plan is between social services and at least one other party.",
        )
    require_symbol(c.lead, PARTIES, "unknown-party", "lead")
    if c.lead not in c.parties:
        raise RuleViolation("lead-not-a-party", "The party holding the lead must be a party.")
    day = local_date(c.occurred_at)
    if c.follow_up_on < day:
        raise RuleViolation(
            "follow-up-date-in-past", "The follow-up date may not be before the plan's date."
        )
    require_uuid(c.consent_id, "consent id")
    recipients = state.active_consents(day).get(c.consent_id)
    if recipients is None:
        raise RuleViolation(
            "consent-not-in-force", "No consent with this id is in force on the case."
        )
    if PLAN_CONSENT_RECIPIENT not in recipients:
        raise RuleViolation(
            "consent-not-covering", f"The consent does not cover {PLAN_CONSENT_RECIPIENT}."
        )
    return {
        "plan_id": c.plan_id,
        "parties": list(c.parties),
        "lead": c.lead,
        "follow_up_on": c.follow_up_on,
        "consent_id": c.consent_id,
    }


def _follow_up_plan(c: FollowUpCoordinatedPlan, state: CaseState) -> dict[str, Any]:
    _require_open(state)
    require_uuid(c.plan_id, "coordinated plan id")
    plan = state.coordinated_plans.get(c.plan_id)
    if plan is None:
        raise CoordinatedPlanNotFound()
    agreed_at, followed_up = plan
    if followed_up:
        raise RuleViolation(
            "coordinated-plan-already-followed-up", "This coordinated plan is already followed up."
        )
    if c.occurred_at < agreed_at:
        raise RuleViolation(
            "follow-up-before-agreement", "A plan cannot be followed up before it was agreed."
        )
    return {"plan_id": c.plan_id}
