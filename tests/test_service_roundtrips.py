"""Round trips per command through the service layer, counted on the wire (libpq's trace:
one ReadyForQuery per round trip), with every guarantee of the append still holding."""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from likvard.codec import Catalogue
from likvard.districts import DistrictRegistry
from likvard.eventstore import ConcurrencyError, EventStore
from likvard.group_commit import GroupCommitter
from likvard.http import RequestContext
from services.intake import domain as d
from services.intake.service import make_service
from tests.support import closed, registered, reopened, wait_for

pytestmark = pytest.mark.integration

CTX = RequestContext(actor="test", correlation_id="c", traceparent=None)


class Wire:
    """Traces every connection of a pool into one file; counts the round trips."""

    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the fixture)
        self.mark = 0
        self.conn: psycopg.Connection[Any] | None = None

    def configure(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        conn.pgconn.trace(self.file.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)

    def round_trips(self) -> int:
        """Round trips since the last call (libpq buffers its trace: untracing flushes)."""
        assert self.conn is not None
        self.conn.pgconn.untrace()
        self.configure(self.conn)
        self.file.seek(0)
        text = self.file.read().decode(errors="replace")
        total = sum(1 for line in text.splitlines() if "\tReadyForQuery" in line)
        made, self.mark = total - self.mark, total
        return made


@pytest.fixture
def wire() -> Iterator[Wire]:
    w = Wire()
    yield w
    w.file.close()


@pytest.fixture
def traced(database_url: str, schema: str, wire: Wire) -> Iterator[EventStore]:
    pool = ConnectionPool(database_url, min_size=1, max_size=1, open=False)
    pool.open(wait=True, timeout=30)
    store = EventStore(
        pool, schema, Catalogue.load(), producer="likvard-intake", topic="likvard.intake.v1"
    )
    store.migrate()
    with pool.connection() as conn:  # the one connection, traced from now on
        wire.configure(conn)
    wire.round_trips()
    try:
        yield store
    finally:
        pool.close()


def register(case_id: str) -> d.RegisterIntake:
    return d.RegisterIntake(
        case_id=case_id,
        occurred_at=datetime.now(UTC),
        person="ab" * 32,
        district="nordost",
        substances=("ALCOHOL",),
        referral_source="SELF",
        children_in_household="NO",
    )


def test_a_command_is_one_read_and_one_write(traced: EventStore, wire: Wire) -> None:
    svc = make_service(traced, DistrictRegistry.load())
    svc.committer = None  # the direct path (the group-commit path is the test below)
    case = str(uuid.uuid4())
    svc.execute(case, register(case), 0, CTX)
    assert wire.round_trips() == 1, "register at version 0: the append alone"
    decided = svc.execute(case, d.CloseCase(case, datetime.now(UTC), "GOALS_REACHED"), 1, CTX)
    assert wire.round_trips() == 2, "load + append: the stream read, then the append"
    assert decided.version == 2
    events = traced.read_stream(case)
    assert [e.stream_version for e in events] == [1, 2]
    assert events[1].prev_hash == events[0].hash
    assert traced.verify() == []
    assert traced.outbox_depth() == 2
    with traced.pool.connection() as conn:
        head = conn.execute(
            f"SELECT version, last_hash FROM {traced.schema}.streams WHERE stream_id = %s",
            (case,),
        ).fetchone()
    assert head is not None and (head[0], bytes(head[1])) == (2, events[1].hash)
    wire.round_trips()
    with pytest.raises(ConcurrencyError) as refused:
        svc.execute(case, d.ReopenCase(case, datetime.now(UTC), "RELAPSE"), 1, CTX)
    assert refused.value.actual == 2
    assert wire.round_trips() == 1, "stale: refused after the read, nothing written"
    with pytest.raises(ConcurrencyError) as exists:
        svc.execute(case, register(case), 0, CTX)  # not read first, refused by the append
    assert (exists.value.expected, exists.value.actual) == (0, 2)
    assert wire.round_trips() == 2, "the refused append, then its actual version"
    other = str(uuid.uuid4())
    svc.execute(other, register(other), None, CTX)
    assert wire.round_trips() == 2, "without a version: read, then append"
    assert [e.stream_version for e in traced.read_stream(case)] == [1, 2]


def test_group_commit_keeps_a_command_at_one_read_and_one_write(
    traced: EventStore, wire: Wire
) -> None:
    svc = make_service(traced, DistrictRegistry.load())
    assert isinstance(svc.committer, GroupCommitter), "the services group-commit by default"
    case = str(uuid.uuid4())
    svc.execute(case, register(case), 0, CTX)
    assert wire.round_trips() == 1
    svc.execute(case, d.CloseCase(case, datetime.now(UTC), "GOALS_REACHED"), 1, CTX)
    assert wire.round_trips() == 2
    assert traced.verify() == []


def test_an_append_without_the_read_head_reads_it_first(traced: EventStore, wire: Wire) -> None:
    case = str(uuid.uuid4())
    first = traced.append(case, 0, [registered()])
    assert wire.round_trips() == 1, "a new stream: one statement"
    second = traced.append(case, 1, [closed()])
    assert wire.round_trips() == 2, "the head's hash read, then one statement"
    assert second[0].prev_hash == first[0].hash
    with pytest.raises(ConcurrencyError) as stale:
        traced.append(case, 1, [closed()], last_hash=first[0].hash)
    assert (stale.value.expected, stale.value.actual) == (1, 2)
    assert [e.stream_version for e in traced.read_stream(case)] == [1, 2]


def test_append_many_is_all_or_none(traced: EventStore) -> None:
    old = str(uuid.uuid4())
    traced.append(old, 0, [registered()])
    fresh = str(uuid.uuid4())
    with pytest.raises(ConcurrencyError) as refused:
        traced.append_many([(fresh, 0, [registered()]), (old, 0, [registered()])])
    assert (refused.value.stream_id, refused.value.actual) == (old, 1)
    assert traced.read_stream(fresh) == []
    assert traced.stream_version(fresh) == 0
    assert traced.outbox_depth() == 1


def test_a_racing_append_waits_for_the_head_and_is_refused(
    pool: ConnectionPool, schema: str, catalogue: Catalogue
) -> None:
    """The one-statement append under READ COMMITTED: a second writer at the same version
    waits on the head's lock, then sees the head moved and stores nothing."""
    store = EventStore(pool, schema, catalogue, producer="likvard-intake", topic="t")
    store.migrate()
    case = str(uuid.uuid4())
    head = store.append(case, 0, [registered()])[-1].hash
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        release.wait(20)

    first = threading.Thread(
        target=store.append, args=(case, 1, [closed()]), kwargs={"before_commit": hold}
    )
    first.start()
    assert holding.wait(20)
    refused: list[ConcurrencyError] = []

    def racer() -> None:
        try:
            store.append(case, 1, [reopened()], last_hash=head)
        except ConcurrencyError as exc:
            refused.append(exc)

    second = threading.Thread(target=racer)
    second.start()

    def waiting() -> bool:
        with pool.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            ).fetchone()
        return bool(row and row[0])

    wait_for(waiting, 20, "the second writer to wait for the head's lock")
    release.set()
    first.join(20)
    second.join(20)
    assert [(e.expected, e.actual) for e in refused] == [(1, 2)]
    events = store.read_stream(case)
    assert [e.event_type for e in events] == ["IntakeRegistered", "CaseClosed"]
    assert store.verify() == []


def test_append_many_keeps_the_order_given(traced: EventStore) -> None:
    """Global positions follow the order of the batch, whatever order the ids sort in."""
    streams = sorted((str(uuid.uuid4()) for _ in range(40)), reverse=True)
    stored = traced.append_many([(s, 0, [registered(), closed()]) for s in streams])
    assert [(e.stream_id, e.stream_version) for e in stored] == [
        (s, v) for s in streams for v in (1, 2)
    ]
    positions = [e.global_position for e in stored]
    assert positions == sorted(positions)
    assert traced.verify() == []


def test_a_registration_with_personal_details_is_two_round_trips(
    traced: EventStore, wire: Wire
) -> None:
    """Sealing asks the key store once (its one statement in autocommit: no BEGIN and
    COMMIT around it), then the append: two round trips, the details stored sealed."""
    import os

    from likvard.keys import KekRing, KeyStore, LocalKek
    from services.intake.personal import IntakePersonalData

    keys = KeyStore(traced.pool, KekRing(LocalKek("k1", os.urandom(32))), schema=traced.schema)
    keys.migrate()
    traced.personal = IntakePersonalData(traced, keys)
    svc = make_service(traced, DistrictRegistry.load())
    case = str(uuid.uuid4())
    wire.round_trips()
    svc.execute(case, dataclasses.replace(register(case), birth_year=1970), 0, CTX)
    assert wire.round_trips() == 2, "the key, then the append"
    stored = traced.read_stream(case)
    assert stored[0].payload["birth_year"] is None and stored[0].payload["personal"]
    assert traced.personal.reveal(stored)[0]["birth_year"] == 1970
