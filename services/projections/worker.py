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

Decoding and applying overlap (issue 16): a batch is cut into chunks, this thread decodes
one chunk while a thread of the worker's own applies the previous one in its transaction.
Chunks are applied one after another, in order; after a chunk fails no later chunk of the
batch is applied, and the batch fails, so the loop rewinds it and commits no offset past an
effect that is not committed (what the failed attempt did commit comes again as duplicates).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
from likvard.topic_reader import header_map
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
    """One span per event, spanning its batch's transaction, in the event's trace; none when
    spans go nowhere (`telemetry.spans_exported`): they were a third of the applying
    thread's time."""
    if not telemetry.spans_exported():
        return
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


@dataclass
class _Chunk:
    """A chunk of a batch, decoded: its events, their traceparents and links, its marks."""

    events: list[Incoming] = field(default_factory=list)
    parents: list[str | None] = field(default_factory=list)
    links: list[Link | None] = field(default_factory=list)
    marks: provenance.Marks = field(default_factory=provenance.Marks)


class ProjectionWorker:
    """Kafka -> decode -> `Projector.apply`, one batch at a time, through `BatchLoop`;
    decoding a chunk overlaps applying the one before (`chunk` records each)."""

    def __init__(
        self,
        projector: Projector,
        catalogue: Catalogue,
        topics: list[str],
        *,
        group: str,
        batch_size: int = 1000,
        chunk: int = 1000,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.projector = projector
        self.catalogue = catalogue
        self.topics = topics
        self.batch_size = batch_size
        self.chunk = max(1, chunk)
        self.progress = Progress(f"{group}", heartbeat=heartbeat)
        self.lag = ConsumerLag(group)
        self.undecodable = 0
        self._applier: ThreadPoolExecutor | None = None

    def _decode(self, messages: Sequence[Message]) -> _Chunk:
        out = _Chunk()
        decode, catalogue = decode_event, self.catalogue
        for m in messages:
            where = (str(m.topic()), int(m.partition() or 0), int(m.offset() or 0))
            named = header_map(m)
            out.marks.add(*where, named)
            value = m.value() or b""
            try:
                out.events.append(decode(catalogue, *where, value))
            except CodecError as exc:
                self.undecodable += 1
                log.warning("skipping %s[%s]@%s: %s", *where, exc)
                continue
            parent = named.get("traceparent")
            out.parents.append(parent.decode("utf-8", errors="replace") if parent else None)
            out.links.append(link_of(named, value))
        return out

    def _apply(self, chunk: _Chunk, failed: threading.Event) -> int:
        if failed.is_set():  # an earlier chunk of the batch failed: apply nothing after it
            raise _Skipped
        try:
            return self.projector.apply(chunk.events, chunk.parents, chunk.marks, chunk.links)
        except BaseException:
            failed.set()
            raise

    def handle(self, messages: list[Message]) -> None:
        """Apply a batch; returns only when every chunk of it is committed, raises (the
        first chunk's error) when one failed."""
        if self._applier is None:
            self._applier = ThreadPoolExecutor(1, thread_name_prefix="projection-apply")
        failed = threading.Event()
        pending: list[Future[int]] = []
        try:
            for start in range(0, len(messages), self.chunk):
                if failed.is_set():
                    break
                chunk = self._decode(messages[start : start + self.chunk])
                if chunk.events or chunk.marks:
                    pending.append(self._applier.submit(self._apply, chunk, failed))
        finally:
            errors = []
            for f in pending:
                exc = f.exception()
                if exc is not None and not isinstance(exc, _Skipped):
                    errors.append(exc)
        if errors:
            raise errors[0]
        if failed.is_set():
            raise RuntimeError("a chunk of the batch failed")

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
            if self._applier is not None:
                self._applier.shutdown(wait=True)
                self._applier = None
            self.projector.close()


class _Skipped(Exception):
    """A chunk not applied because an earlier chunk of its batch failed."""


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
        chunk=max(500, batch_size // 4),  # at least 4 chunks to overlap in a large batch
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
