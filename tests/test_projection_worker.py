"""The live projection worker on a real broker and PostgreSQL: killed with SIGKILL
mid-stream and restarted, it ends with the same read models as an undisturbed projection."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from likvard.eventstore import EventStore
from likvard.inbox import decode_event
from likvard.relay import OutboxRelay
from services.projections import readmodels
from tests.support import closed, registered, reopened, wait_for

pytestmark = pytest.mark.integration


def processed(url: str, schema: str) -> int:
    with psycopg.connect(url) as conn:
        return readmodels.processed_count(conn, schema)


def test_sigkill_mid_stream_then_restart_gives_the_undisturbed_read_models(
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
    tmp_path: Path,
) -> None:
    for _ in range(300):
        case = str(uuid.uuid4())
        store.append(case, 0, [registered(), closed(), reopened()])
    total = 900
    with psycopg.connect(database_url) as conn:
        relay = OutboxRelay(database_url, store.schema, kafka_bootstrap)
        while relay.run_once(conn):
            pass

    live = new_schema("pl")
    env = dict(
        os.environ,
        LIKVARD_DATABASE_URL=database_url,
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        LIKVARD_TOPIC_PREFIX=topic_prefix,
        LIKVARD_CONSUMER_SESSION_TIMEOUT_MS="2000",
        LIKVARD_PROJECTION_BATCH_SIZE="20",
    )
    command = [sys.executable, "-m", "likvard.cli", "project", "--schema", live]

    def start(name: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / name).open("wb")
        return subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
        )

    first = start("first.log")
    try:
        wait_for(lambda: processed(database_url, live) > 0, 90, "the worker to project a batch")
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        partial = processed(database_url, live)
        assert 0 < partial < total, partial  # killed mid-stream

        second = start("second.log")
        try:
            wait_for(
                lambda: processed(database_url, live) == total,
                120,
                "the restarted worker to catch up",
            )
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
    finally:
        if first.poll() is None:
            first.kill()

    undisturbed = new_schema("pu")
    events = [decode_event(store.catalogue, store.topic, 0, 0, e.data) for e in store.read_all()]
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, undisturbed)
            assert readmodels.apply(conn, undisturbed, events) == total
        assert readmodels.checksum(conn, live) == readmodels.checksum(conn, undisturbed)
