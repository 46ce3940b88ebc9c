"""District systems' intake events: given these events, when this district event is
ingested, then these events (or this refusal). The intake decider judges them with the
rules of the HTTP API, and `check_matches` holds the district system to what Likvärd
derives (a transfer's from_district). Pure: no database, no Kafka."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from likvard.districts import DistrictRegistry
from likvard.domain import age_band
from likvard.inbox import Incoming
from likvard.ingest import Rejected, StreamView
from likvard.known_cases import KnownCase
from services.intake import domain as d
from services.intake.domain import DomainEvent
from services.intake.ingest import IntakeRules
from tests.support import district_incoming, judged, refused_by

DISTRICTS = DistrictRegistry.load()

RULES = IntakeRules(DISTRICTS)

CASE = "6f1c2a9e-4b7d-4c1e-9a3f-0d2b8e5c7a10"
EVENT_ID = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"
PERSON = hashlib.sha256(b"a keyed pseudonym").hexdigest()
PNR = "19121212-1212"
ASSESSMENT = "0b7e4f6a-1c2d-4e3f-8a9b-0c1d2e3f4a5b"
PLAN = "1c8f5a7b-2d3e-4f40-9b1c-1d2e3f4a5b6c"
CONSENT = "2d9a6b8c-3e4f-4051-8c2d-2e3f4a5b6c7d"
INVESTIGATION = "4a1c7e2b-5d3f-4e6a-8b9c-0d1e2f3a4b5c"
VISIT = "5b2d8f3c-6e4a-4f7b-9c0d-1e2f3a4b5c6d"
SIP = "6c3e9a4d-7f5b-4a8c-8d1e-2f3a4b5c6d7e"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
T1 = T0 + timedelta(days=7)


# --- payloads, as fastavro decodes them ---------------------------------------------
def registration(**data: Any) -> dict[str, Any]:
    """A v3 registration as sent; its age band is the birth year's in 2026 unless given."""
    payload = {
        "person": PERSON,
        "district": "nordost",
        "substances": ["ALCOHOL", "GAMBLING"],
        "referral_source": "HEALTHCARE",
        "children_in_household": "YES",
        "birth_year": 1975,
        "archive_sample": False,
        "gender": "NOT_STATED",
        **data,
    }
    payload.setdefault("age_band", age_band(payload["birth_year"], 2026))
    return payload


def assessment(assessment_id: str = ASSESSMENT, total: int = 21) -> dict[str, Any]:
    return {
        "assessment_id": assessment_id,
        "instrument": "AUDIT",
        "scores": [{"scale": "total", "value": total}],
        "need_level": "HIGH",
    }


def care_plan(
    review_on: date | None = date(2026, 6, 1),
    goals: Sequence[str] = ("Sleep through the night", "Back at work by summer"),
) -> dict[str, Any]:
    return {
        "plan_id": PLAN,
        "goals": list(goals),
        "person_participated": True,
        "review_on": review_on,
    }


def consent(recipients: Sequence[str] = ("HEALTHCARE",)) -> dict[str, Any]:
    return {
        "consent_id": CONSENT,
        "recipients": list(recipients),
        "valid_until": date(2026, 12, 31),
    }


def transfer(from_district: str = "nordost", to_district: str = "centrum") -> dict[str, Any]:
    return {"from_district": from_district, "to_district": to_district, "reason": "PERSON_MOVED"}


def opened(basis: str = "APPLICATION") -> dict[str, Any]:
    return {"investigation_id": INVESTIGATION, "basis": basis}


def decision(verdict: str = "GRANTED", kinds: Sequence[str] = ("OUTPATIENT",)) -> dict[str, Any]:
    return {
        "investigation_id": INVESTIGATION,
        "decision": verdict,
        "intervention_kinds": list(kinds),
    }


def sip(**data: Any) -> dict[str, Any]:
    return {
        "plan_id": SIP,
        "parties": ["SOCIAL_SERVICES", "ADDICTION_CARE"],
        "lead": "SOCIAL_SERVICES",
        "follow_up_on": date(2026, 5, 4),
        "consent_id": CONSENT,
        **data,
    }


# --- given, when, then ----------------------------------------------------------------
def event(event_type: str, data: dict[str, Any], at: datetime = T0) -> DomainEvent:
    """An event already in the case's stream."""
    return DomainEvent(event_type, data, at)


def registered(**data: Any) -> DomainEvent:
    return event("IntakeRegistered", registration(**data))


def closed() -> DomainEvent:
    return event("CaseClosed", {"reason": "GOALS_REACHED"})


def given(*events: DomainEvent) -> StreamView:
    """The case's stream as the ingest processor shows it to the rules."""
    return StreamView(d.fold(events), len(events), CASE if events else None)


def district_event(
    event_type: str, data: dict[str, Any], at: datetime = T1, case_id: str = CASE
) -> Incoming:
    """A district system's event as `open_envelope` hands it over."""
    return district_incoming(event_type, data, case_id=case_id, at=at, event_id=EVENT_ID)


def ingested(incoming: Incoming, stream: StreamView) -> list[DomainEvent]:
    return judged(RULES, incoming, stream, None)


def refusal(incoming: Incoming, stream: StreamView) -> Rejected:
    return refused_by(RULES, incoming, stream, None)


def itself(incoming: Incoming) -> list[DomainEvent]:
    """The events that say the district system's event was accepted as it was sent."""
    return [DomainEvent(incoming.event_type, incoming.data, incoming.metadata["occurred_at"])]


# --- every event type is accepted as sent -----------------------------------------------
@dataclass(frozen=True)
class Accepted:
    history: tuple[DomainEvent, ...]
    event_type: str
    data: dict[str, Any]


ACCEPTED = [
    Accepted((), "IntakeRegistered", registration()),
    Accepted((), "IntakeRegistered", registration(birth_year=None, district="hisingen")),
    Accepted((registered(),), "AssessmentCompleted", assessment()),
    Accepted((registered(),), "CarePlanAgreed", care_plan()),
    Accepted((registered(),), "CarePlanAgreed", care_plan(review_on=None)),
    Accepted((registered(),), "ConsentRecorded", consent(("HEALTHCARE", "NON_PROFIT"))),
    Accepted(
        (registered(), event("ConsentRecorded", consent())),
        "ConsentWithdrawn",
        {"consent_id": CONSENT},
    ),
    # A person may always withdraw a consent, even on a closed case.
    Accepted(
        (registered(), event("ConsentRecorded", consent()), closed()),
        "ConsentWithdrawn",
        {"consent_id": CONSENT},
    ),
    Accepted((registered(),), "CaseTransferred", transfer()),
    Accepted(
        (registered(), event("CaseTransferred", transfer())),
        "CaseTransferred",
        transfer("centrum", "hisingen"),
    ),
    Accepted((registered(),), "CaseClosed", {"reason": "MOVED_OUT_OF_CITY"}),
    Accepted((registered(), closed()), "CaseReopened", {"reason": "RELAPSE"}),
    Accepted((), "IntakeRegistered", registration(gender="WOMAN")),
    Accepted((registered(),), "InvestigationOpened", opened()),
    Accepted((registered(),), "InvestigationOpened", opened("REPORT_OF_CONCERN")),
    Accepted(
        (registered(), event("InvestigationOpened", opened())), "InvestigationDecided", decision()
    ),
    Accepted(
        (registered(), event("InvestigationOpened", opened())),
        "InvestigationDecided",
        decision("REFUSED", ()),
    ),
    Accepted((registered(),), "FirstVisitHeld", {"visit_id": VISIT}),
    Accepted((registered(), event("ConsentRecorded", consent())), "CoordinatedPlanAgreed", sip()),
    Accepted(
        (registered(), event("ConsentRecorded", consent()), event("CoordinatedPlanAgreed", sip())),
        "CoordinatedPlanFollowedUp",
        {"plan_id": SIP},
    ),
]


@pytest.mark.parametrize(
    "case", ACCEPTED, ids=[f"{n}-{a.event_type}" for n, a in enumerate(ACCEPTED)]
)
def test_a_district_event_that_keeps_the_rules_is_stored_as_sent(case: Accepted) -> None:
    incoming = district_event(case.event_type, case.data)
    assert ingested(incoming, given(*case.history)) == itself(incoming)


def test_every_intake_event_type_can_be_ingested_but_an_erasure() -> None:
    assert {a.event_type for a in ACCEPTED} == set(d.EVENT_TYPES) - {"PersonalDataErased"}


def test_a_district_cannot_send_an_erasure() -> None:
    erasure = {"legal_basis": "ERASURE_REQUEST", "key_ids": [CONSENT]}
    incoming = district_event("PersonalDataErased", erasure)
    assert refusal(incoming, given(registered())).code == "not-a-district-event"


def test_an_ingested_event_changes_the_case_as_one_from_the_api_does() -> None:
    history = [registered()]
    incoming = district_event("CaseTransferred", transfer())

    state = d.fold([*history, *ingested(incoming, given(*history))])

    assert state.district == "centrum"
    assert state.version == 2


# --- refusals -------------------------------------------------------------------------
@dataclass(frozen=True)
class Refused:
    history: tuple[DomainEvent, ...]
    event_type: str
    data: dict[str, Any]
    code: str
    secret: str | None = None
    """A value sent that must not appear in the reason."""
    at: datetime = T1


REFUSED = [
    Refused((), "AssessmentCompleted", assessment(), "case-not-found"),
    Refused((), "CaseClosed", {"reason": "OTHER"}, "case-not-found"),
    Refused((), "ConsentWithdrawn", {"consent_id": CONSENT}, "case-not-found"),
    Refused((registered(), closed()), "AssessmentCompleted", assessment(), "case-closed"),
    Refused((registered(), closed()), "CarePlanAgreed", care_plan(), "case-closed"),
    Refused((registered(), closed()), "CaseTransferred", transfer(), "case-closed"),
    Refused((registered(),), "IntakeRegistered", registration(), "case-already-exists"),
    Refused(
        (registered(),),
        "IntakeRegistered",
        registration(person=hashlib.sha256(b"someone else").hexdigest()),
        "case-already-exists",
    ),
    Refused((), "IntakeRegistered", registration(person=PNR), "person-not-pseudonym", PNR),
    Refused(
        (),
        "IntakeRegistered",
        registration(person="Anna Andersson"),
        "person-not-pseudonym",
        "Anna Andersson",
    ),
    Refused((), "IntakeRegistered", registration(person=PERSON.upper()), "person-not-pseudonym"),
    Refused(
        (),
        "IntakeRegistered",
        registration(person="191212121212".ljust(64, "0")),
        "person-not-pseudonym",
        "191212121212",
    ),
    Refused(
        (), "IntakeRegistered", registration(district="atlantis"), "unknown-district", "atlantis"
    ),
    # Angered was reorganised into Nordost in 2021: not a district to register in now.
    Refused((), "IntakeRegistered", registration(district="angered"), "district-not-valid"),
    Refused((), "IntakeRegistered", registration(birth_year=2015), "birth-year-out-of-range"),
    Refused((), "IntakeRegistered", registration(substances=[]), "substances-empty"),
    Refused(
        (registered(), event("AssessmentCompleted", assessment())),
        "AssessmentCompleted",
        assessment(),
        "assessment-id-used",
    ),
    Refused((registered(),), "AssessmentCompleted", assessment(total=41), "invalid-scores"),
    Refused(
        (registered(),),
        "CarePlanAgreed",
        care_plan(review_on=date(2026, 3, 1)),
        "review-date-in-past",
    ),
    Refused((registered(),), "ConsentRecorded", consent(()), "consent-recipients-empty"),
    Refused((registered(),), "ConsentWithdrawn", {"consent_id": CONSENT}, "consent-not-found"),
    Refused(
        (
            registered(),
            event("ConsentRecorded", consent()),
            event("ConsentWithdrawn", {"consent_id": CONSENT}),
        ),
        "ConsentWithdrawn",
        {"consent_id": CONSENT},
        "consent-already-withdrawn",
    ),
    # The district system's idea of where the case was is not Likvärd's.
    Refused(
        (registered(),),
        "CaseTransferred",
        transfer(from_district="sydvast"),
        "derived-fields-differ",
        "sydvast",
    ),
    Refused(
        (registered(), event("CaseTransferred", transfer())),
        "CaseTransferred",
        transfer("nordost", "hisingen"),
        "derived-fields-differ",
    ),
    Refused((registered(),), "CaseTransferred", transfer("nordost", "nordost"), "same-district"),
    Refused(
        (registered(),), "CaseTransferred", transfer("nordost", "lundby"), "district-not-valid"
    ),
    Refused(
        (registered(),), "CaseTransferred", transfer("nordost", "atlantis"), "unknown-district"
    ),
    Refused((registered(), closed()), "CaseClosed", {"reason": "OTHER"}, "case-already-closed"),
    Refused((registered(),), "CaseClosed", {"reason": "FINISHED"}, "unknown-close-reason"),
    Refused((registered(),), "CaseReopened", {"reason": "RELAPSE"}, "case-not-closed"),
    Refused((), "IntakeRegistered", registration(gender="KVINNA"), "unknown-gender", "KVINNA"),
    Refused((), "InvestigationOpened", opened(), "case-not-found"),
    Refused((registered(), closed()), "InvestigationOpened", opened(), "case-closed"),
    Refused(
        (registered(), event("InvestigationOpened", opened())),
        "InvestigationOpened",
        {**opened(), "investigation_id": VISIT},
        "investigation-already-open",
    ),
    Refused((registered(),), "InvestigationDecided", decision(), "investigation-not-found"),
    Refused(
        (registered(), event("InvestigationOpened", opened())),
        "InvestigationDecided",
        decision("REFUSED", ("HOUSING",)),
        "refused-with-interventions",
    ),
    Refused(
        (registered(), event("InvestigationOpened", opened())),
        "InvestigationDecided",
        decision("GRANTED", ()),
        "intervention-kinds-empty",
    ),
    Refused(
        (registered(), event("InvestigationOpened", opened())),
        "InvestigationDecided",
        decision(),
        "decision-before-opening",
        at=T0 - timedelta(days=1),
    ),
    Refused(
        (registered(), event("FirstVisitHeld", {"visit_id": VISIT})),
        "FirstVisitHeld",
        {"visit_id": SIP},
        "first-visit-already-held",
    ),
    Refused(
        (registered(),),
        "FirstVisitHeld",
        {"visit_id": VISIT},
        "first-visit-before-intake",
        at=T0 - timedelta(hours=1),
    ),
    Refused((registered(),), "CoordinatedPlanAgreed", sip(), "consent-not-in-force"),
    Refused(
        (registered(), event("ConsentRecorded", consent(("NON_PROFIT",)))),
        "CoordinatedPlanAgreed",
        sip(),
        "consent-not-covering",
    ),
    Refused(
        (registered(), event("ConsentRecorded", consent())),
        "CoordinatedPlanAgreed",
        sip(lead="PSYCHIATRY"),
        "lead-not-a-party",
    ),
    Refused(
        (registered(), event("ConsentRecorded", consent())),
        "CoordinatedPlanAgreed",
        sip(parties=["SOCIAL_SERVICES"]),
        "parties-too-few",
    ),
    Refused(
        (registered(),),
        "CoordinatedPlanFollowedUp",
        {"plan_id": SIP},
        "coordinated-plan-not-found",
    ),
]


@pytest.mark.parametrize("case", REFUSED, ids=[f"{r.code}-{r.event_type}" for r in REFUSED])
def test_a_district_event_that_breaks_a_rule_is_refused(case: Refused) -> None:
    rejected = refusal(district_event(case.event_type, case.data, case.at), given(*case.history))

    assert (rejected.stage, rejected.code) == ("rule", case.code)
    if case.secret is not None:
        assert case.secret not in rejected.reason


def test_a_mismatch_names_the_field_it_is_about() -> None:
    rejected = refusal(
        district_event("CaseTransferred", transfer(from_district="sydvast")), given(registered())
    )
    assert "from_district" in rejected.reason


def test_a_registration_without_a_gender_is_taken_as_not_stated() -> None:
    # Decoded from a v1 or v2 record the gender is the reader's default; a record handed
    # over without one at all is stored as not stated, never refused.
    data = {k: v for k, v in registration().items() if k != "gender"}
    (stored,) = ingested(district_event("IntakeRegistered", data), given())
    assert stored.data["gender"] == "NOT_STATED"


def test_a_district_event_is_judged_by_when_it_happened() -> None:
    # Birth year 2008: an adult in 2026, not in 2025 (the event's time, not the clock).
    data = registration(birth_year=2008)
    at_2026 = district_event("IntakeRegistered", data, at=T1)
    at_2025 = district_event("IntakeRegistered", data, at=datetime(2025, 6, 1, tzinfo=UTC))

    assert ingested(at_2026, given()) == itself(at_2026)
    assert refusal(at_2025, given()).code == "birth-year-out-of-range"


# --- the rules' wiring ------------------------------------------------------------------
def test_the_stream_is_the_case_and_intake_needs_no_known_case() -> None:
    incoming = district_event("CaseClosed", {"reason": "OTHER"})

    assert RULES.service == "intake"
    assert RULES.stream_id(incoming) == CASE
    assert RULES.needs_case(incoming) is False


def test_the_district_is_the_cases_own_after_the_event() -> None:
    incoming = district_event("CaseTransferred", transfer())
    known = KnownCase(CASE, "sydvast", "open", 4)
    # None: the service's district_of (the case's district after the event) applies.
    assert RULES.district(incoming, given(registered()).state, known) is None


def test_an_event_of_another_service_is_not_an_intake_command() -> None:
    incoming = district_event("ReferralAccepted", {"referral_id": CASE, "planned_start": None})
    with pytest.raises(ValueError):
        RULES.decide(incoming, given(registered()), None)


def test_a_district_may_leave_the_age_band_to_likvard() -> None:
    # An older district system sends no age band (v1): Likvärd derives it.
    incoming = district_event("IntakeRegistered", registration(age_band=None), at=T1)
    (event,) = ingested(incoming, given())
    assert event.data["age_band"] == "45-54" and event.data["birth_year"] == 1975
    wrong = district_event("IntakeRegistered", registration(age_band="18-24"), at=T1)
    assert refusal(wrong, given()).code == "age-band-mismatch"


def test_the_archive_sample_flag_a_district_sends_is_kept() -> None:
    incoming = district_event("IntakeRegistered", registration(archive_sample=True), at=T1)
    assert ingested(incoming, given()) == itself(incoming)


def test_a_care_plan_goal_with_an_identity_number_is_refused() -> None:
    plan = care_plan(goals=["Ring 19121212-1212"])
    rejected = refusal(district_event("CarePlanAgreed", plan), given(registered()))
    assert rejected.code == "identity-number-in-free-text"
    assert "1212" not in rejected.reason


def test_a_redelivery_compares_equal_to_the_sealed_stored_event() -> None:
    sent = {**registration(age_band=None), "personal": None}
    stored = {**registration(), "birth_year": 1975, "personal": "open"}
    assert RULES.same_data(sent, stored)
    assert not RULES.same_data({**sent, "district": "centrum"}, stored)
    # Once the key is destroyed, the sealed fields can no longer be compared.
    erased = {**stored, "birth_year": None, "personal": "erased"}
    assert RULES.same_data(sent, erased)
    assert not RULES.same_data({**sent, "substances": ["ALCOHOL"]}, erased)


def test_the_sealed_fields_are_the_contracts() -> None:
    from likvard.codec import Catalogue
    from likvard.sealing import personal_fields
    from services.intake.ingest import SEALED_FIELDS

    catalogue = Catalogue.load()
    contract = {f for t in d.EVENT_TYPES for f in personal_fields(catalogue, t)}
    assert contract == SEALED_FIELDS
