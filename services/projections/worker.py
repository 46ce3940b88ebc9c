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
from collections.abc import AsyncIterator, Sequence
from typing import Any

import faust
import psycopg
from faust.streams import Stream
from faust.types import StreamT

from likvard.codec import Catalogue, CodecError
from likvard.config import Settings
from likvard.inbox import Incoming, decode_event
from likvard.topics import SERVICE_TOPICS
from services.projections import readmodels

log = logging.getLogger("likvard.projections")


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

    def apply(self, events: Sequence[Incoming]) -> int:
        if not self._migrated:
            self.migrate()
            self._migrated = True
        conn = self.connection()
        try:
            with conn.transaction():
                new = readmodels.apply(conn, self.schema, events)
        except psycopg.OperationalError:
            self._conn = None  # reconnect next time; the batch is re-delivered
            raise
        self.applied += new
        return new


def make_app(
    settings: Settings,
    *,
    schema: str = "projections",
    app_id: str | None = None,
    batch_size: int = 1000,
    within: float = 0.5,
    catalogue: Catalogue | None = None,
) -> faust.App:
    dsn = settings.require_database()
    bootstrap = settings.require_kafka()
    catalogue = catalogue or Catalogue.load()
    session = int(os.environ.get("LIKVARD_CONSUMER_SESSION_TIMEOUT_MS", "10000")) / 1000
    app = faust.App(
        app_id or f"{settings.topic_prefix}likvard-projections",
        broker=f"kafka://{bootstrap}",
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

    @app.agent(topics)
    async def project(stream: StreamT[Any]) -> AsyncIterator[None]:
        assert isinstance(stream, Stream)  # take_events is on the implementation only
        async for batch in stream.take_events(batch_size, within=within):
            events: list[Incoming] = []
            for e in batch:
                m = e.message
                try:
                    events.append(
                        decode_event(catalogue, m.topic, m.partition, m.offset, m.value or b"")
                    )
                except CodecError as exc:
                    log.warning("skipping %s[%s]@%s: %s", m.topic, m.partition, m.offset, exc)
            if events:
                await asyncio.to_thread(projector.apply, events)
            yield None

    return app


def run(settings: Settings, schema: str = "projections") -> None:
    """Run the worker until SIGTERM/SIGINT (`likvard project`)."""
    batch = int(os.environ.get("LIKVARD_PROJECTION_BATCH_SIZE", "1000"))
    app = make_app(settings, schema=schema, batch_size=batch)
    worker = faust.Worker(app, loglevel="WARN", quiet=True)
    worker.execute_from_commandline()
