"""The intake decider's care chain: the gender at intake, the investigation and its
decision, the first personal visit and the coordinated plan (SIP) with its follow-up.
Given these events, when this command, then these events (no I/O)."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, timedelta
from typing import Any

import pytest

from services.intake import domain as d
from services.intake.domain import (
    AgreeCoordinatedPlan,
    CaseNotFound,
    CoordinatedPlanNotFound,
    DecideInvestigation,
    DomainEvent,
    FollowUpCoordinatedPlan,
    HoldFirstVisit,
    InvestigationNotFound,
    OpenInvestigation,
    RuleViolation,
)
from services.intake.tests.test_domain import (
    CASE,
    CLOSED,
    CONSENT,
    NOW,
    OPEN,
    OTHER_ID,
    T0,
    TODAY,
    closed,
    consented,
    given,
    register,
    registered,
    reopened,
    withdrawn,
)

INVESTIGATION = "4a1c7e2b-5d3f-4e6a-8b9c-0d1e2f3a4b5c"
VISIT = "5b2d8f3c-6e4a-4f7b-9c0d-1e2f3a4b5c6d"
SIP = "6c3e9a4d-7f5b-4a8c-8d1e-2f3a4b5c6d7e"
LATER = NOW + timedelta(days=14)


# --- events ---------------------------------------------------------------------------
def investigation_opened(
    investigation_id: str = INVESTIGATION, basis: str = "APPLICATION", at: datetime = T0
) -> DomainEvent:
    return DomainEvent(
        "InvestigationOpened", {"investigation_id": investigation_id, "basis": basis}, at
    )


def investigation_decided(
    decision: str = "GRANTED",
    kinds: tuple[str, ...] = ("OUTPATIENT", "SUPPORT_CONTACT"),
    investigation_id: str = INVESTIGATION,
    at: datetime = NOW,
) -> DomainEvent:
    return DomainEvent(
        "InvestigationDecided",
        {
            "investigation_id": investigation_id,
            "decision": decision,
            "intervention_kinds": list(kinds),
        },
        at,
    )


def visited(visit_id: str = VISIT, at: datetime = NOW) -> DomainEvent:
    return DomainEvent("FirstVisitHeld", {"visit_id": visit_id}, at)


def plan_agreed(at: datetime = NOW, **data: Any) -> DomainEvent:
    payload = {
        "plan_id": SIP,
        "parties": ["SOCIAL_SERVICES", "PSYCHIATRY"],
        "lead": "PSYCHIATRY",
        "follow_up_on": date(2026, 6, 1),
        "consent_id": CONSENT,
        **data,
    }
    return DomainEvent("CoordinatedPlanAgreed", payload, at)


def plan_followed_up(plan_id: str = SIP, at: datetime = LATER) -> DomainEvent:
    return DomainEvent("CoordinatedPlanFollowedUp", {"plan_id": plan_id}, at)


# --- commands -------------------------------------------------------------------------
def open_investigation(**kw: Any) -> OpenInvestigation:
    return replace(OpenInvestigation(CASE, T0, INVESTIGATION, "APPLICATION"), **kw)


def decide_investigation(
    decision: str = "GRANTED", kinds: tuple[str, ...] = ("OUTPATIENT", "SUPPORT_CONTACT"), **kw: Any
) -> DecideInvestigation:
    return replace(DecideInvestigation(CASE, NOW, INVESTIGATION, decision, kinds), **kw)


def first_visit(**kw: Any) -> HoldFirstVisit:
    return replace(HoldFirstVisit(CASE, NOW, VISIT), **kw)


def agree_plan(**kw: Any) -> AgreeCoordinatedPlan:
    base = AgreeCoordinatedPlan(
        case_id=CASE,
        occurred_at=NOW,
        plan_id=SIP,
        parties=("SOCIAL_SERVICES", "PSYCHIATRY"),
        lead="PSYCHIATRY",
        follow_up_on=date(2026, 6, 1),
        consent_id=CONSENT,
    )
    return replace(base, **kw)


def follow_up_plan(**kw: Any) -> FollowUpCoordinatedPlan:
    return replace(FollowUpCoordinatedPlan(CASE, LATER, SIP), **kw)


CONSENTED = (*OPEN, consented())
OPENED = (*OPEN, investigation_opened())
AGREED = (*CONSENTED, plan_agreed())


# --- gender at intake -----------------------------------------------------------------
@pytest.mark.parametrize("gender", ["WOMAN", "MAN", "OTHER", "NOT_STATED"])
def test_register_records_the_gender_as_a_code(gender: str) -> None:
    given().when(register(gender=gender)).then(registered(at=NOW, gender=gender))
    assert d.fold([registered(gender=gender)]).gender == gender


def test_register_without_a_gender_records_not_stated() -> None:
    given().when(register()).then(registered(at=NOW, gender="NOT_STATED"))


@pytest.mark.parametrize("gender", ["woman", "F", "", "UNKNOWN"])
def test_register_refuses_a_gender_off_the_list(gender: str) -> None:
    err = given().when(register(gender=gender)).then_raises(RuleViolation, "unknown-gender")
    assert gender not in err.detail or not gender


def test_a_registration_written_before_the_gender_folds_as_not_stated() -> None:
    old = registered()
    data = {k: v for k, v in old.data.items() if k != "gender"}
    assert d.fold([DomainEvent("IntakeRegistered", data, T0)]).gender == "NOT_STATED"


# --- the investigation ----------------------------------------------------------------
def test_an_investigation_opens_on_an_open_case() -> None:
    given(*OPEN).when(open_investigation()).then(investigation_opened())
    given(*OPEN).when(open_investigation(basis="REPORT_OF_CONCERN")).then(
        investigation_opened(basis="REPORT_OF_CONCERN")
    )


@pytest.mark.parametrize(
    ("history", "command", "error", "code"),
    [
        ((), open_investigation(), CaseNotFound, "case-not-found"),
        (CLOSED, open_investigation(), RuleViolation, "case-closed"),
        (OPEN, open_investigation(investigation_id="nope"), RuleViolation, "invalid-id"),
        (OPEN, open_investigation(basis="RUMOUR"), RuleViolation, "unknown-investigation-basis"),
        (OPENED, open_investigation(), RuleViolation, "investigation-id-used"),
        (
            OPENED,
            open_investigation(investigation_id=OTHER_ID),
            RuleViolation,
            "investigation-already-open",
        ),
        (
            (*OPENED, investigation_decided()),
            open_investigation(),
            RuleViolation,
            "investigation-id-used",
        ),
    ],
)
def test_opening_an_investigation_is_refused(
    history: tuple[DomainEvent, ...], command: OpenInvestigation, error: type, code: str
) -> None:
    given(*history).when(command).then_raises(error, code)


def test_a_new_investigation_opens_once_the_last_is_decided() -> None:
    history = (*OPENED, investigation_decided("REFUSED", ()))
    given(*history).when(open_investigation(investigation_id=OTHER_ID, occurred_at=LATER)).then(
        investigation_opened(OTHER_ID, at=LATER)
    )


@pytest.mark.parametrize(
    ("decision", "kinds"),
    [
        ("GRANTED", ("OUTPATIENT", "SUPPORT_CONTACT")),
        ("PARTLY_GRANTED", ("HOUSING",)),
        ("REFUSED", ()),
    ],
)
def test_an_open_investigation_is_decided(decision: str, kinds: tuple[str, ...]) -> None:
    given(*OPENED).when(decide_investigation(decision, kinds)).then(
        investigation_decided(decision, kinds)
    )
    state = d.fold([*OPENED, investigation_decided(decision, kinds)])
    assert state.investigations[INVESTIGATION] == (T0, decision)
    assert state.open_investigations == frozenset()


@pytest.mark.parametrize(
    ("history", "command", "error", "code"),
    [
        ((), decide_investigation(), CaseNotFound, "case-not-found"),
        (OPEN, decide_investigation(), InvestigationNotFound, "investigation-not-found"),
        (
            OPENED,
            decide_investigation(investigation_id=OTHER_ID),
            InvestigationNotFound,
            "investigation-not-found",
        ),
        ((*OPENED, closed()), decide_investigation(), RuleViolation, "case-closed"),
        (
            (*OPENED, investigation_decided()),
            decide_investigation("REFUSED", ()),
            RuleViolation,
            "investigation-already-decided",
        ),
        (
            OPENED,
            decide_investigation("MAYBE"),
            RuleViolation,
            "unknown-investigation-decision",
        ),
        (
            OPENED,
            decide_investigation("REFUSED", ("OUTPATIENT",)),
            RuleViolation,
            "refused-with-interventions",
        ),
        (OPENED, decide_investigation("GRANTED", ()), RuleViolation, "intervention-kinds-empty"),
        (
            OPENED,
            decide_investigation("PARTLY_GRANTED", ("SPA",)),
            RuleViolation,
            "unknown-intervention-kind",
        ),
        (
            OPENED,
            decide_investigation("GRANTED", ("HOUSING", "HOUSING")),
            RuleViolation,
            "intervention-kinds-duplicated",
        ),
        (
            OPENED,
            decide_investigation(occurred_at=T0 - timedelta(days=1)),
            RuleViolation,
            "decision-before-opening",
        ),
    ],
)
def test_deciding_an_investigation_is_refused(
    history: tuple[DomainEvent, ...], command: DecideInvestigation, error: type, code: str
) -> None:
    given(*history).when(command).then_raises(error, code)


def test_a_decision_reported_before_its_opening_still_folds() -> None:
    # Events of one stream are in order; this only guards the fold of a foreign stream.
    state = d.fold([*OPEN, investigation_decided()])
    assert state.investigations[INVESTIGATION] == (NOW, "GRANTED")


# --- the first personal visit ---------------------------------------------------------
def test_the_first_visit_is_recorded_once() -> None:
    given(*OPEN).when(first_visit()).then(visited())
    assert d.fold([*OPEN, visited()]).first_visit_at == NOW
    given(*OPEN, visited()).when(first_visit(visit_id=OTHER_ID)).then_raises(
        RuleViolation, "first-visit-already-held"
    )


def test_the_first_visit_survives_a_reopening_as_the_first() -> None:
    history = (*OPEN, visited(), closed(NOW), reopened(LATER))
    given(*history).when(first_visit(visit_id=OTHER_ID, occurred_at=LATER)).then_raises(
        RuleViolation, "first-visit-already-held"
    )


@pytest.mark.parametrize(
    ("history", "command", "error", "code"),
    [
        ((), first_visit(), CaseNotFound, "case-not-found"),
        (CLOSED, first_visit(), RuleViolation, "case-closed"),
        (OPEN, first_visit(visit_id="x"), RuleViolation, "invalid-id"),
        (
            OPEN,
            first_visit(occurred_at=T0 - timedelta(minutes=1)),
            RuleViolation,
            "first-visit-before-intake",
        ),
    ],
)
def test_a_first_visit_is_refused(
    history: tuple[DomainEvent, ...], command: HoldFirstVisit, error: type, code: str
) -> None:
    given(*history).when(command).then_raises(error, code)


def test_a_first_visit_at_the_intake_itself_is_fine() -> None:
    given(*OPEN).when(first_visit(occurred_at=T0)).then(visited(at=T0))


# --- the coordinated plan (SIP) -------------------------------------------------------
def test_a_plan_is_agreed_with_a_consent_covering_healthcare() -> None:
    given(*CONSENTED).when(agree_plan()).then(plan_agreed())
    parties = ("SOCIAL_SERVICES", "PRIMARY_CARE", "ADDICTION_CARE", "OTHER_REGION")
    given(*CONSENTED).when(agree_plan(parties=parties, lead="SOCIAL_SERVICES")).then(
        plan_agreed(parties=list(parties), lead="SOCIAL_SERVICES")
    )
    assert d.fold([*AGREED]).coordinated_plans == {SIP: (NOW, False)}


def test_a_plan_may_be_followed_up_on_the_day_it_is_agreed() -> None:
    given(*CONSENTED).when(agree_plan(follow_up_on=TODAY)).then(plan_agreed(follow_up_on=TODAY))


@pytest.mark.parametrize(
    ("history", "command", "error", "code"),
    [
        ((), agree_plan(), CaseNotFound, "case-not-found"),
        ((*CONSENTED, closed()), agree_plan(), RuleViolation, "case-closed"),
        (CONSENTED, agree_plan(plan_id="sip-1"), RuleViolation, "invalid-id"),
        (AGREED, agree_plan(), RuleViolation, "coordinated-plan-id-used"),
        (CONSENTED, agree_plan(parties=()), RuleViolation, "parties-empty"),
        (
            CONSENTED,
            agree_plan(parties=("SOCIAL_SERVICES", "POLICE")),
            RuleViolation,
            "unknown-party",
        ),
        (
            CONSENTED,
            agree_plan(parties=("SOCIAL_SERVICES", "PSYCHIATRY", "PSYCHIATRY")),
            RuleViolation,
            "parties-duplicated",
        ),
        (
            CONSENTED,
            agree_plan(parties=("SOCIAL_SERVICES",), lead="SOCIAL_SERVICES"),
            RuleViolation,
            "parties-too-few",
        ),
        (
            CONSENTED,
            agree_plan(parties=("PRIMARY_CARE", "PSYCHIATRY")),
            RuleViolation,
            "parties-too-few",
        ),
        (CONSENTED, agree_plan(lead="THE_MAYOR"), RuleViolation, "unknown-party"),
        (CONSENTED, agree_plan(lead="ADDICTION_CARE"), RuleViolation, "lead-not-a-party"),
        (
            CONSENTED,
            agree_plan(follow_up_on=TODAY - timedelta(days=1)),
            RuleViolation,
            "follow-up-date-in-past",
        ),
        (CONSENTED, agree_plan(consent_id="yes"), RuleViolation, "invalid-id"),
        (OPEN, agree_plan(), RuleViolation, "consent-not-in-force"),
        ((*CONSENTED, withdrawn()), agree_plan(), RuleViolation, "consent-not-in-force"),
        (
            (*OPEN, consented(valid_until=TODAY - timedelta(days=1))),
            agree_plan(),
            RuleViolation,
            "consent-not-in-force",
        ),
        (
            (*OPEN, consented(recipients=("NON_PROFIT", "PRISON_PROBATION"))),
            agree_plan(),
            RuleViolation,
            "consent-not-covering",
        ),
    ],
)
def test_agreeing_a_plan_is_refused(
    history: tuple[DomainEvent, ...], command: AgreeCoordinatedPlan, error: type, code: str
) -> None:
    given(*history).when(command).then_raises(error, code)


def test_a_consent_valid_through_the_day_of_the_plan_is_in_force() -> None:
    history = (*OPEN, consented(valid_until=TODAY))
    given(*history).when(agree_plan()).then(plan_agreed())


def test_a_plan_is_followed_up_once() -> None:
    given(*AGREED).when(follow_up_plan()).then(plan_followed_up())
    assert d.fold([*AGREED, plan_followed_up()]).coordinated_plans == {SIP: (NOW, True)}
    given(*AGREED, plan_followed_up()).when(follow_up_plan()).then_raises(
        RuleViolation, "coordinated-plan-already-followed-up"
    )


@pytest.mark.parametrize(
    ("history", "command", "error", "code"),
    [
        ((), follow_up_plan(), CaseNotFound, "case-not-found"),
        (CONSENTED, follow_up_plan(), CoordinatedPlanNotFound, "coordinated-plan-not-found"),
        (
            AGREED,
            follow_up_plan(plan_id=OTHER_ID),
            CoordinatedPlanNotFound,
            "coordinated-plan-not-found",
        ),
        ((*AGREED, closed(LATER)), follow_up_plan(), RuleViolation, "case-closed"),
        (
            AGREED,
            follow_up_plan(occurred_at=NOW - timedelta(hours=1)),
            RuleViolation,
            "follow-up-before-agreement",
        ),
    ],
)
def test_following_up_a_plan_is_refused(
    history: tuple[DomainEvent, ...], command: FollowUpCoordinatedPlan, error: type, code: str
) -> None:
    given(*history).when(command).then_raises(error, code)


def test_a_follow_up_needs_no_consent_still_in_force() -> None:
    # The plan was agreed under a consent; its follow-up is part of that plan.
    given(*AGREED, withdrawn(at=NOW)).when(follow_up_plan()).then(plan_followed_up())


def test_the_care_chain_events_carry_no_personal_field() -> None:
    from likvard.codec import Catalogue
    from likvard.sealing import personal_fields

    catalogue = Catalogue.load()
    new = (
        "InvestigationOpened",
        "InvestigationDecided",
        "FirstVisitHeld",
        "CoordinatedPlanAgreed",
        "CoordinatedPlanFollowedUp",
    )
    assert {t: personal_fields(catalogue, t) for t in new} == dict.fromkeys(new, ())
    assert personal_fields(catalogue, "IntakeRegistered") == ("birth_year",)  # not gender


@pytest.mark.parametrize(
    ("symbols", "enum"),
    [
        (d.GENDERS, "Gender"),
        (d.INVESTIGATION_BASES, "InvestigationBasis"),
        (d.INVESTIGATION_DECISIONS, "InvestigationDecision"),
        (d.INTERVENTION_KINDS, "InterventionKind"),
        (d.PARTIES, "Party"),
    ],
)
def test_the_domain_symbols_are_the_schema_symbols(symbols: frozenset[str], enum: str) -> None:
    from likvard.codec import Catalogue

    catalogue = Catalogue.load()
    found = [
        set(named["symbols"])
        for event_type in d.EVENT_TYPES
        for name, named in catalogue.reader(event_type).parsed["__named_schemas"].items()
        if name == f"se.goteborg.likvard.intake.{enum}"
    ]
    assert found and all(s == symbols for s in found)
