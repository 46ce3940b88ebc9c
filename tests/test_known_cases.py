"""A service's view of cases, folded from intake events (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date

from likvard.known_cases import KnownCase, apply


def fold(*events: tuple[str, Mapping[str, object]]) -> KnownCase:
    case = KnownCase("case-1")
    for version, (event_type, data) in enumerate(events, start=1):
        case = apply(case, event_type, dict(data), version)
    return case


REGISTERED: tuple[str, Mapping[str, object]] = (
    "IntakeRegistered",
    {"district": "nordost", "person": "ab" * 32},
)


def test_registration_makes_the_case_known_and_open() -> None:
    case = fold(REGISTERED)
    assert (case.status, case.district, case.version) == ("open", "nordost", 1)


def test_transfer_close_and_reopen() -> None:
    case = fold(
        REGISTERED,
        ("CaseTransferred", {"from_district": "nordost", "to_district": "hisingen"}),
        ("CaseClosed", {"reason": "OTHER"}),
    )
    assert (case.status, case.district) == ("closed", "hisingen")
    assert apply(case, "CaseReopened", {"reason": "RELAPSE"}, 4).status == "open"


def test_consents_in_force_respect_withdrawal_and_expiry() -> None:
    case = fold(
        REGISTERED,
        (
            "ConsentRecorded",
            {"consent_id": "c1", "recipients": ["HEALTHCARE"], "valid_until": None},
        ),
        (
            "ConsentRecorded",
            {"consent_id": "c2", "recipients": ["NON_PROFIT"], "valid_until": date(2026, 6, 30)},
        ),
        (
            "ConsentRecorded",
            {"consent_id": "c3", "recipients": ["PRISON_PROBATION"], "valid_until": None},
        ),
        ("ConsentWithdrawn", {"consent_id": "c3"}),
    )
    assert case.consents_in_force(date(2026, 6, 30)) == {
        "c1": ("HEALTHCARE",),
        "c2": ("NON_PROFIT",),
    }
    assert case.consents_in_force(date(2026, 7, 1)) == {"c1": ("HEALTHCARE",)}


def test_an_old_or_repeated_version_changes_nothing() -> None:
    case = fold(REGISTERED, ("CaseClosed", {"reason": "OTHER"}))
    assert apply(case, "CaseReopened", {"reason": "RELAPSE"}, 2) == case
    assert apply(case, "IntakeRegistered", dict(REGISTERED[1]), 1) == case


def test_other_event_types_only_move_the_version() -> None:
    case = apply(fold(REGISTERED), "AssessmentCompleted", {"need_level": "HIGH"}, 2)
    assert (case.version, case.status) == (2, "open")
