"""The live projection worker: a faust agent over every service topic.

It reads batches with `stream.take_events(...)` and hands each batch to the same
`readmodels.apply` that replay uses, in one PostgreSQL transaction that also records the
event ids: a re-delivered batch (a worker killed mid-stream, a rebalance, `republish`)
changes nothing. Read-model state lives in PostgreSQL, never in faust tables (the dev
broker's changelog recovery can miss records: see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import faust
import psycopg
from faust.streams import Stream
from faust.types import StreamT
from opentelemetry import trace

from likvard import telemetry
from likvard.codec import Catalogue, CodecError
from likvard.config import Settings, kafka_client_settings
from likvard.inbox import Incoming, decode_event
from likvard.ops import Heartbeat
from likvard.telemetry import ConsumerLag
from likvard.topics import SERVICE_TOPICS
from services.projections import readmodels

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
        self.applied = 0

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.dsn, autocommit=True)
        return self._conn

    def migrate(self) -> None:
        conn = self.connection()
        with conn.transaction():
            readmodels.migrate(conn, self.schema)

    def apply(
        self, events: Sequence[Incoming], traceparents: Sequence[str | None] | None = None
    ) -> int:
        """Apply a batch in one transaction; returns how many events were new. Each event
        gets a span in its own trace (`traceparents`: each record's Kafka header, the
        relay's publish span), so one trace runs from the HTTP request to the read model."""
        if not self._migrated:
            self.migrate()
            self._migrated = True
        conn = self.connection()
        started, start_ns = time.monotonic(), time.time_ns()
        try:
            with conn.transaction():
                new = readmodels.apply(conn, self.schema, events)
        except psycopg.OperationalError:
            self._conn = None  # reconnect next time; the batch is re-delivered
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


def make_app(
    settings: Settings,
    *,
    schema: str = "projections",
    app_id: str | None = None,
    batch_size: int = 1000,
    within: float = 0.5,
    catalogue: Catalogue | None = None,
    heartbeat: Heartbeat | None = None,
) -> faust.App:
    dsn = settings.require_database()
    bootstrap = settings.require_kafka()
    catalogue = catalogue or Catalogue.load()
    session = int(os.environ.get("LIKVARD_CONSUMER_SESSION_TIMEOUT_MS", "10000")) / 1000
    app = faust.App(
        app_id or f"{settings.topic_prefix}likvard-projections",
        broker=[f"kafka://{host.strip()}" for host in bootstrap.split(",")],
        broker_credentials=faust_credentials(kafka_client_settings()),
        # Faust wants a data directory even with memory stores: a temporary one, since
        # the read models live in PostgreSQL and the working directory may be read-only.
        datadir=tempfile.mkdtemp(prefix="likvard-faust-"),
        store="memory://",
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session,
        broker_heartbeat_interval=session / 10,
    )
    topics = app.topic(
        *[settings.topic(t) for t in SERVICE_TOPICS.values()],
        value_serializer="raw",
        key_serializer="raw",
    )
    projector = Projector(dsn, schema)
    beat = heartbeat or Heartbeat()
    lag = ConsumerLag(app.conf.id)

    @app.agent(topics)
    async def project(stream: StreamT[Any]) -> AsyncIterator[None]:
        assert isinstance(stream, Stream)  # take_events is on the implementation only
        async for batch in stream.take_events(batch_size, within=within):
            events: list[Incoming] = []
            parents: list[str | None] = []
            for e in batch:
                m = e.message
                try:
                    events.append(
                        decode_event(catalogue, m.topic, m.partition, m.offset, m.value or b"")
                    )
                    parents.append(_header(m.headers, "traceparent"))
                except CodecError as exc:
                    log.warning("skipping %s[%s]@%s: %s", m.topic, m.partition, m.offset, exc)
            if events:
                await asyncio.to_thread(projector.apply, events, parents)
            last = {e.message.tp: e.message.offset for e in batch}  # per partition touched
            for tp, offset in last.items():  # the lag after this batch
                highwater = app.consumer.highwater(tp)
                if highwater is not None:
                    lag.set(tp.topic, tp.partition, highwater - offset - 1)
            yield None

    @app.timer(interval=5.0)  # type: ignore[untyped-decorator]
    async def alive() -> None:
        """The event loop turns: the liveness probe's heartbeat (batches may be rare)."""
        beat.beat()

    return app


def faust_credentials(settings: dict[str, str]) -> Any:
    """The faust (aiokafka) form of the LIKVARD_KAFKA_* TLS and SASL settings that the
    librdkafka clients take as they are (`likvard.config.kafka_client_settings`)."""
    protocol = settings.get("security.protocol", "PLAINTEXT").upper()
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.get("ssl.ca.location"))
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        return faust.SASLCredentials(
            username=settings.get("sasl.username"),
            password=settings.get("sasl.password"),
            mechanism=settings.get("sasl.mechanism", "PLAIN").upper(),
            ssl_context=context,
        )
    raise ValueError(f"LIKVARD_KAFKA_SECURITY_PROTOCOL {protocol!r} is not one Likvärd knows")


def _header(headers: Any, name: str) -> str | None:
    """A header's value as text from faust's headers (a list of pairs or a mapping)."""
    pairs = headers.items() if isinstance(headers, dict) else (headers or [])
    for key, value in pairs:
        if key == name and value is not None:
            return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
    return None


def run(
    settings: Settings, schema: str = "projections", heartbeat: Heartbeat | None = None
) -> None:
    """Run the worker until SIGTERM/SIGINT (`likvard project`)."""
    batch = int(os.environ.get("LIKVARD_PROJECTION_BATCH_SIZE", "1000"))
    app = make_app(settings, schema=schema, batch_size=batch, heartbeat=heartbeat)
    worker = faust.Worker(app, loglevel="WARN", quiet=True)
    worker.execute_from_commandline()
