"""Consuming other services' topics with an exactly-once effect.

Services learn from each other only through events (the referral service learns which cases
exist from `likvard.intake.v1`; the follow-up service schedules from `likvard.referral.v1`).
Kafka delivers at least once: the relay may re-publish after a crash, `republish` refills a
topic, a consumer may stop between its database commit and its offset commit. So each batch
is handled in one PostgreSQL transaction that also records the event ids in the service's
`inbox` table; an event id already there is skipped. Offsets are committed only after that
transaction, so nothing is lost either; a batch whose transaction fails (the database
restarted) is read again, never skipped (`likvard.consumer_loop`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import Message
from psycopg import sql

from likvard import telemetry
from likvard.codec import Catalogue, CodecError
from likvard.config import kafka_client_settings, no_auto_create
from likvard.consumer_loop import BatchLoop, ConsumerSource, is_database_error
from likvard.db import check_schema_name
from likvard.ops import Heartbeat, Progress
from likvard.telemetry import ConsumerLag

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
        **no_auto_create(),
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
        self.progress = Progress(f"{schema}-inbox", heartbeat=self.heartbeat)
        self._conn: psycopg.Connection[Any] | None = None
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

    def connection(self) -> psycopg.Connection[Any]:
        """The consumer's connection, opened again after the database went away."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def handle_messages(self, messages: list[Message]) -> None:
        """A consumed batch: decoded, then applied once; a database fault drops the
        connection (the loop rewinds the batch and it is applied again)."""
        events = [e for e in (self.decode(m) for m in messages) if e is not None]
        if not events:
            return
        try:
            self.handle(self.connection(), events)
        except Exception as exc:
            if is_database_error(exc):
                self._drop_connection()
            raise

    def ping(self) -> None:
        self.connection().execute("SELECT 1")

    def run(
        self,
        consumer: ConsumerSource,
        topics: list[str],
        stop: threading.Event,
        lag: ConsumerLag | None = None,
    ) -> None:
        """Consume until `stop` is set; a batch's offsets are committed after its
        transaction, a failed batch is read again (`likvard.consumer_loop`)."""
        loop = BatchLoop(
            consumer,
            topics,
            self.handle_messages,
            self.progress,
            batch_size=self.batch_size,
            lag=lag,
            idle_check=self.ping,
        )
        try:
            loop.run(stop)
        finally:
            self._drop_connection()
