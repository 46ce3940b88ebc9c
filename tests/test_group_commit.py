"""Group commit on a real PostgreSQL: concurrent appends share one transaction, a stale
stream fails alone, and no caller is told its append was stored when the batch's
transaction rolled back (issue 16)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard.codec import Catalogue
from likvard.eventstore import ConcurrencyError, EventStore, StoredEvent
from likvard.group_commit import GroupCommitter
from tests.support import closed, registered

pytestmark = pytest.mark.integration

Outcome = list[StoredEvent] | BaseException


@pytest.fixture
def gstore(pool: ConnectionPool, schema: str, catalogue: Catalogue) -> EventStore:
    s = EventStore(pool, schema, catalogue, producer="likvard-intake", topic="likvard.intake.v1")
    s.migrate()
    return s


@pytest.fixture
def committer_for(gstore: EventStore) -> Iterator[Callable[..., GroupCommitter]]:
    made: list[GroupCommitter] = []

    def make(**kwargs: Any) -> GroupCommitter:
        c = GroupCommitter(gstore, **kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def concurrently(calls: list[Callable[[], list[StoredEvent]]]) -> list[Outcome]:
    """Run each call in its own thread; each one's result or exception, in order."""
    outcomes: list[Outcome | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            outcomes[i] = calls[i]()
        except BaseException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(o is not None for o in outcomes), "a caller was never answered"
    return [o for o in outcomes if o is not None]


def stored_rows(store: EventStore, streams: list[str]) -> tuple[int, int, int, set[int]]:
    """Events, outbox rows and stream heads of these streams, and the transactions
    (xmin) that wrote their events."""
    with store.pool.connection() as conn:
        q = sql.SQL("SELECT count(*) FROM {}.{} WHERE stream_id = ANY(%s)")
        counts = [
            conn.execute(
                q.format(sql.Identifier(store.schema), sql.Identifier(t)), (streams,)
            ).fetchone()[0]  # type: ignore[index]
            for t in ("events", "outbox", "streams")
        ]
        xmins = conn.execute(
            sql.SQL("SELECT DISTINCT xmin::text FROM {}.events WHERE stream_id = ANY(%s)").format(
                sql.Identifier(store.schema)
            ),
            (streams,),
        ).fetchall()
    return counts[0], counts[1], counts[2], {int(r[0]) for r in xmins}


def test_concurrent_appends_share_one_transaction_and_each_gets_its_events(
    gstore: EventStore, committer_for: Callable[..., GroupCommitter]
) -> None:
    committer = committer_for(max_batch=4, max_wait=5.0)
    streams = [str(uuid.uuid4()) for _ in range(4)]
    outcomes = concurrently([partial(committer.append, s, 0, [registered()]) for s in streams])
    for stream_id, outcome in zip(streams, outcomes, strict=True):
        assert isinstance(outcome, list), outcome
        assert [(e.stream_id, e.stream_version) for e in outcome] == [(stream_id, 1)]
    events, outbox, heads, xmins = stored_rows(gstore, streams)
    assert (events, outbox, heads) == (4, 4, 4)
    assert len(xmins) == 1, "the four appends were not one transaction"
    assert gstore.verify() == []


def test_a_stale_stream_fails_alone_with_its_actual_version(
    gstore: EventStore, committer_for: Callable[..., GroupCommitter]
) -> None:
    stale = str(uuid.uuid4())
    first = gstore.append(stale, 0, [registered()])
    committer = committer_for(max_batch=3, max_wait=5.0)
    fresh = [str(uuid.uuid4()) for _ in range(2)]
    outcomes = concurrently(
        [
            lambda: committer.append(stale, 0, [registered()]),  # it exists: stale
            *[partial(committer.append, s, 0, [registered()]) for s in fresh],
        ]
    )
    assert isinstance(outcomes[0], ConcurrencyError)
    assert (outcomes[0].expected, outcomes[0].actual) == (0, 1)
    assert all(isinstance(o, list) and len(o) == 1 for o in outcomes[1:]), outcomes
    assert gstore.read_stream(stale) == first
    events, _, _, xmins = stored_rows(gstore, fresh)
    assert events == 2 and len(xmins) == 1
    # An existing stream continues its chain from the hash the caller read.
    more = committer.append(stale, 1, [closed()], last_hash=first[-1].hash)
    assert more[0].prev_hash == first[-1].hash and more[0].stream_version == 2
    assert gstore.verify() == []


def test_two_appends_to_one_stream_in_a_batch_one_wins(
    gstore: EventStore, committer_for: Callable[..., GroupCommitter]
) -> None:
    case = str(uuid.uuid4())
    head = gstore.append(case, 0, [registered()])[-1].hash
    committer = committer_for(max_batch=2, max_wait=0.5)
    outcomes = concurrently(
        [lambda: committer.append(case, 1, [closed()], last_hash=head) for _ in range(2)]
    )
    won = [o for o in outcomes if isinstance(o, list)]
    lost = [o for o in outcomes if isinstance(o, ConcurrencyError)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert lost[0].actual == 2
    assert [e.stream_version for e in gstore.read_stream(case)] == [1, 2]


def test_a_batch_whose_transaction_rolls_back_acknowledges_no_one(
    gstore: EventStore, committer_for: Callable[..., GroupCommitter]
) -> None:
    failing = threading.Event()
    failing.set()
    seen: list[int] = []

    def before_commit(conn: psycopg.Connection[Any]) -> None:
        seen.append(conn.info.backend_pid)
        if failing.is_set():
            raise RuntimeError("the batch fails before its commit")

    committer = committer_for(max_batch=4, max_wait=5.0, before_commit=before_commit)
    doomed = [str(uuid.uuid4()) for _ in range(4)]
    outcomes = concurrently([partial(committer.append, s, 0, [registered()]) for s in doomed])
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes
    assert stored_rows(gstore, doomed)[:3] == (0, 0, 0)
    assert seen, "the hook never ran: the batch was not written"

    failing.clear()
    after = [str(uuid.uuid4()) for _ in range(4)]
    outcomes = concurrently([partial(committer.append, s, 0, [registered()]) for s in after])
    assert all(isinstance(o, list) and len(o) == 1 for o in outcomes), outcomes
    assert stored_rows(gstore, after)[:3] == (4, 4, 4)
    assert stored_rows(gstore, doomed)[:3] == (0, 0, 0)


def test_a_batch_whose_backend_is_terminated_acknowledges_no_one(
    gstore: EventStore, database_url: str, committer_for: Callable[..., GroupCommitter]
) -> None:
    kill = threading.Event()
    kill.set()

    def before_commit(conn: psycopg.Connection[Any]) -> None:
        if kill.is_set():
            kill.clear()
            with psycopg.connect(database_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))

    committer = committer_for(max_batch=4, max_wait=5.0, before_commit=before_commit)
    doomed = [str(uuid.uuid4()) for _ in range(4)]
    outcomes = concurrently([partial(committer.append, s, 0, [registered()]) for s in doomed])
    assert all(isinstance(o, psycopg.OperationalError) for o in outcomes), outcomes
    assert stored_rows(gstore, doomed)[:3] == (0, 0, 0)

    after = [str(uuid.uuid4()) for _ in range(4)]
    outcomes = concurrently([partial(committer.append, s, 0, [registered()]) for s in after])
    assert all(isinstance(o, list) and len(o) == 1 for o in outcomes), outcomes
    assert stored_rows(gstore, after)[:3] == (4, 4, 4)
    assert gstore.verify() == []


def test_each_stored_row_matches_its_bytes(
    gstore: EventStore, committer_for: Callable[..., GroupCommitter]
) -> None:
    """The statement takes the fingerprint and the time recorded from each event itself:
    in a shared batch each row still carries its own (appends prepared at other times)."""
    committer = committer_for(max_batch=3, max_wait=5.0)
    streams = [str(uuid.uuid4()) for _ in range(3)]
    concurrently([partial(committer.append, s, 0, [registered(), closed()]) for s in streams])
    for stream_id in streams:
        for e in gstore.read_stream(stream_id):
            metadata = gstore.catalogue.decode(e.data).record["metadata"]
            assert e.schema_fingerprint == e.data[2:10]
            assert e.recorded_at == metadata["recorded_at"]
            assert e.metadata["recorded_at"] == e.recorded_at.isoformat()
    assert gstore.verify() == []


def test_a_lone_caller_commits_its_own_append_on_its_own_thread(
    gstore: EventStore, committer_for: Callable[..., GroupCommitter]
) -> None:
    """No hand-off without company: the caller leads its own batch of one."""
    threads: list[threading.Thread] = []
    committer = committer_for(before_commit=lambda conn: threads.append(threading.current_thread()))
    for _ in range(3):
        stored = committer.append(str(uuid.uuid4()), 0, [registered()])
        assert len(stored) == 1
    assert threads == [threading.current_thread()] * 3


def test_many_callers_on_few_streams_are_each_answered_once_and_truly(
    gstore: EventStore, committer_for: Callable[..., GroupCommitter]
) -> None:
    """Sixteen threads, forty appends each at version 0 over ten streams: every caller is
    answered (the lead always passes on), exactly one append per stream wins, and what the
    winners were told is what the store holds."""
    committer = committer_for(max_batch=8)
    streams = [str(uuid.uuid4()) for _ in range(10)]

    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def caller(i: int) -> list[StoredEvent]:
        for n in range(40):
            try:
                outcome: Outcome = committer.append(streams[(i + n) % 10], 0, [registered()])
            except ConcurrencyError as exc:
                outcome = exc
            with lock:
                outcomes.append(outcome)
        return []

    concurrently([partial(caller, i) for i in range(16)])
    assert len(outcomes) == 16 * 40
    won = [o for o in outcomes if isinstance(o, list)]
    assert sorted(w[0].stream_id for w in won) == sorted(streams)
    assert all(isinstance(o, ConcurrencyError) for o in outcomes if not isinstance(o, list))
    for w in won:
        assert gstore.read_stream(w[0].stream_id) == w
    assert gstore.verify() == []
