"""A service's view of cases, folded from intake events (pure), and its table."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

from likvard.known_cases import CaseDirectory, KnownCase, apply
from likvard.policy import CaseScope, Transfer


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


AT = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
MOVED = ("CaseTransferred", {"from_district": "nordost", "to_district": "hisingen"})
MOVED_ON = ("CaseTransferred", {"from_district": "hisingen", "to_district": "centrum"})


def test_transfers_are_kept_in_the_history_with_when_they_were_recorded() -> None:
    case = apply(fold(REGISTERED), *MOVED, 2, AT)
    case = apply(case, *MOVED_ON, 3, AT + timedelta(days=3))
    assert case.district == "centrum"
    assert [(t.from_district, t.to_district, t.at) for t in case.transfers] == [
        ("nordost", "hisingen", AT),
        ("hisingen", "centrum", AT + timedelta(days=3)),
    ]
    assert case.scope() == CaseScope(
        "case-1",
        "centrum",
        (Transfer("nordost", AT), Transfer("hisingen", AT + timedelta(days=3))),
    )


def test_the_transfer_history_does_not_depend_on_arrival_order() -> None:
    """A transfer arriving after a later event is still added; a repeated one is not."""
    in_order = apply(apply(fold(REGISTERED), *MOVED, 2, AT), *MOVED_ON, 3, AT)
    late = apply(apply(fold(REGISTERED), *MOVED_ON, 3, AT), *MOVED, 2, AT)
    assert late.transfers == in_order.transfers
    assert (late.district, late.version) == ("centrum", 3)  # the older event moves nothing else
    again = apply(in_order, *MOVED, 2, AT + timedelta(days=9))
    assert again == in_order


def test_a_case_not_known_to_be_registered_has_no_district_in_its_scope() -> None:
    assert KnownCase("case-2").scope() == CaseScope("case-2", None, ())


@pytest.mark.integration
def test_the_table_keeps_transfers_and_an_older_table_gains_the_column(
    database_url: str, schema: str
) -> None:
    from psycopg import sql

    from tests.support import intake_event

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(  # the table as it was before issue 12
            sql.SQL(
                "CREATE TABLE {}.known_cases (case_id text PRIMARY KEY, district text,"
                " status text NOT NULL, version integer NOT NULL,"
                " consents jsonb NOT NULL DEFAULT '{{}}')"
            ).format(sql.Identifier(schema))
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.known_cases VALUES ('old', 'nordost', 'open', 1, '{{}}')"
            ).format(sql.Identifier(schema))
        )
    directory = CaseDirectory(schema)
    moved = intake_event("c1", *MOVED, 2, "hisingen")
    moved.metadata["recorded_at"] = AT
    with psycopg.connect(database_url) as conn:
        directory.migrate(conn)
        with conn.transaction():
            registered = intake_event("c1", REGISTERED[0], dict(REGISTERED[1]), 1)
            directory.handle(conn, [registered, moved])
        assert directory.get(conn, "old") == KnownCase("old", "nordost", "open", 1)
        case = directory.get(conn, "c1")
    assert case is not None and case.district == "hisingen"
    assert case.scope().transfers == (Transfer("nordost", AT),)
