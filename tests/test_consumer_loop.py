"""The consumer loop's rules: a failed batch is applied again, never skipped or committed
past; a stall shows in the probe (pure parts with a fake clock, the loop on a real broker)."""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from likvard.cli.devstack import TansuBroker
from likvard.config import no_auto_create
from likvard.consumer_loop import Backoff, BatchLoop, is_database_error
from likvard.inbox import consumer_config
from likvard.ops import Progress
from tests.support import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def progress(clock: Clock, stall: float = 60.0) -> Progress:
    return Progress("t", stall_seconds=stall, clock=clock, register=False)


def test_lag_without_a_completed_batch_for_the_stall_time_is_a_stall() -> None:
    clock = Clock()
    p = progress(clock)
    p.set_lag({("t", 0): 5})
    clock.now += 59
    assert not p.stalled() and p.alive(liveness_seconds=1e9)
    clock.now += 2
    assert p.stalled() and not p.alive(liveness_seconds=1e9)
    p.completed()  # a batch got through: progress again
    assert not p.stalled()


def test_no_lag_is_never_a_stall_however_idle() -> None:
    clock = Clock()
    p = progress(clock)
    p.set_lag({("t", 0): 0, ("t", 1): 0})
    clock.now += 10_000
    assert not p.stalled()


def test_a_batch_failing_for_the_stall_time_is_a_stall_and_not_ready() -> None:
    clock = Clock()
    p = progress(clock)
    p.failed("OperationalError", database=True)
    assert not p.ready() and not p.stalled()
    clock.now += 30
    p.failed("OperationalError", database=True)  # still failing: counts from the first
    clock.now += 31
    assert p.stalled()
    p.completed()
    assert p.ready() and not p.stalled()


def test_lag_that_persists_while_batches_complete_is_catching_up() -> None:
    clock = Clock()
    p = progress(clock)
    for _ in range(10):
        p.set_lag({("t", 0): 1000})
        clock.now += 30
        p.completed()
    assert not p.stalled()


def test_backoff_doubles_to_its_limit_and_resets() -> None:
    b = Backoff(first=0.5, limit=4.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


def test_database_faults_are_told_from_bugs() -> None:
    assert is_database_error(psycopg.OperationalError("server closed the connection"))
    assert not is_database_error(ValueError("a bug"))


@pytest.mark.integration
def test_a_failing_batch_is_applied_again_and_nothing_is_skipped(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}likvard.intake.v1"
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    keys = [str(uuid.uuid4()) for _ in range(40)]
    for n, key in enumerate(keys):
        producer.produce(topic, key=key.encode(), value=str(n).encode())
    assert producer.flush(30) == 0

    applied: list[bytes] = []
    attempts = {"n": 0}

    def handle(messages: list[Message]) -> None:
        attempts["n"] += 1
        if attempts["n"] <= 3:  # the database is down for the first three attempts
            raise psycopg.OperationalError("the database restarted")
        applied.extend(m.value() or b"" for m in messages)

    group = f"t-{uuid.uuid4()}"
    config = consumer_config(
        kafka_bootstrap,
        group,
        **{"session.timeout.ms": 2000, "heartbeat.interval.ms": 200, "fetch.wait.max.ms": 10},
    )
    p = Progress(group, stall_seconds=600, register=False)
    loop = BatchLoop(
        lambda: Consumer(config),
        [topic],
        handle,
        p,
        batch_size=7,
        backoff=Backoff(first=0.05, limit=0.1),
    )
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: len(set(applied)) == len(keys), 60, "every record to be applied")
    finally:
        stop.set()
        thread.join(30)
    assert loop.failures == 3
    assert sorted(set(applied)) == sorted(str(n).encode() for n in range(len(keys)))
    assert len(applied) == len(keys)  # after the failures each record was applied once

    # The committed offsets cover exactly what was applied (offsets start at 0 on a new
    # topic, so their sum is the number of records): nothing committed past or short of it.
    check = Consumer(config)
    try:
        partitions = check.list_topics(topic, timeout=10).topics[topic].partitions
        committed = check.committed([TopicPartition(topic, q) for q in partitions], timeout=10)
    finally:
        check.close()
    assert sum(max(tp.offset, 0) for tp in committed) == len(keys)


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})  # kept until the answer is in
    for future in admin.create_topics([NewTopic(topic, 3, 1)]).values():
        future.result(30)


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **no_auto_create()})
    for v in values:
        producer.produce(topic, key=v, value=v)
    assert producer.flush(30) == 0


@dataclass
class Running:
    """A BatchLoop in a thread on a broker of the test's own, recording what it handled."""

    loop: BatchLoop
    progress: Progress
    seen: list[bytes]


@contextmanager
def running_loop(bootstrap: str, group: str, topics: list[str]) -> Iterator[Running]:
    seen: list[bytes] = []
    config = consumer_config(
        bootstrap, group, **{"session.timeout.ms": 2000, "heartbeat.interval.ms": 200}
    )
    p = Progress(group, stall_seconds=600, register=False)
    loop = BatchLoop(
        lambda: Consumer(config),
        topics,
        lambda ms: seen.extend(m.value() or b"" for m in ms),
        p,
        backoff=Backoff(first=0.1, limit=0.5),
    )
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,))
    thread.start()
    try:
        yield Running(loop, p, seen)
    finally:
        stop.set()
        thread.join(30)


@pytest.mark.integration
def test_a_broker_restarted_empty_with_its_topics_made_later_is_read_from_its_start() -> None:
    """The fault suite's broker wipe in small (a broker of the test's own, to kill): the
    group rejoins while the topics are missing, which left the member without partitions,
    and the new logs are shorter than the old positions, which a kept position would skip.
    The loop waits for the topics, subscribes anew and reads every new record."""
    topic = "wipe.v1"
    broker = TansuBroker()
    bootstrap = broker.start()
    try:
        _create_topic(bootstrap, topic)
        old = [f"old-{n}".encode() for n in range(90)]
        _produce(bootstrap, topic, old)
        with running_loop(bootstrap, "wipe", [topic]) as r:
            wait_for(lambda: set(old) <= set(r.seen), 60, "the old records to be read")
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGKILL)
            broker.proc.wait(30)
            broker.proc = None
            broker.start()
            wait_for(lambda: r.progress.last_failure == "topics missing", 60, "the loop to miss it")
            assert not r.progress.ready()
            _create_topic(bootstrap, topic)
            new = [f"new-{n}".encode() for n in range(12)]  # fewer per partition than before
            _produce(bootstrap, topic, new)
            wait_for(lambda: set(new) <= set(r.seen), 60, "every record of the new broker")
        assert r.loop.rejoins >= 1 and r.progress.ready()
    finally:
        broker.stop()


@pytest.mark.integration
def test_a_topic_missing_when_the_member_joins_is_read_once_it_exists() -> None:
    """A join while one subscribed topic is missing left the member without that topic's
    partitions (the broker never told it the topic came later): the loop takes the
    consumer's "topic not available" as its cue to wait for the topic and rejoin."""
    there, later = "there.v1", "later.v1"
    broker = TansuBroker()
    bootstrap = broker.start()
    try:
        _create_topic(bootstrap, there)
        with running_loop(bootstrap, "late", [there, later]) as r:
            wait_for(
                lambda: r.progress.last_failure == "topics missing", 60, "the loop to miss one"
            )
            _create_topic(bootstrap, later)
            records = [f"late-{n}".encode() for n in range(12)]
            _produce(bootstrap, later, records)
            wait_for(lambda: set(records) <= set(r.seen), 60, "the late topic's records")
        assert r.loop.rejoins >= 1 and r.progress.ready()
    finally:
        broker.stop()


def test_a_stalled_worker_answers_unhealthy_and_not_ready_on_its_ops_port() -> None:
    import urllib.error
    import urllib.request

    from likvard.ops import OpsServer

    clock = Clock()
    p = progress(clock)
    server = OpsServer(
        0, p.heartbeat, p.ready, host="127.0.0.1", liveness_seconds=1e9, stalled=p.stalled
    ).start()

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert (status("/healthz"), status("/readyz")) == (200, 200)
        p.set_lag({("likvard.intake.v1", 3): 12})  # work waiting, and no batch gets through
        clock.now += p.stall_seconds + 1
        assert (status("/healthz"), status("/readyz")) == (503, 503)
        p.completed()
        assert (status("/healthz"), status("/readyz")) == (200, 200)
    finally:
        server.stop()
