"""The event store on a real PostgreSQL: append, optimistic concurrency, hash chain."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest
from psycopg import sql

from likvard.eventstore import GENESIS_HASH, ConcurrencyError, EventStore, chain_hash
from tests.support import closed, registered, reopened

pytestmark = pytest.mark.integration


def test_append_stores_bytes_chain_and_outbox(store: EventStore) -> None:
    case = str(uuid.uuid4())
    stored = store.append(case, 0, [registered()])
    stored += store.append(case, 1, [closed(), reopened()])

    events = store.read_stream(case)
    assert [e.stream_version for e in events] == [1, 2, 3]
    assert [e.event_type for e in events] == ["IntakeRegistered", "CaseClosed", "CaseReopened"]
    assert events[0].prev_hash == GENESIS_HASH
    for prev, e in zip([None, *events], events, strict=False):
        assert e.hash == chain_hash(e.prev_hash, e.data)
        if prev is not None:
            assert e.prev_hash == prev.hash
    decoded = store.catalogue.decode(events[0].data)
    assert decoded.event_type == "IntakeRegistered"
    assert decoded.record["metadata"]["case_id"] == case
    assert decoded.record["metadata"]["stream_version"] == 1
    assert store.outbox_depth() == 3
    assert store.stream_version(case) == 3
    assert store.verify() == []


def test_stale_expected_version_is_refused_and_nothing_is_written(store: EventStore) -> None:
    case = str(uuid.uuid4())
    store.append(case, 0, [registered()])
    with pytest.raises(ConcurrencyError) as info:
        store.append(case, 0, [registered()])
    assert info.value.actual == 1
    with pytest.raises(ConcurrencyError):
        store.append(case, 5, [closed()])
    assert store.count() == 1
    assert store.outbox_depth() == 1


def test_two_concurrent_writers_exactly_one_wins(store: EventStore) -> None:
    case = str(uuid.uuid4())
    store.append(case, 0, [registered()])
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def writer() -> None:
        barrier.wait()
        try:
            store.append(case, 1, [closed()])
            outcomes.append("ok")
        except ConcurrencyError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["conflict", "ok"]
    assert store.stream_version(case) == 2


def test_events_are_append_only(store: EventStore, database_url: str) -> None:
    case = str(uuid.uuid4())
    store.append(case, 0, [registered()])
    with psycopg.connect(database_url, autocommit=True) as conn:
        for statement in (
            "UPDATE {}.events SET event_type = 'X'",
            "DELETE FROM {}.events",
            "TRUNCATE {}.events CASCADE",
        ):
            with pytest.raises(psycopg.errors.RaiseException):
                conn.execute(sql.SQL(statement).format(sql.Identifier(store.schema)))
    assert store.count() == 1


def test_tampering_is_detected_by_the_hash_chain(store: EventStore, database_url: str) -> None:
    case, other = str(uuid.uuid4()), str(uuid.uuid4())
    store.append(case, 0, [registered(), closed(), reopened()])
    store.append(other, 0, [registered()])
    assert store.verify() == []
    target = store.read_stream(case)[1]
    # A DBA with owner rights switches the guard off and edits one byte of an event.
    # The last byte is the close reason's enum index: the forged event still decodes.
    forged = target.data[:-1] + bytes([target.data[-1] ^ 0x01])
    with psycopg.connect(database_url, autocommit=True) as conn:
        t = sql.Identifier(store.schema)
        conn.execute(sql.SQL("ALTER TABLE {}.events DISABLE TRIGGER events_append_only").format(t))
        conn.execute(
            sql.SQL("UPDATE {}.events SET data = %s WHERE event_id = %s").format(t),
            (forged, target.event_id),
        )
    breaks = store.verify()
    assert [(b.stream_id, b.stream_version) for b in breaks] == [(case, 2)]
    assert "content changed" in breaks[0].reason
    assert store.verify(other) == []


def test_migrations_are_idempotent(store: EventStore) -> None:
    assert store.migrate() == []
