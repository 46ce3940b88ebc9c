"""Helpers for tests on real servers: consume a topic with a deadline, wait for conditions."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from likvard.config import Settings
    from likvard.domain import DomainEvent
    from likvard.eventstore import EventStore, NewEvent
    from likvard.inbox import InboxConsumer, Incoming
    from likvard.ingest import IngestRules, IngestWorker, Rejected, StreamView
    from likvard.known_cases import KnownCase


FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 200, "fetch.wait.max.ms": 10}


class Background:
    """Relays and consumers running in threads, stopped together."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=(*args, self.stop), daemon=True)
        t.start()
        self.threads.append(t)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@dataclass
class RunningService:
    """A service under test: where it answers and its event store."""

    base_url: str
    schema: str
    topic: str
    store: EventStore


@dataclass
class CareStack:
    """The three write services with their relays and consumers, as `likvard up` runs them."""

    intake: RunningService
    referral: RunningService
    followup: RunningService
    followup_inbox: InboxConsumer


@dataclass
class IngestStack:
    """The three services with their relays, consumers and district ingest workers."""

    settings: Settings
    stores: dict[str, EventStore]
    workers: dict[str, IngestWorker]
    topics: dict[str, str]
    ingest_topic: str
    dead_letter_topic: str
    metrics: InMemoryMetricReader


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


def wait_for(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll until `check()` holds; fail the test with `what` at the deadline (no bare sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def consume(
    bootstrap: str, topic: str, *, at_least: int, timeout: float = 20.0, settle: float = 0.5
) -> list[Record]:
    """Read a topic from offset 0 of every partition (no consumer group, so no join delay)
    until at least `at_least` records arrived, then `settle` more seconds to catch extras."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    meta = admin.list_topics(topic, timeout=10)
    partitions = list(meta.topics[topic].partitions)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 200,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    settle_until: float | None = None
    try:
        while time.monotonic() < deadline:
            if settle_until is None and len(records) >= at_least:
                settle_until = time.monotonic() + settle
            if settle_until is not None and time.monotonic() >= settle_until:
                break
            msg = consumer.poll(0.1)
            if msg is None or msg.error():
                continue
            headers = {
                str(k): v if isinstance(v, bytes) else str(v or "").encode()
                for k, v in list(msg.headers() or [])
            }
            records.append(
                Record(
                    str(msg.topic()),
                    int(msg.partition() or 0),
                    int(msg.offset() or 0),
                    msg.key(),
                    msg.value() or b"",
                    headers,
                )
            )
    finally:
        consumer.close()
    return records


def kernel_event(event_type: str, data: dict[str, object], district: str = "nordost") -> NewEvent:
    """An event for kernel tests, built without the intake decider."""
    from datetime import UTC, datetime

    from likvard.eventstore import NewEvent

    return NewEvent(
        event_type=event_type,
        data=data,
        occurred_at=datetime.now(UTC),
        district=district,
        actor="cw-1",
        correlation_id=str(uuid.uuid4()),
    )


def registered(district: str = "nordost", **overrides: object) -> NewEvent:
    """A valid IntakeRegistered with no personal details (a birth year, given as an
    override, needs a store that seals: the `store` fixture's, or intake's)."""
    data: dict[str, object] = {
        "person": "ab" * 32,
        "district": district,
        "substances": ["ALCOHOL"],
        "referral_source": "SELF",
        "children_in_household": "NO",
    }
    data.update(overrides)
    return kernel_event("IntakeRegistered", data, district)


def closed(district: str = "nordost") -> NewEvent:
    return kernel_event("CaseClosed", {"reason": "GOALS_REACHED"}, district)


def reopened(district: str = "nordost") -> NewEvent:
    return kernel_event("CaseReopened", {"reason": "RELAPSE"}, district)


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run an ASGI app on a real uvicorn server in a thread; yields its base URL."""
    import uvicorn

    from likvard.cli.devstack import free_port

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 30, "the test server to start")
    assert server.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def intake_event(
    case_id: str, event_type: str, data: dict[str, Any], version: int, district: str = "nordost"
) -> Incoming:
    """An intake event as a consuming service receives it (for seeding known cases)."""
    from likvard.inbox import Incoming

    event_id = str(uuid.uuid4())
    metadata = {
        "event_id": event_id,
        "event_type": event_type,
        "case_id": case_id,
        "stream_version": version,
        "district": district,
        "correlation_id": "seed",
    }
    return Incoming("likvard.intake.v1", 0, version, event_id, event_type, case_id, metadata, data)


def district_incoming(
    event_type: str,
    data: dict[str, Any],
    *,
    case_id: str,
    at: datetime,
    event_id: str = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6",
) -> Incoming:
    """A district system's event as the ingest path's envelope check hands it to the rules."""
    from likvard.inbox import Incoming

    metadata = {
        "event_id": event_id,
        "event_type": event_type,
        "case_id": case_id,
        "stream_version": 0,
        "occurred_at": at,
        "recorded_at": at,
        "producer": "nordost-treserva",
        "district": "nordost",
        "actor": "cw-4711",
        "correlation_id": "corr-17",
        "causation_id": None,
        "traceparent": None,
    }
    return Incoming(
        "likvard.district-ingest.v1", 0, 5, event_id, event_type, case_id, metadata, data
    )


def judged(
    rules: IngestRules, incoming: Incoming, stream: StreamView, case: KnownCase | None
) -> list[DomainEvent]:
    """What the ingest processor stores of a district event: its rules decide, then the
    match with what was sent is checked."""
    from likvard.domain import DomainEvent
    from likvard.ingest import judge

    return [
        DomainEvent(e.type, e.data, e.occurred_at) for e in judge(rules, incoming, stream, case)
    ]


def refused_by(
    rules: IngestRules, incoming: Incoming, stream: StreamView, case: KnownCase | None
) -> Rejected:
    """How the ingest processor refuses a district event (fails the test if it is not)."""
    import pytest

    from likvard.ingest import Rejected, judge

    with pytest.raises(Rejected) as refused:
        judge(rules, incoming, stream, case)
    return refused.value


@contextmanager
def live_worker(env: dict[str, str], schema: str, log: Path) -> Iterator[None]:
    """`likvard project --schema SCHEMA` as a process, its output in `log`; stopped with
    SIGTERM (killed if it does not stop) when the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "likvard.cli", "project", "--schema", schema],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield
        finally:
            stop_process(proc, signal.SIGTERM, 30)


TEST_KEK = base64.b64encode(bytes(range(7, 39))).decode()
"""The tests' key-encryption key (32 distinct bytes): never a production secret."""


def made_schemas(database_url: str, prefix: str = "") -> Iterator[Callable[[str], str]]:
    """A fixture body: makes fresh schema names, and drops every schema made when done."""
    import psycopg
    from psycopg import sql

    made: list[str] = []

    def make(name: str) -> str:
        made.append(f"{prefix}{name}_{uuid.uuid4().hex[:12]}")
        return made[-1]

    yield make
    with psycopg.connect(database_url, autocommit=True) as conn:
        for schema in made:
            for name in (schema, f"{schema}_keys"):  # and an intake schema's key store
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name))
                )


def env_without_stack() -> dict[str, str]:
    """This process's environment without the settings that point at a running stack, so a
    `likvard up` started by a test brings its own servers."""
    import os

    skip = (
        "LIKVARD_DATABASE_URL",
        "KAFKA_BOOTSTRAP_SERVERS",
        "LIKVARD_PSEUDONYM_SECRET",
        "LIKVARD_TOPIC_PREFIX",
    )
    return {k: v for k, v in os.environ.items() if k not in skip}


@contextmanager
def likvard_up(
    args: list[str], env: dict[str, str], log: Path, timeout: float = 60
) -> Iterator[subprocess.Popen[bytes]]:
    """`likvard up ARGS` with its output in `log`, once it has said the stack is up and
    printed all it says then (its last line, "Press Ctrl-C to stop."; it must not have
    stopped); stopped with Ctrl-C (SIGINT) when the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "likvard.cli", "up", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_for(
                lambda: "Press Ctrl-C to stop." in log.read_text() or proc.poll() is not None,
                timeout,
                "`likvard up` to report the stack up",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its output:\n{log.read_text()[-4000:]}") from None
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, wait: float = 60) -> None:
    """Ask a process to stop with `sig`; kill it if it has not stopped within `wait` s."""
    proc.send_signal(sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
