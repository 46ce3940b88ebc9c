"""Consuming other services' topics with an exactly-once effect.

Services learn from each other only through events (the referral service learns which cases
exist from `likvard.intake.v1`; the follow-up service schedules from `likvard.referral.v1`).
Kafka delivers at least once: the relay may re-publish after a crash, `republish` refills a
topic, a consumer may stop between its database commit and its offset commit. So each batch
is handled in one PostgreSQL transaction that also records the event ids in the service's
`inbox` table; an event id already there is skipped. Offsets are committed only after that
transaction, so nothing is lost either.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import Consumer, Message
from psycopg import sql

from likvard import telemetry
from likvard.codec import Catalogue, CodecError
from likvard.config import kafka_client_settings
from likvard.db import check_schema_name
from likvard.ops import Heartbeat

log = logging.getLogger("likvard.inbox")


_events = telemetry.meter("likvard.inbox").create_counter(
    "likvard.inbox.events",
    unit="{event}",
    description="Events a service consumed from another's topic, by outcome"
    " (applied, duplicate, undecodable).",
)


@dataclass(frozen=True)
class Incoming:
    """A decoded event from another service's topic."""

    topic: str
    partition: int
    offset: int
    event_id: str
    event_type: str
    case_id: str
    metadata: dict[str, Any]
    data: dict[str, Any]  # the payload, without metadata


def decode_event(
    catalogue: Catalogue, topic: str, partition: int, offset: int, value: bytes
) -> Incoming:
    """An event record from any service topic; raises CodecError if it does not decode."""
    decoded = catalogue.decode(value)
    record = dict(decoded.record)
    metadata = record.pop("metadata")
    return Incoming(
        topic=topic,
        partition=partition,
        offset=offset,
        event_id=str(metadata["event_id"]),
        event_type=decoded.event_type,
        case_id=str(metadata["case_id"]),
        metadata=metadata,
        data=record,
    )


Handler = Callable[[psycopg.Connection[Any], list[Incoming]], None]


@dataclass
class InboxStats:
    handled: int = 0
    duplicates: int = 0
    undecodable: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)


def consumer_config(bootstrap: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        **kafka_client_settings(),
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
    }
    config.update(overrides)
    return config


class InboxConsumer:
    def __init__(
        self,
        dsn: str,
        schema: str,
        catalogue: Catalogue,
        handler: Handler,
        *,
        batch_size: int = 500,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.heartbeat = heartbeat or Heartbeat()
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.catalogue = catalogue
        self.handler = handler
        self.batch_size = batch_size
        self.stats = InboxStats()

    def decode(self, msg: Message) -> Incoming | None:
        """The event in a message, or None (logged and counted) if it does not decode: on
        the services' own topics that means a bug or a foreign producer, not a reason to
        stop consuming. District systems' records are validated on the ingest path."""
        where = (str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0))
        try:
            return decode_event(self.catalogue, *where, msg.value() or b"")
        except CodecError as exc:
            self.stats.undecodable += 1
            _events.add(1, {"service": self.schema, "outcome": "undecodable"})
            log.warning("skipping %s[%s]@%s: %s", *where, exc)
            return None

    def handle(self, conn: psycopg.Connection[Any], events: Sequence[Incoming]) -> int:
        """Apply a batch once: record the ids, hand only the unseen ones to the handler,
        all in one transaction. Returns how many were new."""
        unique: dict[str, Incoming] = {}
        for e in events:
            unique.setdefault(e.event_id, e)
        with conn.transaction():
            rows = conn.execute(
                sql.SQL(
                    'INSERT INTO {}.inbox (event_id, event_type, topic, partition, "offset")'
                    " SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::int[],"
                    " %s::bigint[]) ON CONFLICT (event_id) DO NOTHING RETURNING event_id::text"
                ).format(sql.Identifier(self.schema)),
                (
                    [uuid.UUID(e.event_id) for e in unique.values()],
                    [e.event_type for e in unique.values()],
                    [e.topic for e in unique.values()],
                    [e.partition for e in unique.values()],
                    [e.offset for e in unique.values()],
                ),
            ).fetchall()
            fresh_ids = {r[0] for r in rows}
            fresh = [e for e in unique.values() if e.event_id in fresh_ids]
            if fresh:
                self.handler(conn, fresh)
        self.stats.handled += len(fresh)
        self.stats.duplicates += len(events) - len(fresh)
        self.stats.batches += 1
        _events.add(len(fresh), {"service": self.schema, "outcome": "applied"})
        if len(events) > len(fresh):
            _events.add(len(events) - len(fresh), {"service": self.schema, "outcome": "duplicate"})
        return len(fresh)

    def run(self, consumer: Consumer, topics: list[str], stop: threading.Event) -> None:
        """Consume until `stop` is set; offsets are committed after each handled batch."""
        consumer.subscribe(topics)
        try:
            with psycopg.connect(self.dsn) as conn:
                while not stop.is_set():
                    self.heartbeat.beat()
                    messages = consumer.consume(self.batch_size, timeout=0.2)
                    good = [m for m in messages if m.error() is None]
                    for m in messages:
                        if m.error() is not None:
                            log.warning("consumer error: %s", m.error())
                    events = [e for e in (self.decode(m) for m in good) if e is not None]
                    if events:
                        self.handle(conn, events)
                    if good:
                        consumer.commit(asynchronous=False)
        finally:
            consumer.close()
