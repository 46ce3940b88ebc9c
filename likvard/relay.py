"""Outbox relay: publishes a service's outbox to Kafka, in order per case, never skipping.

Why not `WHERE id > last_seen`: identity values are taken before commit, so a transaction
that commits late makes rows appear *behind* a cursor, and they would be skipped for good.
The relay instead claims whatever outbox rows exist now (`FOR UPDATE SKIP LOCKED`,
oldest first), publishes them, and deletes them only after the broker acknowledged them.
A late-committing row is simply claimed by a later batch.

Order per case: appends to one stream are serialised by the stream's row lock, so a case's
later events get larger outbox ids and become visible only after its earlier ones. One
relay per service is active at a time (a session advisory lock elects it; standbys wait),
so a case's rows are never in flight in two relays. Within a batch, if one event of a case
fails, the case's later events are kept in the outbox too, and re-sent after it.

A crash between publish and delete re-publishes rows: consumers de-duplicate by event id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from psycopg import sql

from likvard import telemetry
from likvard.config import kafka_client_settings, no_auto_create
from likvard.faults import fault_point
from likvard.ops import Heartbeat, Progress
from likvard.topics import TopicSpec, ensure_topics

log = logging.getLogger("likvard.relay")

CONTENT_TYPE = b"application/vnd.apache.avro+binary; encoding=single-object"


@dataclass(frozen=True)
class OutboxRow:
    id: int
    stream_id: str
    stream_version: int
    key: str
    event_id: str
    event_type: str
    topic: str
    value: bytes
    traceparent: str | None
    prev_hash: bytes | None = None
    hash: bytes | None = None


_meter = telemetry.meter("likvard.relay")
_published = _meter.create_counter(
    "likvard.relay.published", unit="{event}", description="Events published to Kafka."
)
_failures = _meter.create_counter(
    "likvard.relay.failures",
    unit="{batch}",
    description="Batches with a failed or stalled delivery (the producer is rebuilt).",
)


def register_outbox_gauges(dsn: str, schema: str, service: str) -> None:
    """`likvard.outbox.depth` (rows waiting) and `likvard.outbox.age` (seconds the oldest
    has waited) of one service, read from the database when metrics are collected."""
    table = sql.SQL("SELECT count(*), extract(epoch FROM now() - min(created_at)) FROM {}.outbox")
    query = table.format(sql.Identifier(schema))
    latest: dict[str, float] = {}

    def read() -> dict[str, float]:
        try:
            with psycopg.connect(dsn, connect_timeout=3) as conn:
                row = conn.execute(query).fetchone()
            latest.update(
                depth=float(row[0]) if row else 0.0, age=float(row[1] or 0) if row else 0.0
            )
        except psycopg.Error:
            log.debug("outbox gauges: the database did not answer", exc_info=True)
        return latest

    def depth(_options: CallbackOptions) -> Iterable[Observation]:
        values = read()
        if "depth" in values:
            yield Observation(values["depth"], {"service": service})

    def age(_options: CallbackOptions) -> Iterable[Observation]:
        if "age" in latest:  # read by `depth` in the same collection
            yield Observation(latest["age"], {"service": service})

    _meter.create_observable_gauge(
        "likvard.outbox.depth",
        [depth],
        unit="{event}",
        description="Outbox rows not yet published.",
    )
    _meter.create_observable_gauge(
        "likvard.outbox.age",
        [age],
        unit="s",
        description="How long the oldest outbox row has waited to be published.",
    )


@dataclass
class RelayStats:
    published: int = 0
    batches: int = 0
    failures: int = 0
    producer_rebuilds: int = 0


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Idempotent producer, all replicas acknowledge; a stalled delivery fails in bounded time."""
    config: dict[str, Any] = {
        **no_auto_create(),  # topics come from deploy/topics.toml, never from a client
        **kafka_client_settings(),
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": 15000,
        "socket.keepalive.enable": True,
    }
    config.update(overrides)
    return config


Headers = list[tuple[str, str | bytes | None]]


def event_headers(row: OutboxRow, traceparent: str | None) -> Headers:
    """The record headers. `stream_id`, `prev_hash` and `hash` (hex) carry the event's link
    in its stream's hash chain, so an auditor can verify the chain from Kafka alone."""
    headers: Headers = [
        ("event_type", row.event_type.encode()),
        ("event_id", row.event_id.encode()),
        ("stream_id", row.stream_id.encode()),
        ("stream_version", str(row.stream_version).encode()),
        ("content-type", CONTENT_TYPE),
    ]
    if row.prev_hash is not None and row.hash is not None:
        headers.append(("prev_hash", row.prev_hash.hex().encode()))
        headers.append(("hash", row.hash.hex().encode()))
    if traceparent:
        headers.append(("traceparent", traceparent.encode()))
    return headers


def produce(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    on_delivery: Callable[[KafkaError | None, Message], None],
) -> None:
    """Queue one record; when the producer's queue is full, serve callbacks and retry."""
    while True:
        try:
            producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.05)


class Deliveries:
    """The delivery reports of a batch of records produced under keys of the caller's
    choosing: which failed, or never got a report before the flush gave up."""

    def __init__(self) -> None:
        self.results: dict[int, KafkaError | None] = {}

    def report_to(self, key: int) -> Callable[[KafkaError | None, Message], None]:
        def callback(err: KafkaError | None, _msg: Message) -> None:
            self.results[key] = err

        return callback

    def failed(self, keys: Iterable[int]) -> set[int]:
        return {k for k in keys if k not in self.results or self.results[k] is not None}

    def first_error(self) -> KafkaError | str:
        return next((e for e in self.results.values() if e is not None), "no delivery report")


def delivered_prefix(rows: list[OutboxRow], failed_ids: set[int]) -> list[int]:
    """Ids safe to delete: per stream, the rows before its first failure.

    A case's later event may have reached Kafka although an earlier one failed; keeping it
    means it is sent again after the earlier one, so consumers see the case in order (the
    early copy is a duplicate they drop by event id).
    """
    blocked: set[str] = set()
    ok: list[int] = []
    for row in rows:
        if row.stream_id in blocked:
            continue
        if row.id in failed_ids:
            blocked.add(row.stream_id)
            continue
        ok.append(row.id)
    return ok


class OutboxRelay:
    def __init__(
        self,
        dsn: str,
        schema: str,
        bootstrap: str,
        *,
        topics: list[TopicSpec] | None = None,
        batch_size: int = 500,
        flush_timeout: float = 20.0,
        idle_wait: float = 1.0,
        producer_overrides: dict[str, Any] | None = None,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.heartbeat = heartbeat or Heartbeat()
        self.progress = Progress(f"{schema}-relay", heartbeat=self.heartbeat)
        self.dsn = dsn
        self.schema = schema
        self.bootstrap = bootstrap
        self.topics = topics or []
        self.batch_size = batch_size
        self.flush_timeout = flush_timeout
        self.idle_wait = idle_wait
        self.producer_overrides = producer_overrides or {}
        self._producer_factory = producer_factory
        self._producer: Producer | None = None
        self.stats = RelayStats()
        self._tracer = telemetry.tracer("likvard.relay")
        self._t = sql.Identifier(schema)

    # -- producer lifecycle ------------------------------------------------------------
    def producer(self) -> Producer:
        if self._producer is None:
            self._producer = self._producer_factory(
                producer_config(self.bootstrap, **self.producer_overrides)
            )
        return self._producer

    def rebuild_producer(self) -> None:
        """Drop a producer whose deliveries failed or stalled (an idempotent producer stalls
        for good after a broker restart), and re-create the topics a wiped broker lost."""
        old, self._producer = self._producer, None
        if old is not None:
            try:
                old.purge()
                old.flush(0)
            except Exception:  # the old producer is being thrown away either way
                log.debug("purging the old producer failed", exc_info=True)
        self.stats.producer_rebuilds += 1
        if self.topics:
            try:
                ensure_topics(self.bootstrap, self.topics, timeout=10)
            except Exception as exc:
                log.warning("could not re-create topics after a delivery failure: %s", exc)

    # -- one batch ---------------------------------------------------------------------
    def _claim(self, conn: psycopg.Connection[Any]) -> list[OutboxRow]:
        rows = conn.execute(
            sql.SQL(
                "SELECT o.id, o.stream_id, o.stream_version, o.key, o.event_id::text,"
                " o.event_type, o.topic, o.value, o.traceparent, e.prev_hash, e.hash"
                " FROM {t}.outbox o LEFT JOIN {t}.events e USING (global_position)"
                " ORDER BY o.id LIMIT %s FOR UPDATE OF o SKIP LOCKED"
            ).format(t=self._t),
            (self.batch_size,),
        ).fetchall()
        return [
            OutboxRow(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                bytes(r[7]),
                r[8],
                None if r[9] is None else bytes(r[9]),
                None if r[10] is None else bytes(r[10]),
            )
            for r in rows
        ]

    def _publish(self, rows: list[OutboxRow]) -> set[int]:
        """Produce a batch and wait for every delivery report; returns the ids that failed."""
        producer = self.producer()
        deliveries = Deliveries()
        for row in rows:
            parent = telemetry.context_from_traceparent(row.traceparent)
            with self._tracer.start_as_current_span(
                f"publish {row.topic}",
                context=parent,
                kind=trace.SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "kafka",
                    "messaging.destination.name": row.topic,
                    "likvard.event_type": row.event_type,
                    "likvard.event_id": row.event_id,
                },
            ):
                headers = event_headers(row, telemetry.current_traceparent())
                try:
                    produce(
                        producer,
                        row.topic,
                        row.key.encode(),
                        row.value,
                        headers,
                        deliveries.report_to(row.id),
                    )
                except KafkaException as exc:  # refused at once (over-size): only its case waits
                    err = exc.args[0] if exc.args else exc
                    if isinstance(err, KafkaError) and err.fatal():
                        raise
                    log.error("event %s could not be produced: %s", row.event_id, err)
        try:
            remaining = producer.flush(self.flush_timeout)
        except KafkaException as exc:  # fatal (UNKNOWN_PRODUCER_ID): rebuilt by the caller
            log.warning("the producer failed for good: %s", exc.args[0] if exc.args else exc)
            return {row.id for row in rows}
        failed = deliveries.failed(row.id for row in rows)
        if failed:
            log.warning(
                "%d of %d deliveries failed or stalled (%s still queued): %s",
                len(failed),
                len(rows),
                remaining,
                deliveries.first_error(),
            )
        return failed

    def run_once(self, conn: psycopg.Connection[Any]) -> int:
        """Publish one batch; returns how many rows were published and deleted."""
        with conn.transaction():
            rows = self._claim(conn)
            if not rows:
                return 0
            try:
                failed = self._publish(rows)
            except KafkaException as exc:  # a fatal error while producing
                log.warning("producing failed for good: %s", exc.args[0] if exc.args else exc)
                failed = {row.id for row in rows}
            fault_point("relay.after_publish")
            done = delivered_prefix(rows, failed)
            if done:
                conn.execute(
                    sql.SQL("DELETE FROM {}.outbox WHERE id = ANY(%s)").format(self._t), (done,)
                )
        self.stats.batches += 1
        self.stats.published += len(done)
        if failed:
            self.progress.failed("delivery")
        else:
            self.progress.completed()
        attributes = {"service": self.schema}
        _published.add(len(done), attributes)
        if failed:
            self.stats.failures += 1
            _failures.add(1, attributes)
            self.rebuild_producer()
        return len(done)

    # -- the loop ----------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Publish until `stop` is set; waits for NOTIFY (or idle_wait) when the outbox is
        empty, and reconnects after database errors."""
        backoff = 0.5
        while not stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as leader:
                    self.progress.completed()  # the database answers: a standby is well too
                    self._wait_for_leadership(leader, stop)
                    if stop.is_set():
                        return
                    log.info("relay for schema %s is active", self.schema)
                    leader.execute(
                        sql.SQL("LISTEN {}").format(sql.Identifier(f"likvard_outbox_{self.schema}"))
                    )
                    with psycopg.connect(self.dsn) as work:
                        while not stop.is_set():
                            self.heartbeat.beat()
                            failures_before = self.stats.failures
                            n = self.run_once(work)
                            if self.stats.failures > failures_before:
                                stop.wait(backoff)  # the broker is unwell: do not spin
                                backoff = min(backoff * 2, 10.0)
                            elif n == 0:
                                self._idle(leader, stop)
                                backoff = 0.5
            except psycopg.Error as exc:
                self.progress.failed(type(exc).__name__, database=True)
                log.warning(
                    "relay lost the database (%s); reconnecting in %.1fs",
                    type(exc).__name__,
                    backoff,
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception as exc:  # never exit: the outbox must keep draining
                self.progress.failed(type(exc).__name__)
                log.exception(
                    "relay loop failed (%s); retrying in %.1fs", type(exc).__name__, backoff
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        if self._producer is not None:
            self._producer.flush(5)

    def _wait_for_leadership(self, conn: psycopg.Connection[Any], stop: threading.Event) -> None:
        key = f"likvard.relay.{self.schema}"
        while not stop.is_set():
            self.heartbeat.beat()  # a standby is alive too
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
            if row and row[0]:
                return
            stop.wait(1.0)

    def _idle(self, leader: psycopg.Connection[Any], stop: threading.Event) -> None:
        """Sleep until an append notifies, the idle timeout passes, or we are stopped."""
        deadline = time.monotonic() + self.idle_wait
        while not stop.is_set() and time.monotonic() < deadline:
            for _ in leader.notifies(timeout=min(0.2, self.idle_wait), stop_after=1):
                return
