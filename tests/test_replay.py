"""The auditors' replay on a real broker and PostgreSQL, run as the `likvard replay` command.

Events go through the event stores and the outbox relay, so the records carry the same
bytes and chain headers as in production. The live read models come from the live worker
(`likvard project`), the replay from the batch consumer: their checksums must agree.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Producer
from psycopg import sql
from psycopg_pool import ConnectionPool

from likvard.access_log import open_access_log, open_store
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.eventstore import EventStore, NewEvent
from likvard.guard import AccessEntry
from likvard.inbox import Incoming, decode_event
from likvard.relay import OutboxRelay
from likvard.topics import SERVICE_TOPICS
from services.projections import readmodels
from services.projections.replay import Replay, ReplayError
from tests.support import closed, consume, kernel_event, live_worker, registered, reopened, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def referral_store(
    pool: ConnectionPool, new_schema: Callable[[str], str], catalogue: Catalogue, topic_prefix: str
) -> EventStore:
    s = EventStore(
        pool,
        new_schema("rs"),
        catalogue,
        producer="likvard-referral",
        topic=topic_prefix + SERVICE_TOPICS["referral"],
    )
    s.migrate()
    return s


def referral_events(case_id: str) -> list[NewEvent]:
    referral_id = str(uuid.uuid4())
    return [
        dataclasses.replace(e, case_id=case_id)
        for e in (
            kernel_event(
                "ReferralRequested",
                {
                    "referral_id": referral_id,
                    "unit_id": "centrum-beroendeteam",
                    "intervention_code": "relapse-prevention-alcohol",
                    "person_district": "nordost",
                    "unit_district": "centrum",
                    "recipient_kind": "CITY_SOCIAL_SERVICES",
                    "consent_id": None,
                    "consent_override": None,
                },
            ),
            kernel_event(
                "ReferredAcrossDistrict",
                {
                    "referral_id": referral_id,
                    "unit_id": "centrum-beroendeteam",
                    "from_district": "nordost",
                    "to_district": "centrum",
                },
            ),
        )
    ]


def relay_all(store: EventStore, database_url: str, bootstrap: str) -> None:
    relay = OutboxRelay(database_url, store.schema, bootstrap)
    with psycopg.connect(database_url) as conn:
        while relay.run_once(conn):
            pass
    assert store.outbox_depth() == 0


def stored(*stores: EventStore) -> list[Incoming]:
    """Every event of the stores, decoded, store by store in global order."""
    return [decode_event(s.catalogue, s.topic, 0, 0, e.data) for s in stores for e in s.read_all()]


def processed(url: str, schema: str) -> int:
    with psycopg.connect(url) as conn:
        return readmodels.processed_count(conn, schema)


def direct(database_url: str, schema: str, events: list[Incoming]) -> dict[str, str]:
    """Checksums of read models built straight from decoded events (no Kafka)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, schema)
            readmodels.apply(conn, schema, events)
        return readmodels.checksum(conn, schema)


def env_for(database_url: str, bootstrap: str, prefix: str) -> dict[str, str]:
    return dict(
        os.environ,
        LIKVARD_DATABASE_URL=database_url,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        LIKVARD_TOPIC_PREFIX=prefix,
        LIKVARD_CONSUMER_SESSION_TIMEOUT_MS="2000",
        LIKVARD_PROJECTION_BATCH_SIZE="50",
    )


def likvard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "likvard.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def checksums_in(output: str) -> dict[str, str]:
    return dict(re.findall(r"checksum (\w+): ([0-9a-f]{64})", output))


def test_referral_published_before_its_intake_and_replay_equals_live(
    store: EventStore,
    referral_store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
    tmp_path: Path,
) -> None:
    cases = [str(uuid.uuid4()) for _ in range(40)]
    for case in cases:  # the referral service's events reach Kafka first...
        referral_store.append(str(uuid.uuid4()), 0, referral_events(case))
    relay_all(referral_store, database_url, kafka_bootstrap)
    for case in cases:  # ...and only then the intakes they refer to
        store.append(case, 0, [registered(), closed(), reopened()])
    relay_all(store, database_url, kafka_bootstrap)
    total = 40 * 5
    env = env_for(database_url, kafka_bootstrap, topic_prefix)

    live = new_schema("live")
    with live_worker(env, live, tmp_path / "worker.log"):
        wait_for(lambda: processed(database_url, live) == total, 120, "the live projection")

    rebuilt = new_schema("replay")
    # two processes, a share of the partitions each: the same read models as live
    result = likvard(env, "replay", "--schema", rebuilt, "--processes", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"hash chain: intact ({total} events in 80 streams)" in result.stdout
    with psycopg.connect(database_url) as conn:
        live_sums = readmodels.checksum(conn, live)
        assert checksums_in(result.stdout) == live_sums == readmodels.checksum(conn, rebuilt)
        facts = readmodels.case_facts(conn, live, cases[0])
    # the same facts as when every intake came first
    in_order = direct(database_url, new_schema("ordered"), stored(store, referral_store))
    assert in_order == live_sums
    assert facts is not None
    assert facts["district_at_intake"] == "nordost"
    assert (facts["referrals"], facts["referrals_across"], facts["status"]) == (1, 1, "open")
    assert facts["first_referral_at"] is not None


def test_replay_as_of_a_date_projects_only_what_had_occurred(
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
) -> None:
    january = datetime(2024, 1, 10, 9, 0, tzinfo=UTC)
    # 23:30 UTC on 1 February is 00:30 on 2 February in the city: after an as-of of 1 Feb
    late = datetime(2024, 2, 1, 23, 30, tzinfo=UTC)
    for _ in range(6):
        store.append(
            str(uuid.uuid4()),
            0,
            [
                dataclasses.replace(registered(), occurred_at=january),
                dataclasses.replace(closed(), occurred_at=late),
            ],
        )
    relay_all(store, database_url, kafka_bootstrap)
    env = env_for(database_url, kafka_bootstrap, topic_prefix)

    rebuilt = new_schema("asof")
    result = likvard(env, "replay", "--as-of", "2024-02-01", "--schema", rebuilt)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left out as after the as-of date: 6" in result.stdout
    expected = [e for e in stored(store) if e.event_type == "IntakeRegistered"]
    assert checksums_in(result.stdout) == direct(database_url, new_schema("exp"), expected)

    swapped = likvard(env, "replay", "--as-of", "2024-02-01", "--swap")
    assert swapped.returncode == 2
    assert "--swap cannot go with --as-of" in swapped.stderr


def test_replay_reports_tampered_and_unchained_records_and_exits_1(
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
) -> None:
    for _ in range(3):
        store.append(str(uuid.uuid4()), 0, [registered(), closed()])
    relay_all(store, database_url, kafka_bootstrap)
    original = consume(kafka_bootstrap, store.topic, at_least=6)
    victim = original[1]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    tampered = victim.value[:-1] + bytes([victim.value[-1] ^ 1])
    producer.produce(
        store.topic, key=victim.key, value=tampered, headers=list(victim.headers.items())
    )
    producer.produce(store.topic, key=victim.key, value=victim.value)  # no chain headers
    assert producer.flush(10) == 0

    result = likvard(
        env_for(database_url, kafka_bootstrap, topic_prefix),
        "replay",
        "--schema",
        new_schema("broken"),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "hash chain: 2 breaks" in result.stdout
    assert "content changed" in result.stdout
    assert "hash-chain headers missing" in result.stdout


def test_swap_makes_the_rebuilt_schema_live_and_the_worker_goes_on_into_it(
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
    tmp_path: Path,
) -> None:
    def add_cases(n: int) -> None:
        for _ in range(n):
            store.append(str(uuid.uuid4()), 0, [registered(), closed()])
        relay_all(store, database_url, kafka_bootstrap)

    env = env_for(database_url, kafka_bootstrap, topic_prefix)
    live = new_schema("lv")
    rebuilt = new_schema("rb")
    add_cases(30)
    with live_worker(env, live, tmp_path / "worker.log"):
        wait_for(lambda: processed(database_url, live) == 60, 120, "the live projection")
        result = likvard(env, "replay", "--schema", rebuilt, "--swap", "--live", live)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{rebuilt} is now live as {live}" in result.stderr
        with psycopg.connect(database_url) as conn:
            names = {
                r[0]
                for r in conn.execute(
                    "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s",
                    (f"{live}%",),
                )
            }
        retired = [n for n in names if n.startswith(f"{live}_retired_")]
        assert live in names and len(retired) == 1
        add_cases(10)  # the worker goes on, now into the swapped-in schema
        wait_for(lambda: processed(database_url, live) == 80, 60, "the worker after the swap")
    with psycopg.connect(database_url, autocommit=True) as conn:
        sums = readmodels.checksum(conn, live)
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(retired[0])))
    assert sums == direct(database_url, new_schema("all"), stored(store))


def test_swap_is_refused_when_the_live_read_models_saw_events_kafka_lacks(
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
) -> None:
    store.append(str(uuid.uuid4()), 0, [registered()])
    relay_all(store, database_url, kafka_bootstrap)
    live = new_schema("lv")
    ghost = decode_event(
        store.catalogue,
        store.topic,
        0,
        0,
        store.catalogue.encode(
            "IntakeRegistered",
            {
                "metadata": {
                    "event_id": str(uuid.uuid4()),
                    "event_type": "IntakeRegistered",
                    "case_id": "ghost",
                    "stream_version": 1,
                    "occurred_at": datetime(2025, 1, 1, tzinfo=UTC),
                    "recorded_at": datetime(2025, 1, 1, tzinfo=UTC),
                    "producer": "test",
                    "district": "nordost",
                    "actor": "t",
                    "correlation_id": "c",
                    "causation_id": None,
                    "traceparent": None,
                },
                **registered().data,
            },
        ),
    )
    before = direct(database_url, live, [ghost])
    topics = [topic_prefix + t for t in SERVICE_TOPICS.values()]
    run = Replay(database_url, kafka_bootstrap, topics, new_schema("rb"), settle=0.3)
    try:
        result = run.run()
        assert result.projected == 1 and not result.breaks
        with pytest.raises(ReplayError, match="1 events in the live read models are not in"):
            run.swap(live)
    finally:
        run.close()
    with psycopg.connect(database_url) as conn:
        assert readmodels.checksum(conn, live) == before  # nothing changed


def test_replay_refuses_an_existing_schema(
    database_url: str, kafka_bootstrap: str, topic_prefix: str, new_schema: Callable[[str], str]
) -> None:
    taken = new_schema("taken")
    direct(database_url, taken, [])
    topics = [topic_prefix + t for t in SERVICE_TOPICS.values()]
    with pytest.raises(ReplayError, match="already exists"):
        Replay(database_url, kafka_bootstrap, topics, taken).run()


def test_as_of_is_the_end_of_the_local_day() -> None:
    from services.projections.replay import as_of_cutoff

    cutoff = as_of_cutoff(date(2024, 2, 1))
    assert cutoff.astimezone(UTC) == datetime(2024, 2, 1, 23, 0, tzinfo=UTC)


def test_the_access_log_is_projected_live_and_replayed_with_its_chain_verified(
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
    tmp_path: Path,
) -> None:
    cases = [str(uuid.uuid4()) for _ in range(3)]
    for case in cases:
        store.append(case, 0, [registered()])
    relay_all(store, database_url, kafka_bootstrap)
    settings = Settings(database_url=database_url, topic_prefix=topic_prefix)
    log_schema = new_schema("alog")
    writers = [open_access_log(settings, s, schema=log_schema) for s in ("intake", "projections")]
    now = datetime.now(UTC)
    for n, case in enumerate(cases * 4):
        writers[n % 2].record(
            [
                AccessEntry(
                    "cw-7", "case-worker", "case.read", f"case:{case}", case, n % 3 != 0,
                    "own-district" if n % 3 else "not-your-district", None,
                    writers[n % 2].service, now, None,
                )
            ]
        )  # fmt: skip
    for w in writers:
        w.close()
    access_store = open_store(settings, schema=log_schema)
    try:
        relay_all(access_store, database_url, kafka_bootstrap)
    finally:
        access_store.pool.close()
    total = 3 + 12
    env = env_for(database_url, kafka_bootstrap, topic_prefix)

    live = new_schema("live")
    with live_worker(env, live, tmp_path / "worker.log"):
        wait_for(lambda: processed(database_url, live) == total, 120, "the live projection")
    topics = [topic_prefix + t for t in readmodels.SOURCE_TOPICS]
    run = Replay(database_url, kafka_bootstrap, topics, new_schema("rb"), settle=0.3)
    try:
        result = run.run()
    finally:
        run.close()
    assert result.breaks == []
    assert (result.projected, result.chain_events, result.streams) == (total, total, 3 + 2)
    assert result.per_topic[topic_prefix + "likvard.access-log.v1"] == 12
    with psycopg.connect(database_url) as conn:
        assert readmodels.checksum(conn, live) == result.checksums
        rows = conn.execute(
            sql.SQL(
                "SELECT stream_id, count(*), count(*) FILTER (WHERE outcome = 'refused')"
                " FROM {}.access_log GROUP BY stream_id ORDER BY stream_id"
            ).format(sql.Identifier(result.schema))
        ).fetchall()
        assert readmodels.case_facts(conn, live, "access-log-intake") is None
    assert rows == [("access-log-intake", 6, 2), ("access-log-projections", 6, 2)]


def test_a_replay_in_two_processes_equals_one_in_one(
    store: EventStore,
    referral_store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
) -> None:
    """Parallel by partition: the same read models, chain verdict, counts and provenance as
    a replay in one process, and the same as the events folded straight."""
    cases = [str(uuid.uuid4()) for _ in range(30)]
    for case in cases:
        referral_store.append(str(uuid.uuid4()), 0, referral_events(case))
        store.append(case, 0, [registered(), closed(), reopened()])
    relay_all(referral_store, database_url, kafka_bootstrap)
    relay_all(store, database_url, kafka_bootstrap)
    topics = [topic_prefix + t for t in readmodels.SOURCE_TOPICS]
    results = {}
    for processes in (1, 2):
        run = Replay(
            database_url,
            kafka_bootstrap,
            topics,
            new_schema(f"par{processes}"),
            processes=processes,
            settle=0.5,
        )
        try:
            results[processes] = run.run()
        finally:
            run.close()
    one, two = results[1], results[2]
    assert two.breaks == one.breaks == []
    assert (two.records, two.projected, two.streams, two.chain_events) == (
        one.records,
        one.projected,
        one.streams,
        one.chain_events,
    )
    assert one.projected == 30 * 5 and one.streams == 60
    assert two.checksums == one.checksums
    assert two.checksums == direct(database_url, new_schema("flat"), stored(store, referral_store))
    with psycopg.connect(database_url) as conn:
        marks = [
            conn.execute(
                sql.SQL(
                    'SELECT topic, partition, "offset" FROM {}.applied_offsets ORDER BY 1, 2'
                ).format(sql.Identifier(r.schema))
            ).fetchall()
            for r in (one, two)
        ]
    assert marks[0] == marks[1] and marks[0]
