"""The access log's write side on real PostgreSQL (and a real broker for the relay):
concurrent reads share transactions, every entry is chained and verified, an edited row is
found, a database that does not answer fails the read with nothing half-written, and an
entry whose `record` returned survives its process being killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from likvard import access_log, access_log_audit
from likvard.access_log import AccessLogError, AccessLogUnavailable, AccessLogWriter
from likvard.access_log_audit import search
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.eventstore import EventStore
from likvard.guard import AccessEntry
from likvard.relay import OutboxRelay
from likvard.topics import ACCESS_LOG_TOPIC
from tests.support import Background, consume, wait_for

pytestmark = pytest.mark.integration

CASE = "6f1c2a9e-4b7d-4c1e-9a3f-0d2b8e5c7a10"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def entry(actor: str = "staff-1", case_id: str | None = CASE, **changes: object) -> AccessEntry:
    values: dict[str, object] = {
        "actor": actor,
        "roles": "case-worker",
        "action": "case.read",
        "resource": f"case:{case_id}" if case_id else "unit:beroendeenheten",
        "case_id": case_id,
        "allowed": True,
        "reason": "own-district",
        "emergency_reason": None,
        "service": "intake",
        "occurred_at": T0,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    }
    values.update(changes)
    return AccessEntry(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(database_url: str, topic_prefix: str) -> Settings:
    return Settings(database_url=database_url, topic_prefix=topic_prefix)


@pytest.fixture
def writer(settings: Settings, schema: str, catalogue: Catalogue) -> Iterator[AccessLogWriter]:
    w = access_log.open_access_log(settings, "intake", schema=schema, catalogue=catalogue)
    try:
        yield w
    finally:
        w.close()


def reader(settings: Settings, schema: str) -> EventStore:
    return access_log.open_store(settings, schema=schema, service="test")


def test_concurrent_reads_share_few_transactions_and_all_are_chained(
    writer: AccessLogWriter, settings: Settings, schema: str
) -> None:
    threads, rounds = 64, 20
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def reads(n: int) -> None:
        start.wait()
        for r in range(rounds):
            try:
                writer.record([entry(actor=f"staff-{n}-{r}")])
            except BaseException as exc:
                errors.append(exc)

    workers = [threading.Thread(target=reads, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not errors
    stats = writer.stats
    total = threads * rounds
    print(f"group commit: {total} entries, {stats.batches} commits, max {stats.largest_batch}")
    assert stats.entries == total
    assert stats.batches < total / 4, stats  # shared transactions, not one per read
    assert stats.largest_batch > 1
    store = reader(settings, schema)
    try:
        events = store.read_stream("access-log-intake")
        assert [e.stream_version for e in events] == list(range(1, total + 1))
        actors = {e.payload["actor"] for e in events}
        assert actors == {f"staff-{n}-{r}" for n in range(threads) for r in range(rounds)}
        assert access_log_audit.verify(store) == []
        assert store.outbox_depth() == total
    finally:
        store.pool.close()


def test_a_list_answer_logs_every_case_in_one_call_and_search_reads_them_back(
    writer: AccessLogWriter, settings: Settings, schema: str
) -> None:
    other = str(uuid.uuid4())
    writer.record(
        [
            entry(case_id=CASE, action="unit.inbox", occurred_at=T0),
            entry(case_id=other, action="unit.inbox", occurred_at=T0),
        ]
    )
    writer.record(
        [
            entry(
                actor="staff-9",
                allowed=True,
                reason="emergency",
                emergency_reason="life-or-health",
                occurred_at=T0 + timedelta(hours=1),
            )
        ]
    )
    writer.record(
        [
            entry(
                actor="staff-8",
                allowed=False,
                reason="not-your-district",
                occurred_at=T0 + timedelta(days=2),
            )
        ]
    )
    by_case = search(settings, case_id=CASE, schema=schema)
    assert [(r.actor, r.outcome) for r in by_case] == [
        ("staff-1", "allowed"),
        ("staff-9", "allowed"),
        ("staff-8", "refused"),
    ]
    assert by_case[0].accessed_at == T0 and by_case[0].stream_id == "access-log-intake"
    assert [r.actor for r in search(settings, emergency=True, schema=schema)] == ["staff-9"]
    assert [r.case_id for r in search(settings, actor="staff-1", schema=schema)] == [
        CASE,
        other,
    ]
    day = access_log_audit.search(
        settings, start=date(2026, 3, 2), end=date(2026, 3, 2), schema=schema
    )
    assert len(day) == 3
    assert [r.actor for r in search(settings, start=T0 + timedelta(days=1), schema=schema)] == [
        "staff-8"
    ]


def _tamper(database_url: str, schema: str, statement: str) -> None:
    t = sql.Identifier(schema)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE {}.events DISABLE TRIGGER events_append_only").format(t))
        conn.execute(sql.SQL(statement).format(s=t))


def likvard(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "likvard.cli", *args],
        env={**os.environ, "COLUMNS": "250", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "statement",
    [
        # the queryable copy the searches filter on: another actor
        "UPDATE {s}.events SET payload = jsonb_set(payload, '{{actor}}', '\"someone-else\"')"
        " WHERE stream_version = 2",
        # the chained bytes themselves: one byte flipped
        "UPDATE {s}.events SET data = overlay(data placing '\\x00'::bytea from 40 for 1)"
        " WHERE stream_version = 2",
        # the entry removed from the end of the stream
        "DELETE FROM {s}.events WHERE stream_version = 3",
    ],
    ids=["payload-edited", "bytes-edited", "last-deleted"],
)
def test_an_edited_row_breaks_verify_access_log(
    writer: AccessLogWriter, database_url: str, schema: str, statement: str
) -> None:
    for n in range(3):
        writer.record([entry(actor=f"staff-{n}")])
    env = {"LIKVARD_DATABASE_URL": database_url, "LIKVARD_ACCESS_LOG_SCHEMA": schema}
    ok = likvard(env, "verify", "access-log")
    assert ok.returncode == 0, ok.stderr
    assert "3 events" in ok.stderr and "intact" in ok.stderr
    _tamper(database_url, schema, statement)
    broken = likvard(env, "verify", "access-log")
    assert broken.returncode == 1, broken.stderr
    assert "break" in broken.stderr and "stream access-log-intake" in broken.stderr


def test_record_raises_when_the_database_does_not_answer_and_writes_nothing(
    database_url: str, catalogue: Catalogue
) -> None:
    name = f"t_down_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    db = sql.Identifier(name)
    try:
        w = access_log.open_access_log(
            Settings(database_url=url), "referral", catalogue=catalogue, timeout=15
        )
        try:
            w.record([entry(actor="before")])
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(db))
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
            with pytest.raises(AccessLogUnavailable) as raised:
                w.record([entry(actor="during")])
            assert isinstance(raised.value, psycopg.OperationalError)  # the HTTP layer's 503
            with psycopg.connect(database_url, autocommit=True) as conn:
                conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(db))
            w.record([entry(actor="after")])  # the writer lives on once the database answers
            assert w.stats.failures >= 1
        finally:
            w.close()
        with psycopg.connect(url) as conn:
            actors = [
                r[0]
                for r in conn.execute(
                    "SELECT payload->>'actor' FROM access_log.events ORDER BY stream_version"
                ).fetchall()
            ]
            outbox = conn.execute("SELECT count(*) FROM access_log.outbox").fetchone()
        assert actors == ["before", "after"]
        assert outbox == (2,)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(db))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db))


def test_a_batch_that_fails_before_commit_fails_every_request_in_it_and_writes_none(
    settings: Settings, schema: str, catalogue: Catalogue
) -> None:
    inside = threading.Event()
    release = threading.Event()
    fail_next = {"on": False}

    def before_commit() -> None:
        if fail_next["on"]:
            inside.set()
            release.wait(10)
            raise RuntimeError("the transaction dies here")

    store = access_log.open_store(settings, schema=schema, service="intake", catalogue=catalogue)
    w = AccessLogWriter(store, "intake", before_commit=before_commit)
    try:
        w.record([entry(actor="first")])
        fail_next["on"] = True
        outcomes: list[BaseException | None] = []

        def read(n: int) -> None:
            try:
                w.record([entry(actor=f"lost-{n}"), entry(actor=f"lost-{n}-b")])
                outcomes.append(None)
            except BaseException as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=read, args=(0,))]
        threads[0].start()
        assert inside.wait(10)
        # These queue behind the dying transaction: the next batch, which commits.
        fail_next["on"] = False
        more = [threading.Thread(target=read, args=(n,)) for n in range(1, 4)]
        for t in more:
            t.start()
        wait_for(lambda: w._queued == 6, 10, "three requests queued")
        release.set()
        for t in threads + more:
            t.join(20)
        errors = [o for o in outcomes if o is not None]
        assert len(errors) == 1 and isinstance(errors[0], AccessLogError)
        actors = [e.payload["actor"] for e in store.read_stream("access-log-intake")]
        assert actors[0] == "first" and "lost-0" not in actors and "lost-0-b" not in actors
        assert sorted(actors[1:]) == sorted(f"lost-{n}{s}" for n in range(1, 4) for s in ("", "-b"))
        assert access_log_audit.verify(store) == []
    finally:
        w.close()


def test_a_full_queue_refuses_at_once(
    settings: Settings, schema: str, catalogue: Catalogue
) -> None:
    gate, in_flight = threading.Event(), threading.Event()
    store = access_log.open_store(settings, schema=schema, service="intake", catalogue=catalogue)

    def held() -> None:
        in_flight.set()  # the writer has taken the first batch off the queue
        gate.wait(10)

    w = AccessLogWriter(store, "intake", max_queue=3, before_commit=held)
    try:
        first = threading.Thread(target=w.record, args=([entry()],))
        first.start()
        wait_for(in_flight.is_set, 5, "the first batch in flight")
        w_queued = threading.Thread(target=w.record, args=([entry(), entry()],))
        w_queued.start()
        wait_for(lambda: w._queued == 2, 5, "two entries queued")
        with pytest.raises(AccessLogUnavailable, match="queue is full"):
            w.record([entry(), entry()])
        gate.set()
        first.join(10)
        w_queued.join(10)
        assert store.stream_version("access-log-intake") == 3
    finally:
        gate.set()
        w.close()


_RECORD_AND_DIE = """
import os, sys
from datetime import UTC, datetime
from likvard import access_log, access_log_audit
from likvard.config import Settings
from likvard.guard import AccessEntry
w = access_log.open_access_log(Settings(database_url=sys.argv[1]), "followup", schema=sys.argv[2])
w.record([AccessEntry(sys.argv[3], "auditor", "case.history", "case:x", None, True, "auditor",
                      None, "followup", datetime.now(UTC), None)])
print("answered", flush=True)
os._exit(0)  # killed right after answering: no close, no flush, no atexit
"""


def test_an_entry_whose_record_returned_survives_the_process_being_killed(
    database_url: str, settings: Settings, schema: str
) -> None:
    actor = f"staff-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run(
        [sys.executable, "-c", _RECORD_AND_DIE, database_url, schema, actor],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "answered" in proc.stdout, proc.stderr
    found = search(settings, actor=actor, schema=schema)
    assert [(r.actor, r.service, r.stream_id) for r in found] == [
        (actor, "followup", "access-log-followup")
    ]


def test_the_relay_publishes_the_access_log_to_its_topic_in_order(
    writer: AccessLogWriter,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    schema: str,
    catalogue: Catalogue,
) -> None:
    for n in range(5):
        writer.record([entry(actor=f"staff-{n}")])
    bg = Background()
    try:
        bg.start(OutboxRelay(database_url, schema, kafka_bootstrap, idle_wait=0.2).run)
        records = consume(kafka_bootstrap, topic_prefix + ACCESS_LOG_TOPIC, at_least=5)
    finally:
        bg.close()
    assert len(records) == 5
    assert {r.key for r in records} == {b"access-log-intake"}
    decoded = [catalogue.decode(r.value).record for r in records]
    assert [d["actor"] for d in decoded] == [f"staff-{n}" for n in range(5)]
    assert [d["metadata"]["stream_version"] for d in decoded] == [1, 2, 3, 4, 5]
    assert all(r.headers["stream_id"] == b"access-log-intake" for r in records)


# --- the command line's own reads -------------------------------------------------------
def _login() -> str:
    from likvard.cli.operator import os_login

    return os_login()


def test_verify_of_one_case_is_logged_under_the_operator_before_it_runs(
    database_url: str, settings: Settings, schema: str, new_schema: Callable[[str], str]
) -> None:
    from likvard.eventstore import open_store
    from tests.support import registered

    intake = new_schema("intake")
    store = open_store(settings, "intake", schema=intake)
    try:
        store.append(CASE, 0, [registered()])
    finally:
        store.pool.close()
    env = {
        "LIKVARD_DATABASE_URL": database_url,
        "LIKVARD_ACCESS_LOG_SCHEMA": schema,
        "LIKVARD_TOKEN": "",
    }
    r = likvard(env, "verify", "intake", "--stream", CASE, "--schema", intake)
    assert r.returncode == 0, r.stderr
    assert "1 events" in r.stderr
    whole = likvard(env, "verify", "intake", "--schema", intake)  # no case: not a case read
    assert whole.returncode == 0, whole.stderr
    found = search(settings, case_id=CASE, schema=schema)
    assert [(f.actor, f.action, f.resource, f.service, f.outcome) for f in found] == [
        (_login(), "history.verify", f"case:{CASE}", "cli", "allowed")
    ]
    assert found[0].stream_id == "access-log-cli" and found[0].reason == "os-login"


def test_a_read_that_cannot_be_logged_is_not_made(database_url: str, schema: str) -> None:
    """The access log's database does not answer: verify --stream shows nothing, exit 1."""
    env = {
        "LIKVARD_DATABASE_URL": database_url,
        "LIKVARD_ACCESS_LOG_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "LIKVARD_ACCESS_LOG_SCHEMA": schema,
        "LIKVARD_TOKEN": "",
    }
    intake = f"t_{uuid.uuid4().hex[:12]}"
    try:
        r = likvard(env, "verify", "intake", "--stream", CASE, "--schema", intake)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(intake)))
    assert r.returncode == 1, r.stderr
    assert "access log" in r.stderr and "nothing is read" in r.stderr
    assert "ok" not in r.stderr


def test_replay_and_dlq_show_are_logged(
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    settings: Settings,
    schema: str,
    catalogue: Catalogue,
    new_schema: Callable[[str], str],
) -> None:
    from likvard import dlq
    from likvard.ingest import DEAD_LETTER_TOPIC, DeadLetterSink, Outcome, Rejected, SourceRecord
    from tests.district import DistrictSystem

    case = str(uuid.uuid4())
    bad = DistrictSystem(catalogue).record("CaseClosed", case, {"reason": "PLANNED_END"})
    source = SourceRecord(topic_prefix + "likvard.district-ingest.v1", 0, 7, bad.key, bad.value, ())
    sink = DeadLetterSink(kafka_bootstrap, topic_prefix + DEAD_LETTER_TOPIC, "intake")
    try:
        rejected = Rejected("rule", "unknown-case", "No such case.")
        sink.send([Outcome(source, "dead-lettered", None, "CaseClosed", rejection=rejected)])
    finally:
        sink.close()
    (letter,) = dlq.read_all(kafka_bootstrap, topic_prefix + DEAD_LETTER_TOPIC, settle=0.2)
    env = {
        "LIKVARD_DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LIKVARD_TOPIC_PREFIX": topic_prefix,
        "LIKVARD_ACCESS_LOG_SCHEMA": schema,
        "LIKVARD_TOKEN": "",
    }
    shown = likvard(env, "dlq", "show", letter.id)  # without --payload: ops may
    assert shown.returncode == 0, shown.stderr
    assert "rule/unknown-case" in shown.stdout and "PLANNED_END" not in shown.stdout
    replayed = likvard(env, "replay", "--schema", new_schema("replay"))
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    found = search(settings, actor=_login(), schema=schema)
    assert [(f.action, f.resource, f.case_id) for f in found] == [
        ("ops.read", f"dead-letter:{letter.id}", case),
        ("history.replay", "replay", None),
    ]
    assert {f.service for f in found} == {"cli"}


def test_an_operator_token_names_the_actor_and_the_policy_decides(
    database_url: str, settings: Settings, schema: str, new_schema: Callable[[str], str]
) -> None:
    """LIKVARD_TOKEN verified by the development provider (a real process): an auditor's
    verify of a case is logged under the token's subject; an analyst's is refused, logged
    as refused, and shows nothing; a forged token ends the command without a read."""
    from likvard.eventstore import open_store
    from tests.identity import token
    from tests.support import registered

    intake = new_schema("intake")
    store = open_store(settings, "intake", schema=intake)
    try:
        store.append(CASE, 0, [registered()])
    finally:
        store.pool.close()
    base = {"LIKVARD_DATABASE_URL": database_url, "LIKVARD_ACCESS_LOG_SCHEMA": schema}
    args = ("verify", "intake", "--stream", CASE, "--schema", intake)
    auditor = likvard({**base, "LIKVARD_TOKEN": token("auditor", subject="audit-7")}, *args)
    assert auditor.returncode == 0, auditor.stderr
    analyst = likvard({**base, "LIKVARD_TOKEN": token("analyst", subject="analyst-3")}, *args)
    assert analyst.returncode == 1 and "not allowed" in analyst.stderr, analyst.stderr
    assert "ok" not in analyst.stderr
    forged = likvard({**base, "LIKVARD_TOKEN": "e30.e30.c2ln"}, *args)
    assert forged.returncode == 2 and "LIKVARD_TOKEN is not a valid token" in forged.stderr
    assert "e30.e30" not in forged.stderr
    found = search(settings, case_id=CASE, schema=schema)
    assert [(f.actor, f.roles, f.outcome, f.reason) for f in found] == [
        ("audit-7", "auditor", "allowed", "role"),
        ("analyst-3", "analyst", "refused", "role-not-allowed"),
    ]


def test_likvard_relay_access_log_publishes_the_access_log(
    writer: AccessLogWriter,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    schema: str,
    catalogue: Catalogue,
) -> None:
    from tests.support import stop_process

    writer.record([entry(actor="staff-relayed")])
    env = {
        **os.environ,
        "LIKVARD_DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LIKVARD_TOPIC_PREFIX": topic_prefix,
        "LIKVARD_ACCESS_LOG_SCHEMA": schema,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "likvard.cli", "relay", "access-log"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    store = reader(Settings(database_url=database_url), schema)
    try:
        records = consume(kafka_bootstrap, topic_prefix + ACCESS_LOG_TOPIC, at_least=1, timeout=60)
        wait_for(lambda: store.outbox_depth() == 0, 20, "the outbox emptied after the ack")
    finally:
        store.pool.close()
        stop_process(proc, signal.SIGTERM, 30)
    assert proc.returncode == 0
    assert [catalogue.decode(r.value).record["actor"] for r in records] == ["staff-relayed"]


def test_the_writers_fast_encoding_is_the_codecs_bytes(catalogue: Catalogue) -> None:
    from likvard.access_log import _AccessLogStore

    store = _AccessLogStore(None, "access_log", catalogue, producer="p", topic="t")  # type: ignore[arg-type]
    recorded = T0 + timedelta(seconds=1)
    for e in (
        entry(),
        entry(case_id=None, allowed=False, emergency_reason="life-or-health", trace_id=None),
    ):
        event = access_log.event_of(e, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        fast, metadata = store._encode("access-log-intake", 7, event, recorded)
        assert fast == catalogue.encode("CaseAccessed", {"metadata": metadata, **event.data})
        decoded = catalogue.decode(fast).record
        assert decoded["outcome"] == ("allowed" if e.allowed else "refused")
        assert decoded["metadata"]["case_id"] == "access-log-intake"
        assert decoded["metadata"]["producer"] == "likvard-intake"


def test_a_wrongly_typed_entry_fails_only_its_own_request(writer: AccessLogWriter) -> None:
    with pytest.raises(AccessLogError, match="actor"):
        writer.record([entry(actor=None)])  # type: ignore[arg-type]
    writer.record([entry()])
    assert writer.stats.entries == 1 and writer.stats.failures == 0
