"""Consuming another service's topic: each event's effect applied exactly once, even when
Kafka delivers it again."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Producer
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard.codec import Catalogue
from likvard.eventstore import EventStore
from likvard.inbox import InboxConsumer, Incoming, consumer_config
from likvard.relay import OutboxRelay
from likvard.republish import republish
from tests.support import closed, registered, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def consuming_schema(
    database_url: str, pool: ConnectionPool, catalogue: Catalogue
) -> Iterator[str]:
    """A second service's schema: its event store tables (with the inbox) and a table the
    handler writes its effect to."""
    name = f"c_{uuid.uuid4().hex[:12]}"
    EventStore(pool, name, catalogue, producer="other", topic="unused").migrate()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {}.effects (event_id uuid, case_id text, event_type text)"
            ).format(sql.Identifier(name))
        )
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def test_redelivered_events_take_effect_once(
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    catalogue: Catalogue,
    consuming_schema: str,
) -> None:
    cases = [str(uuid.uuid4()) for _ in range(10)]
    for case in cases:
        store.append(case, 0, [registered()])
        store.append(case, 1, [closed()])
    with psycopg.connect(database_url) as conn:
        relay = OutboxRelay(database_url, store.schema, kafka_bootstrap)
        while relay.run_once(conn):
            pass

    def effect(conn: psycopg.Connection[Any], events: list[Incoming]) -> None:
        conn.cursor().executemany(
            sql.SQL("INSERT INTO {}.effects VALUES (%s, %s, %s)").format(
                sql.Identifier(consuming_schema)
            ),
            [(e.event_id, e.case_id, e.event_type) for e in events],
        )

    inbox = InboxConsumer(database_url, consuming_schema, catalogue, effect)
    consumer = Consumer(
        consumer_config(
            kafka_bootstrap,
            f"test-{uuid.uuid4()}",
            **{"session.timeout.ms": 2000, "heartbeat.interval.ms": 200, "fetch.wait.max.ms": 10},
        )
    )
    stop = threading.Event()
    thread = threading.Thread(target=inbox.run, args=(consumer, [store.topic], stop))
    thread.start()
    try:
        wait_for(lambda: inbox.stats.handled == 20, 60, "the 20 events to be handled")
        assert republish(store, kafka_bootstrap) == 20  # every event delivered again
        garbage = Producer({"bootstrap.servers": kafka_bootstrap})
        garbage.produce(store.topic, key=cases[0].encode(), value=b"not an event")
        garbage.flush(10)
        wait_for(
            lambda: inbox.stats.duplicates >= 20 and inbox.stats.undecodable == 1,
            60,
            "the re-delivered events and the garbage record to be consumed",
        )
    finally:
        stop.set()
        thread.join(30)

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT case_id, event_type FROM {}.effects").format(
                sql.Identifier(consuming_schema)
            )
        ).fetchall()
    assert len(rows) == 20
    assert sorted(rows) == sorted(
        [(c, "IntakeRegistered") for c in cases] + [(c, "CaseClosed") for c in cases]
    )
    assert inbox.stats.handled == 20


def test_a_batch_with_the_same_event_twice_applies_it_once(
    database_url: str, catalogue: Catalogue, consuming_schema: str
) -> None:
    seen: list[str] = []
    inbox = InboxConsumer(
        database_url,
        consuming_schema,
        catalogue,
        lambda _c, es: seen.extend(e.event_id for e in es),
    )
    event = Incoming("t", 0, 1, str(uuid.uuid4()), "CaseClosed", "case-1", {}, {})
    with psycopg.connect(database_url) as conn:
        assert inbox.handle(conn, [event, event]) == 1
        assert inbox.handle(conn, [event]) == 0
    assert seen == [event.event_id]
