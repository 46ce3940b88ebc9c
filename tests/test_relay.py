"""The outbox relay on real PostgreSQL and a real broker: delivery, crash, late commits,
broker restarts, republish."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from likvard.cli.devstack import TansuBroker
from likvard.codec import Catalogue
from likvard.eventstore import EventStore, NewEvent
from likvard.faults import FAILPOINT_EXIT_CODE
from likvard.relay import OutboxRelay
from likvard.republish import republish
from likvard.topics import SERVICE_TOPICS, ensure_topics, load_topics
from tests.support import closed, consume, registered, reopened, wait_for

pytestmark = pytest.mark.integration


def drain(relay: OutboxRelay, database_url: str, store: EventStore) -> None:
    """Run relay batches until the outbox is empty (bounded)."""
    with psycopg.connect(database_url) as conn:
        for _ in range(200):
            relay.run_once(conn)
            if store.outbox_depth() == 0:
                return
    raise AssertionError("the outbox did not drain")


def test_relay_publishes_decodable_events_with_headers(
    store: EventStore, database_url: str, kafka_bootstrap: str, catalogue: Catalogue
) -> None:
    cases = [str(uuid.uuid4()) for _ in range(5)]
    for case in cases:
        store.append(case, 0, [registered()])
        store.append(case, 1, [closed()])
    relay = OutboxRelay(database_url, store.schema, kafka_bootstrap)
    drain(relay, database_url, store)

    records = consume(kafka_bootstrap, store.topic, at_least=10)
    assert len(records) == 10
    stored = {str(e.event_id): e for e in store.read_all()}
    for r in records:
        decoded = catalogue.decode(r.value)
        event_id = r.headers["event_id"].decode()
        assert r.value == stored[event_id].data
        assert r.key == decoded.record["metadata"]["case_id"].encode()
        assert r.headers["event_type"].decode() == decoded.event_type
        assert str(decoded.record["metadata"]["event_id"]) == event_id
        # the hash-chain link travels with the record, so Kafka alone can be verified
        assert r.headers["stream_id"].decode() == stored[event_id].stream_id
        assert bytes.fromhex(r.headers["prev_hash"].decode()) == stored[event_id].prev_hash
        assert bytes.fromhex(r.headers["hash"].decode()) == stored[event_id].hash
    assert relay.stats.published == 10


def test_crash_after_publish_before_delete_republishes_and_loses_nothing(
    store: EventStore, database_url: str, kafka_bootstrap: str, topic_prefix: str
) -> None:
    case = str(uuid.uuid4())
    store.append(case, 0, [registered(), closed()])
    env = dict(
        os.environ,
        LIKVARD_DATABASE_URL=database_url,
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        LIKVARD_TOPIC_PREFIX=topic_prefix,
        LIKVARD_FAILPOINTS="relay.after_publish",
    )
    script = (
        "import psycopg, sys\n"
        "from likvard.relay import OutboxRelay\n"
        f"r = OutboxRelay({database_url!r}, {store.schema!r}, {kafka_bootstrap!r})\n"
        f"r.run_once(psycopg.connect({database_url!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert proc.returncode == FAILPOINT_EXIT_CODE  # died between publish and delete

    first = consume(kafka_bootstrap, store.topic, at_least=2)
    assert len(first) == 2
    assert store.outbox_depth() == 2  # nothing was deleted

    drain(OutboxRelay(database_url, store.schema, kafka_bootstrap), database_url, store)
    records = consume(kafka_bootstrap, store.topic, at_least=4)
    ids = [r.headers["event_id"].decode() for r in records]
    assert len(ids) == 4 and len(set(ids)) == 2  # each event twice, same event id
    assert set(ids) == {str(e.event_id) for e in store.read_stream(case)}
    versions = [int(r.headers["stream_version"]) for r in records]
    assert versions == [1, 2, 1, 2]  # the re-sent copies come in order too


def test_late_committing_transactions_are_never_skipped(
    store: EventStore, database_url: str, kafka_bootstrap: str
) -> None:
    """Writers whose transactions commit out of sequence order: a held transaction took its
    ids first, others commit and are relayed, then it commits; nothing may be lost."""
    relay = OutboxRelay(database_url, store.schema, kafka_bootstrap, batch_size=50)
    stop = threading.Event()
    relay_thread = threading.Thread(target=relay.run, args=(stop,))
    relay_thread.start()
    try:
        held_cases = [str(uuid.uuid4()) for _ in range(3)]
        release = threading.Event()
        holding = threading.Barrier(len(held_cases) + 1)

        def hold() -> None:
            holding.wait(10)
            assert release.wait(60)

        holders = [
            threading.Thread(
                target=store.append, args=(c, 0, [registered()]), kwargs={"before_commit": hold}
            )
            for c in held_cases
        ]
        for h in holders:
            h.start()
        holding.wait(30)  # each held transaction has its rows (and ids) but has not committed

        cases = [str(uuid.uuid4()) for _ in range(20)]
        lock = threading.Lock()
        expected: dict[str, int] = {}

        def writer(case: str) -> None:
            events: list[NewEvent] = [registered(), closed(), reopened(), closed()]
            for version, event in enumerate(events):
                store.append(case, version, [event])
            with lock:
                expected[case] = len(events)

        writers = [threading.Thread(target=writer, args=(c,)) for c in cases]
        for w in writers:
            w.start()
        for w in writers:
            w.join(60)
        # Everything committed after the held rows is relayed while they are still open.
        wait_for(lambda: relay.stats.published >= 80, 30, "the committed events to be relayed")
        assert store.outbox_depth() == 0  # the held rows are invisible, not yet relayed

        release.set()
        for h in holders:
            h.join(30)
        for c in held_cases:
            expected[c] = 1
        wait_for(
            lambda: store.outbox_depth() == 0 and relay.stats.published >= 83,
            30,
            "the late commits to be relayed",
        )
    finally:
        stop.set()
        relay_thread.join(30)

    records = consume(kafka_bootstrap, store.topic, at_least=83)
    per_case: dict[str, list[int]] = defaultdict(list)
    for r in records:
        assert r.key is not None
        per_case[r.key.decode()].append(int(r.headers["stream_version"]))
    assert set(per_case) == set(expected)
    for case, count in expected.items():
        assert per_case[case] == list(range(1, count + 1)), case


@pytest.fixture
def own_broker() -> Iterator[TansuBroker]:
    """A broker of this test's own: it is restarted, which would wipe the shared one."""
    with TansuBroker() as broker:
        yield broker


def test_relay_survives_a_broker_restart_and_republish_refills(
    pool: ConnectionPool,
    schema: str,
    catalogue: Catalogue,
    database_url: str,
    own_broker: TansuBroker,
) -> None:
    """The dev broker forgets everything on restart and its idempotent-producer state goes
    stale: the relay must rebuild its producer, re-create topics and deliver in order."""
    topics = load_topics(prefix="r.")
    ensure_topics(own_broker.bootstrap, topics)
    store = EventStore(
        pool, schema, catalogue, producer="likvard-intake", topic="r." + SERVICE_TOPICS["intake"]
    )
    store.migrate()
    relay = OutboxRelay(
        database_url,
        schema,
        own_broker.bootstrap,
        topics=topics,
        flush_timeout=8,
        producer_overrides={"message.timeout.ms": 5000},
    )
    case = str(uuid.uuid4())
    store.append(case, 0, [registered()])
    drain(relay, database_url, store)
    assert len(consume(own_broker.bootstrap, store.topic, at_least=1)) == 1

    own_broker.restart()  # topics, records and producer ids are gone
    store.append(case, 1, [closed()])
    store.append(case, 2, [reopened()])
    drain(relay, database_url, store)
    after = consume(own_broker.bootstrap, store.topic, at_least=2)
    assert [int(r.headers["stream_version"]) for r in after] == [2, 3]

    # The broker lost version 1: republish refills the topic from the event store.
    assert republish(store, own_broker.bootstrap) == 3
    records = consume(own_broker.bootstrap, store.topic, at_least=5)
    assert {r.headers["event_id"].decode() for r in records} == {
        str(e.event_id) for e in store.read_stream(case)
    }
    assert len(records) == 5
