"""The ingest worker killed at its two unsafe spots, as `likvard ingest` runs in production:
after storing (before the dead letters are written) and after the dead letters (before the
offsets are committed). Nothing is lost, nothing is stored twice, and a dead letter written
twice is listed once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from likvard import dlq
from likvard.codec import Catalogue
from likvard.faults import FAILPOINT_EXIT_CODE
from likvard.ingest import DEAD_LETTER_TOPIC, INGEST_TOPIC
from tests.district import DistrictRecord, DistrictSystem, produce_all, registered
from tests.support import consume, wait_for

pytestmark = pytest.mark.integration


def test_a_killed_ingest_worker_loses_nothing_and_stores_nothing_twice(
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
    catalogue: Catalogue,
    tmp_path: Path,
) -> None:
    schema = new_schema("i")
    ingest_topic = topic_prefix + INGEST_TOPIC
    dead_topic = topic_prefix + DEAD_LETTER_TOPIC
    district = DistrictSystem(catalogue)
    cases = [str(uuid.uuid4()) for _ in range(3)]
    records = [district.record("IntakeRegistered", c, registered()) for c in cases]
    records.append(district.raw(cases[0].encode(), b"\x00garbage"))
    produce_all(kafka_bootstrap, ingest_topic, records)

    env = {
        **os.environ,
        "LIKVARD_DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LIKVARD_TOPIC_PREFIX": topic_prefix,
        "LIKVARD_CONSUMER_SESSION_TIMEOUT_MS": "2000",
    }
    command = [sys.executable, "-m", "likvard.cli", "ingest", "intake", "--schema", schema]

    def run_until_failpoint(name: str) -> None:
        done = subprocess.run(
            command, env={**env, "LIKVARD_FAILPOINTS": name}, capture_output=True, timeout=120
        )
        assert done.returncode == FAILPOINT_EXIT_CODE, done.stderr.decode()[-2000:]

    def stored() -> list[str]:
        from likvard.config import Settings
        from likvard.eventstore import open_store

        store = open_store(Settings(database_url=database_url), "intake", schema=schema)
        try:
            return [str(e.event_id) for e in store.read_all()]
        finally:
            store.pool.close()

    # Killed after storing, before the dead letter: the events are stored, nothing else.
    run_until_failpoint("ingest.after_store")
    assert sorted(stored()) == sorted(r.event_id for r in records[:3])
    # Killed after the dead letter, before committing: the batch comes again; the stored
    # events are duplicates now, the dead letter is written (once so far).
    run_until_failpoint("ingest.before_commit")
    assert sorted(stored()) == sorted(r.event_id for r in records[:3])
    assert len(consume(kafka_bootstrap, dead_topic, at_least=1)) == 1

    # A healthy worker: the batch a third time, then committed.
    log = tmp_path / "ingest.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: len(consume(kafka_bootstrap, dead_topic, at_least=2, timeout=1)) == 2,
            60,
            "the batch to be judged a third time",
        )
        wait_for(lambda: committed(kafka_bootstrap, topic_prefix, ingest_topic) == 4, 30, "commit")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, log.read_text()
    assert "0 accepted, 3 duplicates, 1 dead-lettered, decode 1" in log.read_text()

    assert sorted(stored()) == sorted(r.event_id for r in records[:3])  # each exactly once
    letters = dlq.read_all(kafka_bootstrap, dead_topic, settle=0.3)
    assert len(letters) == 1  # the copy written before the crash is listed once
    assert letters[0].source == (ingest_topic, *where(kafka_bootstrap, ingest_topic, records[3]))


def committed(bootstrap: str, prefix: str, topic: str) -> int:
    """Records committed by the intake ingest group, summed over the topic's partitions."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"{prefix}likvard-intake-ingest"}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(tp.offset, 0) for tp in offsets)
    finally:
        consumer.close()


def where(bootstrap: str, topic: str, record: DistrictRecord) -> tuple[int, int]:
    """(partition, offset) of a produced record, found by its value."""
    for r in consume(bootstrap, topic, at_least=4, timeout=10, settle=0.2):
        if r.value == record.value:
            return r.partition, r.offset
    raise AssertionError("record not on the topic")
