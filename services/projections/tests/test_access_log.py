"""The access-log read model on a real PostgreSQL: CaseAccessed events (encoded and decoded
by the catalogue, as they come off Kafka) projected once whatever the re-delivery, kept out
of the timeline and case facts, and queried in order with the auditor's filters."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest

from likvard.codec import Catalogue
from likvard.inbox import Incoming, decode_event
from services.projections import access_log, readmodels

pytestmark = pytest.mark.integration

T0 = datetime(2025, 3, 3, 8, 0, tzinfo=UTC)
TOPIC = "likvard.access-log.v1"
CASE_A, CASE_B = str(uuid.UUID(int=0xA)), str(uuid.UUID(int=0xB))
_CATALOGUE = Catalogue.load()


def accessed(
    service: str,
    version: int,
    minutes: float,
    actor: str,
    case_id: str | None,
    *,
    outcome: str = "allowed",
    reason: str = "own-district",
    emergency: str | None = None,
    action: str = "case.history",
) -> Incoming:
    """One CaseAccessed of `service`'s access-log stream, through the Avro codec."""
    at = T0 + timedelta(minutes=minutes)
    event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"access-log-{service}/{version}"))
    record: dict[str, Any] = {
        "metadata": {
            "event_id": event_id,
            "event_type": "CaseAccessed",
            "case_id": f"access-log-{service}",
            "stream_version": version,
            "occurred_at": at,
            "recorded_at": at + timedelta(milliseconds=3),
            "producer": f"likvard-{service}",
            "district": "",
            "actor": actor,
            "correlation_id": "c",
            "causation_id": None,
            "traceparent": None,
        },
        "actor": actor,
        "roles": "case-worker",
        "action": action,
        "resource": f"case:{case_id}" if case_id else "report:followup",
        "case_id": case_id,
        "outcome": outcome,
        "reason": reason,
        "emergency_reason": emergency,
        "service": service,
        "trace_id": None,
        "accessed_at": at,
    }
    value = _CATALOGUE.encode("CaseAccessed", record)
    return decode_event(_CATALOGUE, TOPIC, 0, version, value)


# Two services' streams, interleaved in time: the order is accessed_at, then position.
ENTRIES = [
    accessed("projections", 1, 0, "cw-nordost", CASE_A),
    accessed("intake", 1, 1, "cw-nordost", CASE_A, action="case.read"),
    accessed(
        "projections", 2, 2, "cw-hisingen", CASE_A, outcome="refused", reason="not-your-district"
    ),
    accessed(
        "projections", 3, 3, "cw-hisingen", CASE_A, reason="emergency", emergency="child-at-risk"
    ),
    accessed("intake", 2, 3, "cw-nordost", CASE_B, action="case.read"),  # same instant
    accessed(
        "projections", 4, 60 * 24, "analyst-1", None, outcome="refused", reason="role-not-allowed"
    ),
]


@pytest.fixture
def projected(database_url: str, schema: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, schema)
        with conn.transaction():
            assert readmodels.apply(conn, schema, ENTRIES) == len(ENTRIES)
    return schema


def ids(entries: list[access_log.Entry]) -> list[str]:
    return [str(e.event_id) for e in entries]


def query(database_url: str, schema: str, **filters: Any) -> list[access_log.Entry]:
    paging = {k: filters.pop(k) for k in ("limit", "after") if k in filters}
    with psycopg.connect(database_url) as conn:
        return access_log.query(conn, schema, access_log.Filter(**filters), **paging)


def test_entries_are_projected_once_and_kept_out_of_the_case_read_models(
    database_url: str, projected: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        before = readmodels.checksum(conn, projected)
        with conn.transaction():  # re-delivery, a batch split another way, duplicates in it
            assert readmodels.apply(conn, projected, ENTRIES[3:] + ENTRIES[:2] + ENTRIES) == 0
        assert readmodels.checksum(conn, projected) == before
        counts = conn.execute(
            psycopg.sql.SQL(
                "SELECT (SELECT count(*) FROM {s}.access_log), (SELECT count(*) FROM"
                " {s}.timeline), (SELECT count(*) FROM {s}.case_facts)"
            ).format(s=psycopg.sql.Identifier(projected))
        ).fetchone()
    assert counts == (len(ENTRIES), 0, 0)
    assert readmodels.TABLES[access_log.TABLE] == "event_id"  # replay compares it too
    assert TOPIC in readmodels.SOURCE_TOPICS


def test_an_entry_keeps_every_field(database_url: str, projected: str) -> None:
    emergency = query(database_url, projected, emergency=True)
    assert len(emergency) == 1
    e = emergency[0]
    assert (e.actor, e.case_id, e.outcome, e.reason, e.emergency_reason) == (
        "cw-hisingen",
        CASE_A,
        "allowed",
        "emergency",
        "child-at-risk",
    )
    assert (e.resource, e.action, e.service, e.roles) == (
        f"case:{CASE_A}",
        "case.history",
        "projections",
        "case-worker",
    )
    assert (e.stream_id, e.stream_version) == ("access-log-projections", 3)
    assert e.accessed_at == T0 + timedelta(minutes=3)


def test_order_is_accessed_at_then_stream_position(database_url: str, projected: str) -> None:
    everything = query(database_url, projected)
    assert ids(everything) == [e.event_id for e in ENTRIES[:3]] + [
        ENTRIES[4].event_id,  # access-log-intake sorts before access-log-projections at 08:03
        ENTRIES[3].event_id,
        ENTRIES[5].event_id,
    ]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"case_id": CASE_A}, [0, 1, 2, 3]),
        ({"case_id": CASE_B}, [4]),
        ({"actor": "cw-hisingen"}, [2, 3]),
        ({"emergency": True}, [3]),
        ({"emergency": False}, [0, 1, 2, 4, 5]),
        ({"outcome": "refused"}, [2, 5]),
        ({"case_id": CASE_A, "actor": "cw-nordost"}, [0, 1]),
        # 3 March in the city: 08:00 UTC is 09:00 local; the analyst's refusal is the 4th
        ({"day": (date(2025, 3, 3), date(2025, 3, 3))}, [0, 1, 2, 4, 3]),
        ({"day": (date(2025, 3, 4), None)}, [5]),
        ({"day": (None, date(2025, 3, 2))}, []),
    ],
)
def test_filters(
    database_url: str, projected: str, filters: dict[str, Any], expected: list[int]
) -> None:
    if "day" in filters:
        filters["start"], filters["end"] = access_log.day_window(*filters.pop("day"))
    assert ids(query(database_url, projected, **filters)) == [ENTRIES[i].event_id for i in expected]


def test_keyset_pages_cover_the_log_once_in_order(database_url: str, projected: str) -> None:
    seen: list[str] = []
    after: uuid.UUID | None = None
    while True:
        page = query(database_url, projected, limit=2, after=after)
        if not page:
            break
        assert len(page) <= 2
        seen += ids(page)
        after = page[-1].event_id
    assert seen == ids(query(database_url, projected))
    with pytest.raises(access_log.UnknownCursor):
        query(database_url, projected, after=uuid.uuid4())


def test_day_window_is_the_local_day() -> None:
    start, end = access_log.day_window(date(2025, 7, 1), date(2025, 7, 1))
    assert start is not None and end is not None
    assert start.astimezone(UTC) == datetime(2025, 6, 30, 22, 0, tzinfo=UTC)  # CEST
    assert end - start == timedelta(days=1)
    assert access_log.day_window(None, None) == (None, None)
