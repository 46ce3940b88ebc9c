"""District systems' referral events: given this referral's events and what the service
knows of the case, when this district event is ingested, then these events (or this
refusal). The referral decider judges them with the rules of the HTTP API, and
`check_matches` holds the district system to what Likvärd derives (districts, recipient
kind, guideline priority, an intervention's start). Pure: no database, no Kafka."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from likvard.catalogue import ReferenceCatalogue
from likvard.inbox import Incoming
from likvard.ingest import Rejected, StreamView
from likvard.known_cases import KnownCase
from services.referral import domain as d
from services.referral.domain import DomainEvent
from services.referral.ingest import ReferralRules
from tests.support import district_incoming, judged, refused_by

CATALOGUE = ReferenceCatalogue.load(on=date(2026, 3, 9))

RULES = ReferralRules(CATALOGUE)

CASE = "6f1c2a9e-4b7d-4c1e-9a3f-0d2b8e5c7a10"
OTHER_CASE = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
EVENT_ID = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"
REFERRAL = "7a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"
CONSENT = "2d9a6b8c-3e4f-4051-8c2d-2e3f4a5b6c7d"
INTERVENTION = "8b3c4d5e-6f70-4b2c-9d3e-4f5a6b7c8d9e"
SECOND = "9c4d5e6f-7081-4c3d-8e4f-5a6b7c8d9e0f"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
STARTED = datetime(2026, 3, 4, 10, 0, tzinfo=UTC)
T1 = datetime(2026, 3, 9, 12, 0, tzinfo=UTC)

# Real units of the city's reference data.
CITY_NORDOST = "nordost-alkoholmottagning"  # nordost, city social services
CITY_CENTRUM = "centrum-beroendeteam"  # centrum, city social services
REGION = "region-beroendevard"  # centrum, healthcare
PROBATION = "kriminalvarden-frivard-goteborg"  # hisingen, prison and probation
NON_PROFIT = "ideell-tolvsteg-nordost"  # nordost, non-profit

OPEN = KnownCase(CASE, "nordost", "open", 3, {CONSENT: (("HEALTHCARE", "NON_PROFIT"), None)})


# --- payloads, as fastavro decodes them ---------------------------------------------
def request(
    unit_id: str = CITY_NORDOST,
    intervention_code: str = "relapse-prevention-alcohol",
    *,
    person_district: str = "nordost",
    unit_district: str = "nordost",
    recipient_kind: str = "CITY_SOCIAL_SERVICES",
    consent_id: str | None = None,
    consent_override: str | None = None,
) -> dict[str, Any]:
    return {
        "referral_id": REFERRAL,
        "unit_id": unit_id,
        "intervention_code": intervention_code,
        "person_district": person_district,
        "unit_district": unit_district,
        "recipient_kind": recipient_kind,
        "consent_id": consent_id,
        "consent_override": consent_override,
    }


def acceptance(planned_start: date | None = date(2026, 3, 16)) -> dict[str, Any]:
    return {"referral_id": REFERRAL, "planned_start": planned_start}


def start(
    intervention_id: str = INTERVENTION,
    code: str = "relapse-prevention-alcohol",
    priority: int | None = 2,
    unit_id: str = CITY_NORDOST,
) -> dict[str, Any]:
    return {
        "intervention_id": intervention_id,
        "referral_id": REFERRAL,
        "intervention_code": code,
        "unit_id": unit_id,
        "guideline_priority": priority,
    }


def end(
    code: str = "relapse-prevention-alcohol",
    started_at: datetime = STARTED,
    outcome: str = "COMPLETED_AS_PLANNED",
) -> dict[str, Any]:
    return {
        "intervention_id": INTERVENTION,
        "referral_id": REFERRAL,
        "intervention_code": code,
        "started_at": started_at,
        "outcome": outcome,
    }


# --- given, when, then ----------------------------------------------------------------
def requested(**data: Any) -> DomainEvent:
    return DomainEvent("ReferralRequested", request(**data), T0)


def accepted() -> DomainEvent:
    return DomainEvent("ReferralAccepted", acceptance(), T0 + timedelta(hours=1))


def started() -> DomainEvent:
    return DomainEvent("InterventionStarted", start(), STARTED)


def given(*events: DomainEvent, case_id: str = CASE) -> StreamView:
    """The referral's stream as the ingest processor shows it to the rules (its case is the
    one in its first event's metadata)."""
    return StreamView(d.fold(events), len(events), case_id if events else None)


def district_event(
    event_type: str, data: dict[str, Any], at: datetime = T1, case_id: str = CASE
) -> Incoming:
    """A district system's event as `open_envelope` hands it over."""
    return district_incoming(event_type, data, case_id=case_id, at=at, event_id=EVENT_ID)


def ingested(
    incoming: Incoming, stream: StreamView, case: KnownCase | None = OPEN
) -> list[DomainEvent]:
    return judged(RULES, incoming, stream, case)


def refusal(incoming: Incoming, stream: StreamView, case: KnownCase | None = OPEN) -> Rejected:
    return refused_by(RULES, incoming, stream, case)


def itself(incoming: Incoming) -> DomainEvent:
    return DomainEvent(incoming.event_type, incoming.data, incoming.metadata["occurred_at"])


def across(from_district: str, to_district: str, unit_id: str) -> DomainEvent:
    return DomainEvent(
        "ReferredAcrossDistrict",
        {
            "referral_id": REFERRAL,
            "unit_id": unit_id,
            "from_district": from_district,
            "to_district": to_district,
        },
        T1,
    )


# --- accepted as sent -----------------------------------------------------------------
@dataclass(frozen=True)
class Accepted:
    history: tuple[DomainEvent, ...]
    event_type: str
    data: dict[str, Any]
    case: KnownCase | None = OPEN
    also: tuple[DomainEvent, ...] = field(default=())
    """What Likvärd derives after the event itself."""


ACCEPTED = [
    Accepted((), "ReferralRequested", request()),
    Accepted(
        (),
        "ReferralRequested",
        request(CITY_CENTRUM, unit_district="centrum"),
        also=(across("nordost", "centrum", CITY_CENTRUM),),
    ),
    Accepted(
        (),
        "ReferralRequested",
        request(
            REGION,
            "acamprosate",
            unit_district="centrum",
            recipient_kind="HEALTHCARE",
            consent_id=CONSENT,
        ),
        also=(across("nordost", "centrum", REGION),),
    ),
    Accepted(
        (),
        "ReferralRequested",
        request(
            REGION,
            "naltrexone",
            unit_district="centrum",
            recipient_kind="HEALTHCARE",
            consent_override="RISK_TO_LIFE_OR_HEALTH",
        ),
        case=KnownCase(CASE, "nordost", "open", 1),
        also=(across("nordost", "centrum", REGION),),
    ),
    Accepted(
        (),
        "ReferralRequested",
        request(
            NON_PROFIT,
            "twelve-step-facilitation",
            recipient_kind="NON_PROFIT",
            consent_id=CONSENT,
        ),
    ),
    # A case that moved to Hisingen is referred from Hisingen.
    Accepted(
        (),
        "ReferralRequested",
        request(CITY_NORDOST, person_district="hisingen"),
        case=KnownCase(CASE, "hisingen", "open", 5),
        also=(across("hisingen", "nordost", CITY_NORDOST),),
    ),
    Accepted((requested(),), "ReferralAccepted", acceptance()),
    Accepted((requested(),), "ReferralAccepted", acceptance(planned_start=None)),
    Accepted((requested(),), "ReferralDeclined", {"referral_id": REFERRAL, "reason": "OTHER"}),
    Accepted(
        (requested(), accepted()),
        "ReferralWithdrawn",
        {"referral_id": REFERRAL, "reason": "NO_LONGER_NEEDED"},
    ),
    Accepted((requested(), accepted()), "InterventionStarted", start()),
    # An unverified guideline priority is never recorded.
    Accepted((requested(), accepted()), "InterventionStarted", start(code="met", priority=None)),
    Accepted((requested(), accepted(), started()), "InterventionEnded", end()),
    # Follow-up events of a referral need no known case: the referral stream suffices.
    Accepted((requested(), accepted(), started()), "InterventionEnded", end(), case=None),
]


@pytest.mark.parametrize(
    "case", ACCEPTED, ids=[f"{n}-{a.event_type}" for n, a in enumerate(ACCEPTED)]
)
def test_a_district_event_that_keeps_the_rules_is_stored_as_sent(case: Accepted) -> None:
    incoming = district_event(case.event_type, case.data)

    decided = ingested(incoming, given(*case.history), case.case)

    assert decided == [itself(incoming), *case.also]


def test_every_referral_event_a_district_system_sends_can_be_ingested() -> None:
    sent = {a.event_type for a in ACCEPTED}
    assert sent == set(d.EVENT_TYPES) - {"ReferredAcrossDistrict"}


def test_a_cross_district_referral_is_recorded_as_such() -> None:
    incoming = district_event("ReferralRequested", request(CITY_CENTRUM, unit_district="centrum"))

    state = d.fold(ingested(incoming, given()))

    assert state.across_district is True
    assert (state.person_district, state.unit_district) == ("nordost", "centrum")


# --- refused --------------------------------------------------------------------------
@dataclass(frozen=True)
class Refused:
    history: tuple[DomainEvent, ...]
    event_type: str
    data: dict[str, Any]
    code: str
    case: KnownCase | None = OPEN
    case_id: str = CASE
    at: datetime = T1


HEALTHCARE = {"unit_district": "centrum", "recipient_kind": "HEALTHCARE"}

REFUSED = [
    # What the service knows of the case.
    Refused((), "ReferralRequested", request(), "case-not-found", case=None),
    Refused((), "ReferralRequested", request(), "case-not-found", case=KnownCase(CASE)),
    Refused(
        (),
        "ReferralRequested",
        request(),
        "case-not-found",
        case=KnownCase(OTHER_CASE, "nordost", "open", 1),
    ),
    Refused(
        (),
        "ReferralRequested",
        request(),
        "case-closed",
        case=KnownCase(CASE, "nordost", "closed", 4),
    ),
    # Likvärd's own conclusion is not for district systems to send.
    Refused(
        (requested(),),
        "ReferredAcrossDistrict",
        {
            "referral_id": REFERRAL,
            "unit_id": CITY_CENTRUM,
            "from_district": "nordost",
            "to_district": "centrum",
        },
        "derived-event",
    ),
    Refused(
        (),
        "ReferredAcrossDistrict",
        {
            "referral_id": REFERRAL,
            "unit_id": CITY_CENTRUM,
            "from_district": "nordost",
            "to_district": "centrum",
        },
        "derived-event",
    ),
    # One referral, one case.
    Refused(
        (requested(),),
        "ReferralAccepted",
        acceptance(),
        "referral-of-another-case",
        case_id=OTHER_CASE,
    ),
    Refused(
        (requested(),),
        "ReferralRequested",
        request(),
        "referral-of-another-case",
        case=KnownCase(OTHER_CASE, "nordost", "open", 1),
        case_id=OTHER_CASE,
    ),
    Refused((requested(),), "ReferralRequested", request(), "referral-already-exists"),
    # The catalogue.
    Refused((), "ReferralRequested", request("no-such-unit"), "unknown-unit"),
    Refused((), "ReferralRequested", request(CITY_NORDOST, "no-such-code"), "unknown-intervention"),
    Refused(
        (), "ReferralRequested", request(CITY_NORDOST, "acamprosate"), "intervention-not-offered"
    ),
    # Consent, Primero style, for a unit outside the city's social services.
    Refused(
        (), "ReferralRequested", request(REGION, "acamprosate", **HEALTHCARE), "consent-required"
    ),
    Refused(
        (),
        "ReferralRequested",
        request(REGION, "acamprosate", consent_id=SECOND, **HEALTHCARE),
        "consent-not-in-force",
    ),
    Refused(
        (),
        "ReferralRequested",
        request(REGION, "acamprosate", consent_id=CONSENT, **HEALTHCARE),
        "consent-not-in-force",
        case=KnownCase(CASE, "nordost", "open", 3, {CONSENT: (("HEALTHCARE",), "2026-03-01")}),
    ),
    Refused(
        (),
        "ReferralRequested",
        request(REGION, "acamprosate", consent_id=CONSENT, **HEALTHCARE),
        "consent-not-covering",
        case=KnownCase(CASE, "nordost", "open", 3, {CONSENT: (("NON_PROFIT",), None)}),
    ),
    Refused(
        (),
        "ReferralRequested",
        request(
            PROBATION,
            "cbt",
            unit_district="hisingen",
            recipient_kind="PRISON_PROBATION",
            consent_id=CONSENT,
        ),
        "consent-not-covering",
    ),
    Refused(
        (),
        "ReferralRequested",
        request(
            REGION,
            "acamprosate",
            consent_id=CONSENT,
            consent_override="LEGAL_DUTY_TO_REPORT",
            **HEALTHCARE,
        ),
        "consent-and-override",
    ),
    Refused((), "ReferralRequested", request(consent_id=CONSENT), "consent-not-needed"),
    Refused((), "ReferralRequested", request(consent_override="OTHER"), "consent-not-needed"),
    # Fields Likvärd derives from the case and the catalogue.
    Refused((), "ReferralRequested", request(person_district="centrum"), "derived-fields-differ"),
    Refused((), "ReferralRequested", request(unit_district="centrum"), "derived-fields-differ"),
    Refused((), "ReferralRequested", request(recipient_kind="HEALTHCARE"), "derived-fields-differ"),
    Refused(
        (),
        "ReferralRequested",
        request(CITY_CENTRUM, unit_district="nordost"),
        "derived-fields-differ",
    ),
    Refused(
        (requested(), accepted()),
        "InterventionStarted",
        start(priority=1),
        "derived-fields-differ",
    ),
    Refused(
        (requested(), accepted()),
        "InterventionStarted",
        start(code="met", priority=3),
        "derived-fields-differ",
    ),
    Refused(
        (requested(), accepted()),
        "InterventionStarted",
        start(unit_id=CITY_CENTRUM),
        "derived-fields-differ",
    ),
    Refused(
        (requested(), accepted(), started()),
        "InterventionEnded",
        end(started_at=STARTED + timedelta(seconds=1)),
        "derived-fields-differ",
    ),
    Refused(
        (requested(), accepted(), started()),
        "InterventionEnded",
        end(code="met"),
        "derived-fields-differ",
    ),
    # The referral's own life cycle.
    Refused((), "ReferralAccepted", acceptance(), "referral-not-found"),
    Refused((), "InterventionEnded", end(), "referral-not-found"),
    Refused((requested(), accepted()), "ReferralAccepted", acceptance(), "referral-not-requested"),
    Refused(
        (requested(),),
        "ReferralAccepted",
        acceptance(planned_start=date(2026, 3, 8)),
        "planned-start-in-past",
    ),
    Refused((requested(),), "InterventionStarted", start(), "referral-not-accepted"),
    Refused(
        (requested(), accepted(), started()),
        "InterventionStarted",
        start(SECOND),
        "intervention-running",
    ),
    Refused(
        (requested(), accepted(), started()),
        "ReferralWithdrawn",
        {"referral_id": REFERRAL, "reason": "OTHER"},
        "intervention-running",
    ),
    Refused((requested(), accepted()), "InterventionEnded", end(), "intervention-not-found"),
    Refused(
        (requested(), accepted(), started(), DomainEvent("InterventionEnded", end(), T1)),
        "InterventionEnded",
        end(),
        "intervention-already-ended",
    ),
    Refused(
        (requested(), accepted(), started()),
        "InterventionEnded",
        end(),
        "intervention-ends-before-start",
        at=STARTED - timedelta(minutes=1),
    ),
]


@pytest.mark.parametrize("case", REFUSED, ids=[f"{r.code}-{r.event_type}" for r in REFUSED])
def test_a_district_event_that_breaks_a_rule_is_refused(case: Refused) -> None:
    incoming = district_event(case.event_type, case.data, case.at, case.case_id)
    stream = given(*case.history)

    rejected = refusal(incoming, stream, case.case)

    assert (rejected.stage, rejected.code) == ("rule", case.code)


def test_a_mismatch_names_the_fields_but_not_their_values() -> None:
    incoming = district_event(
        "ReferralRequested", request(person_district="sydvast", unit_district="hisingen")
    )
    rejected = refusal(incoming, given())

    assert "person_district, unit_district" in rejected.reason
    assert "sydvast" not in rejected.reason
    assert "hisingen" not in rejected.reason


def test_an_unknown_case_is_one_to_retry_later() -> None:
    rejected = refusal(district_event("ReferralRequested", request()), given(), None)
    assert "retry" in rejected.reason


# --- consents are in force by the city's calendar ---------------------------------------
EXPIRING = KnownCase(CASE, "nordost", "open", 3, {CONSENT: (("HEALTHCARE",), "2026-03-09")})
BY_CONSENT = request(REGION, "acamprosate", consent_id=CONSENT, **HEALTHCARE)


def test_a_consent_is_in_force_to_the_end_of_its_last_day_in_gothenburg() -> None:
    # 22:30 UTC on 9 March is 23:30 in Gothenburg: still the consent's last day.
    incoming = district_event(
        "ReferralRequested", BY_CONSENT, at=datetime(2026, 3, 9, 22, 30, tzinfo=UTC)
    )
    assert ingested(incoming, given(), EXPIRING)[0] == itself(incoming)


def test_a_consent_has_expired_after_its_last_day_in_gothenburg() -> None:
    # 23:30 UTC on 9 March is 00:30 on 10 March in Gothenburg.
    incoming = district_event(
        "ReferralRequested", BY_CONSENT, at=datetime(2026, 3, 9, 23, 30, tzinfo=UTC)
    )
    assert refusal(incoming, given(), EXPIRING).code == "consent-not-in-force"


# --- the rules' wiring ------------------------------------------------------------------
def test_the_stream_is_the_referral() -> None:
    assert RULES.service == "referral"
    for event_type, data in [
        ("ReferralRequested", request()),
        ("ReferralAccepted", acceptance()),
        ("InterventionEnded", end()),
    ]:
        assert RULES.stream_id(district_event(event_type, data)) == REFERRAL


def test_only_a_request_needs_what_the_service_knows_of_the_case() -> None:
    assert RULES.needs_case(district_event("ReferralRequested", request())) is True
    assert RULES.needs_case(district_event("ReferralAccepted", acceptance())) is False
    assert RULES.needs_case(district_event("InterventionEnded", end())) is False


def test_the_district_is_the_persons_when_the_referral_was_made() -> None:
    incoming = district_event("ReferralAccepted", acceptance())
    state = given(requested()).state
    moved = KnownCase(CASE, "hisingen", "open", 6)
    # None: the service's district_of (the referral's person_district) applies.
    assert RULES.district(incoming, state, moved) is None
    assert state.person_district == "nordost"
