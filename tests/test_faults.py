"""The fault suite (issue 11): every role of Likvärd as its own process, under load from
HTTP clients and a district system, through the faults an operations team sees every
month: the broker SIGKILLed and restarted empty (then `likvard topics` and `likvard
republish`, as the operator would), a fast restart of PostgreSQL, and a SIGKILL of every
process kind in turn (started again with the same command).

Nothing here restarts a process that exits by itself: every process must ride the fault
out. After each fault every acknowledged event (and every district record the broker
accepted) must be in its store, on its topic, known to the consuming services and counted
exactly once in the read models; every ended intervention's follow-ups scheduled once; and
a replay from offset 0 must give the live checksums. The tests share one stack, in order,
and each checks everything stored so far, so a later test also sees an earlier one's harm.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from psycopg import sql

from likvard.cli.devstack import EmbeddedPostgres, TansuBroker
from likvard.config import no_auto_create
from likvard.known_cases import INTAKE_EVENTS
from likvard.topic_reader import record_headers
from services.followup.scheduling import ASI_MONTHS, followup_id
from services.projections import readmodels
from services.projections.replay import Replay
from tests.faults_support import WRITE_SERVICES, DistrictFeed, Ledger, Load, Stack, eventually

pytestmark = pytest.mark.integration

CASES = 100  # care chains per test (about 350 HTTP writes)
AFTER = 12  # care chains after the fault: one of each kind of write, at least
START_SECONDS = 120.0  # thirteen processes starting on two cores
CONVERGE_SECONDS = 120.0  # for the stack to catch up once a fault is over
LIVE = "projections"


# --- the checks --------------------------------------------------------------------------------


@dataclass
class Stored:
    """What the event stores hold: per service its event ids, and per case how many events
    every service stored of it."""

    ids: dict[str, set[str]]
    per_case: Counter[str]
    intake_versions: dict[str, int]  # case -> version of its last event a consumer learns
    scheduled: Counter[str]  # follow-up id -> FollowUpScheduled events


def read_stores(conn: psycopg.Connection[Any]) -> Stored:
    """The three event stores, read in one go: the truth the rest is checked against."""
    ids: dict[str, set[str]] = {}
    per_case: Counter[str] = Counter()
    versions: dict[str, int] = {}
    for service in WRITE_SERVICES:
        rows = conn.execute(
            sql.SQL(
                "SELECT event_id::text, metadata->>'case_id', stream_id, stream_version,"
                " event_type FROM {}.events"
            ).format(sql.Identifier(service))
        ).fetchall()
        ids[service] = {r[0] for r in rows}
        per_case.update(r[1] for r in rows)
        if service == "intake":
            for _, _, stream, version, event_type in rows:
                if event_type in INTAKE_EVENTS:  # what the consumers learn of a case
                    versions[stream] = max(versions.get(stream, 0), version)
    scheduled = Counter(
        str(r[0])
        for r in conn.execute(
            "SELECT payload->>'followup_id' FROM followup.events"
            " WHERE event_type = 'FollowUpScheduled'"
        )
    )
    return Stored(ids, per_case, versions, scheduled)


def _first(missing: set[str], n: int = 3) -> str:
    return f"{len(missing)} (e.g. {', '.join(sorted(missing)[:n])})"


def store_problems(stored: Stored, ledger: Ledger) -> list[str]:
    """Every acknowledged write and accepted district record stored; every ended
    intervention's ASI follow-ups scheduled by the follow-up consumer, each once."""
    problems = []
    for service in WRITE_SERVICES:
        missing = ledger.event_ids(service) - stored.ids[service]
        if missing:
            problems.append(f"acknowledged {service} events not in its store: {_first(missing)}")
    with ledger.lock:
        delivered = set(ledger.district_delivered)
        ended = list(ledger.interventions_ended)
    missing = delivered - stored.ids["intake"]
    if missing:
        problems.append(f"accepted district records not stored by intake: {_first(missing)}")
    wanted = {followup_id(iv, kind) for iv in ended for kind, _ in ASI_MONTHS}
    missing = wanted - set(stored.scheduled)
    if missing:
        problems.append(f"follow-ups of ended interventions not scheduled: {_first(missing)}")
    twice = {f for f, n in stored.scheduled.items() if n > 1}
    if twice:
        problems.append(f"follow-ups scheduled more than once: {_first(twice)}")
    return problems


def known_case_problems(conn: psycopg.Connection[Any], stored: Stored) -> list[str]:
    """Every intake stream known to the consuming services at its latest version."""
    problems = []
    for service in ("referral", "followup"):
        known = dict(
            conn.execute(
                sql.SQL("SELECT case_id, version FROM {}.known_cases").format(
                    sql.Identifier(service)
                )
            ).fetchall()
        )
        behind = {c for c, v in stored.intake_versions.items() if known.get(c) != v}
        if behind:
            problems.append(
                f"cases {service} does not know at their intake version: {_first(behind)}"
            )
    return problems


def read_model_problems(conn: psycopg.Connection[Any], stored: Stored) -> list[str]:
    """Each stored event in the read models exactly once: in `processed` and the timeline,
    and counted once in its case's facts."""
    everything = set().union(*stored.ids.values())
    processed = {str(r[0]) for r in conn.execute(f"SELECT event_id FROM {LIVE}.processed")}
    timeline = {str(r[0]) for r in conn.execute(f"SELECT event_id FROM {LIVE}.timeline")}
    counted = dict(conn.execute(f"SELECT case_id, events FROM {LIVE}.case_facts").fetchall())
    problems = []
    if everything - processed:
        problems.append(f"stored events never projected: {_first(everything - processed)}")
    if processed - everything:
        problems.append(f"projected events no store holds: {_first(processed - everything)}")
    if timeline != processed:
        problems.append(f"timeline differs from processed by {len(timeline ^ processed)}")
    wrong = {c for c in set(counted) | set(stored.per_case) if counted.get(c) != stored.per_case[c]}
    if wrong:
        example = sorted(wrong)[0]
        problems.append(
            f"cases whose facts count their events wrongly: {_first(wrong)};"
            f" {example}: {counted.get(example)} counted, {stored.per_case[example]} stored"
        )
    return problems


def topic_event_ids(bootstrap: str, topic: str, want: set[str], timeout: float = 10) -> set[str]:
    """Event ids on `topic` from offset 0 of every partition (duplicates collapse), read
    until every id of `want` was seen and the watermarks taken at the start are reached,
    or until `timeout`."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"fault-check-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            **no_auto_create(),
        }
    )
    seen: set[str] = set()
    try:
        partitions = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        reached = {p: end <= 0 for p, end in ends.items()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (want <= seen and all(reached.values())):
            for msg in consumer.consume(500, 0.2):
                if msg.error():
                    continue
                p = int(msg.partition() or 0)
                if int(msg.offset() or 0) + 1 >= ends[p]:
                    reached[p] = True
                headers = dict(record_headers(msg))
                if headers.get("event_id"):
                    seen.add((headers["event_id"] or b"").decode())
    finally:
        consumer.close()
    return seen


def topic_problems(stack: Stack, stored: Stored) -> list[str]:
    """Each service's topic holds exactly its store's events (duplicates aside)."""
    problems = []
    for service in WRITE_SERVICES:
        try:
            on_topic = topic_event_ids(stack.bootstrap, stack.topic(service), stored.ids[service])
        except KafkaException as exc:
            return [f"cannot read {stack.topic(service)}: {exc}"]
        missing = stored.ids[service] - on_topic
        if missing:
            problems.append(f"{service} events not on {stack.topic(service)}: {_first(missing)}")
        foreign = on_topic - stored.ids[service]
        if foreign:
            problems.append(f"events on {stack.topic(service)} not in its store: {_first(foreign)}")
    return problems


def district_ingested(stack: Stack, ledger: Ledger) -> str | None:
    """None once intake stored every district record the broker accepted."""
    with ledger.lock:
        delivered = set(ledger.district_delivered)
    try:
        with psycopg.connect(stack.dsn, connect_timeout=5) as conn:
            stored = {str(r[0]) for r in conn.execute("SELECT event_id FROM intake.events")}
    except psycopg.Error as exc:
        return f"database: {type(exc).__name__}"
    missing = delivered - stored
    return f"{_first(missing)} not stored yet" if missing else None


def converged(stack: Stack, ledger: Ledger) -> str | None:
    """None once every acknowledged write is stored, every stored event is on its topic,
    known to the consumers and projected exactly once; else what is not (yet)."""
    try:
        with psycopg.connect(stack.dsn, connect_timeout=5) as conn:
            stored = read_stores(conn)
            problems = store_problems(stored, ledger) + known_case_problems(conn, stored)
            problems += read_model_problems(conn, stored)
    except psycopg.Error as exc:
        return f"database: {type(exc).__name__}: {exc}"
    if not problems:  # the topics last: reading them is the expensive part
        problems = topic_problems(stack, stored)
    return "; ".join(problems) or None


def replay_matches_live(stack: Stack) -> None:
    """A replay from offset 0 into a fresh schema gives the live read models' checksums,
    with an intact hash chain."""
    schema = f"replay_{uuid.uuid4().hex[:10]}"
    run = Replay(stack.dsn, stack.bootstrap, [stack.topic(s) for s in WRITE_SERVICES], schema)
    try:
        result = run.run()
    finally:
        run.close()
    try:
        with psycopg.connect(stack.dsn) as conn:
            live = readmodels.checksum(conn, LIVE)
        assert not result.breaks, f"replay found hash-chain breaks: {result.breaks[:3]}"
        assert result.undecodable == 0, result.undecodable_examples
        assert result.checksums == live, (
            f"replay checksums {result.checksums} differ from the live ones {live}"
            f" ({result.projected} events replayed)"
        )
    finally:
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# --- the stack and the faults -----------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("faults")
    pg = EmbeddedPostgres()
    broker = TansuBroker()
    try:
        dsn = pg.start()
        broker.start()
        running = Stack(pg, broker, dsn, logs)
        try:
            running.start_all()
            with running.explained():
                eventually(running.serving, START_SECONDS, "/readyz of every service")
                running.assert_all_running()
            yield running
        finally:
            running.stop()
            running.stop_postgres()
    finally:
        broker.stop()
        pg.stop()


@pytest.fixture(scope="module")
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def feed(stack: Stack, ledger: Ledger) -> Iterator[DistrictFeed]:
    running = DistrictFeed(stack, ledger).start()
    try:
        yield running
    finally:
        running.close()
    assert not running.errors, running.errors[:3]


def settled(stack: Stack, ledger: Ledger, load: Load, feed: DistrictFeed) -> None:
    """The end of every test, once the fault is over: the load done, a few more care chains
    answered by every service (it serves after the fault, not only before it), the stack
    caught up, every process still the one that rode the fault out."""
    load.finish()
    after = Load(stack, ledger, AFTER, threads=3).start()
    after.finish()
    assert all(after.acked[s] > 0 for s in WRITE_SERVICES), (dict(after.acked), ledger.gave_up)
    feed.close()
    assert feed.delivered > 0, "the district system delivered nothing"
    eventually(lambda: converged(stack, ledger), CONVERGE_SECONDS, "the stack to converge")
    replay_matches_live(stack)
    stack.assert_all_running()


def test_the_broker_killed_and_restarted_empty_then_republished(
    stack: Stack, ledger: Ledger, feed: DistrictFeed
) -> None:
    with stack.explained():
        load = Load(stack, ledger, CASES).start()
        load.wait_registered(CASES // 3)
        # The district system holds back while there is no broker (a record it produced
        # before the kill and the ingest worker had not read yet is gone with the broker).
        feed.pause()
        eventually(
            lambda: district_ingested(stack, ledger),
            CONVERGE_SECONDS,
            "the district records so far to be ingested",
        )
        stack.kill_broker()
        stack.broker.start()
        stack.operator("topics")
        feed.resume()
        with ThreadPoolExecutor(len(WRITE_SERVICES)) as pool:
            list(pool.map(lambda s: stack.operator("republish", s), WRITE_SERVICES))
        settled(stack, ledger, load, feed)


def test_a_fast_restart_of_postgresql(stack: Stack, ledger: Ledger, feed: DistrictFeed) -> None:
    with stack.explained():
        load = Load(stack, ledger, CASES).start()
        load.wait_registered(CASES // 3)
        stack.restart_postgres_fast()
        settled(stack, ledger, load, feed)


@pytest.mark.parametrize("kind", ["relay", "consume", "ingest", "project", "serve"])
def test_every_process_kind_sigkilled_and_started_again(
    stack: Stack, ledger: Ledger, feed: DistrictFeed, kind: str
) -> None:
    with stack.explained():
        load = Load(stack, ledger, CASES).start()
        load.wait_registered(CASES // 3)
        roles = stack.of_kind(kind)
        for role in roles:
            role.kill()
        for role in roles:
            role.start(stack.env)
        settled(stack, ledger, load, feed)
