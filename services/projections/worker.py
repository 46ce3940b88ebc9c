"""The live projection worker: one consumer-group member over every service topic and the
access-log topic (`readmodels.SOURCE_TOPICS`).

It runs the kernel's `BatchLoop` (the same loop as the inbox consumers and ingest workers)
and hands each batch to the same `readmodels.apply` that replay uses, in one PostgreSQL
transaction that also records the event ids: a re-delivered batch (a worker killed
mid-stream, a rebalance, `republish`) changes nothing, and a batch whose transaction fails
(the database restarted) is read again, never committed past. Read-model state lives in
PostgreSQL only. The same transaction records the batch's offsets and chain heads
(`provenance.py`): what a report names as the history its figures came from.

Why not faust-streaming, as before: a faust agent whose batch raised logged "Agent
Crashed", went on and committed past the batch (events lost from the published figures
after a database restart), and after a broker restart it stalled with its lag gauge at 0.
A plain confluent-kafka batch consumer gives the loop those rules explicitly, and is
faster (no per-event stream machinery).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from confluent_kafka import Consumer, Message
from opentelemetry import trace

from likvard import telemetry
from likvard.codec import Catalogue, CodecError
from likvard.config import Settings
from likvard.consumer_loop import BatchLoop, ConsumerSource, is_database_error
from likvard.inbox import Incoming, consumer_config, decode_event
from likvard.ops import Heartbeat, Progress
from likvard.telemetry import ConsumerLag
from likvard.topic_reader import record_headers
from services.projections import provenance, readmodels
from services.projections.timeline_chain import Link, link_of

log = logging.getLogger("likvard.projections")


_meter = telemetry.meter("likvard.projections")
_projected = _meter.create_counter(
    "likvard.projection.events",
    unit="{event}",
    description="Events the projection worker applied to the read models (new ones; a"
    " re-delivered event is not counted again).",
)
_batch_seconds = _meter.create_histogram(
    "likvard.projection.batch.duration", unit="s", description="Time to apply one batch."
)
_tracer = telemetry.tracer("likvard.projections")


class Projector:
    """Applies decoded batches to the read models over one connection (kept open)."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self._conn: psycopg.Connection[Any] | None = None
        self._migrated = False
        self._provenance = False  # whether the schema has the provenance tables
        self.applied = 0

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        return self._conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                log.debug("closing a broken connection failed", exc_info=True)

    def ping(self) -> None:
        self.connection().execute("SELECT 1")

    def migrate(self) -> None:
        conn = self.connection()
        with conn.transaction():
            readmodels.migrate(conn, self.schema)
            self._provenance = provenance.migrate(conn, self.schema)
        if not self._provenance:
            log.warning(
                "schema %s has no provenance tables (run `likvard db migrate`): reports over"
                " it cannot be reproduced",
                self.schema,
            )

    def apply(
        self,
        events: Sequence[Incoming],
        traceparents: Sequence[str | None] | None = None,
        marks: provenance.Marks | None = None,
        links: Sequence[Link | None] | None = None,
    ) -> int:
        """Apply a batch in one transaction; returns how many events were new. Each event
        gets a span in its own trace (`traceparents`: each record's Kafka header, the
        relay's publish span), so one trace runs from the HTTP request to the read model.
        `marks`: the batch's records' offsets and chain heads, recorded in the same
        transaction; `links`: each event's record's chain link, kept on its timeline row."""
        if not self._migrated:
            self.migrate()
            self._migrated = True
        conn = self.connection()
        started, start_ns = time.monotonic(), time.time_ns()
        try:
            with conn.transaction():
                new = readmodels.apply(conn, self.schema, events, links)
                if marks and self._provenance:
                    provenance.record(conn, self.schema, marks)
        except Exception as exc:
            if is_database_error(exc):
                self.close()  # reconnect next time; the loop reads the batch again
                self._migrated = False
            raise
        self.applied += new
        _projected.add(new, {"schema": self.schema})
        _batch_seconds.record(time.monotonic() - started, {"schema": self.schema})
        _spans(events, traceparents, start_ns)
        return new


def _spans(
    events: Sequence[Incoming], traceparents: Sequence[str | None] | None, start_ns: int
) -> None:
    """One span per event, spanning its batch's transaction, in the event's trace."""
    end_ns = time.time_ns()
    for n, e in enumerate(events):
        parent = (traceparents[n] if traceparents else None) or e.metadata.get("traceparent")
        span = _tracer.start_span(
            f"project {e.event_type}",
            context=telemetry.context_from_traceparent(parent),
            kind=trace.SpanKind.CONSUMER,
            start_time=start_ns,
            attributes={
                "messaging.system": "kafka",
                "messaging.source.name": e.topic,
                "messaging.kafka.partition": e.partition,
                "messaging.kafka.offset": e.offset,
                "likvard.event_type": e.event_type,
                "likvard.event_id": e.event_id,
            },
        )
        span.end(end_time=end_ns)


class ProjectionWorker:
    """Kafka -> decode -> `Projector.apply`, one batch at a time, through `BatchLoop`."""

    def __init__(
        self,
        projector: Projector,
        catalogue: Catalogue,
        topics: list[str],
        *,
        group: str,
        batch_size: int = 1000,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.projector = projector
        self.catalogue = catalogue
        self.topics = topics
        self.batch_size = batch_size
        self.progress = Progress(f"{group}", heartbeat=heartbeat)
        self.lag = ConsumerLag(group)
        self.undecodable = 0

    def handle(self, messages: list[Message]) -> None:
        events: list[Incoming] = []
        parents: list[str | None] = []
        links: list[Link | None] = []
        marks = provenance.Marks()
        for m in messages:
            where = (str(m.topic()), int(m.partition() or 0), int(m.offset() or 0))
            headers = record_headers(m)
            named = {k: v or b"" for k, v in headers}
            marks.add(*where, named)
            value = m.value() or b""
            try:
                events.append(decode_event(self.catalogue, *where, value))
            except CodecError as exc:
                self.undecodable += 1
                log.warning("skipping %s[%s]@%s: %s", *where, exc)
                continue
            parents.append(_header(headers, "traceparent"))
            links.append(link_of(named, value))
        if events or marks:
            self.projector.apply(events, parents, marks, links)

    def run(self, consumer: ConsumerSource, stop: threading.Event) -> None:
        loop = BatchLoop(
            consumer,
            self.topics,
            self.handle,
            self.progress,
            batch_size=self.batch_size,
            poll_timeout=0.5,
            lag=self.lag,
            idle_check=self.projector.ping,
        )
        try:
            loop.run(stop)
        finally:
            self.projector.close()


def _header(headers: Sequence[tuple[str, bytes | None]], name: str) -> str | None:
    for key, value in headers:
        if key == name and value is not None:
            return value.decode("utf-8", errors="replace")
    return None


def build(
    settings: Settings,
    schema: str = "projections",
    *,
    batch_size: int = 1000,
    heartbeat: Heartbeat | None = None,
    consumer_overrides: dict[str, Any] | None = None,
) -> tuple[ProjectionWorker, ConsumerSource]:
    """The worker and a factory of its consumer (rebuilt after a fatal error)."""
    dsn = settings.require_database()
    bootstrap = settings.require_kafka()
    group = f"{settings.topic_prefix}likvard-projections"
    topics = [settings.topic(t) for t in readmodels.SOURCE_TOPICS]
    worker = ProjectionWorker(
        Projector(dsn, schema),
        Catalogue.load(),
        topics,
        group=group,
        batch_size=batch_size,
        heartbeat=heartbeat,
    )
    overrides = {
        "fetch.wait.max.ms": 100,
        "queued.max.messages.kbytes": 65536,
        **(consumer_overrides or {}),
    }

    def consumer() -> Consumer:
        return Consumer(consumer_config(bootstrap, group, **overrides))

    return worker, consumer
