"""The auditors' history routes on a real uvicorn server, PostgreSQL and broker: replays as
of a date with their checksums beside the live read models', one at a time, the chain
verification of the records on Kafka (and `likvard verify` recording its store check),
auditors only, refusals logged, and jobs that a restart interrupted marked failed.

Events go through an event store and the outbox relay, so the records carry the bytes and
chain headers of production; the live read models are built from the same events."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import Producer
from fastapi import FastAPI
from psycopg import sql

from likvard import guard, http
from likvard.access_log_audit import search
from likvard.config import Settings
from likvard.eventstore import EventStore
from likvard.inbox import Incoming, decode_event
from likvard.relay import OutboxRelay
from services.projections import history, readmodels
from services.projections.history_api import install_history
from tests.identity import bearer
from tests.support import closed, consume, registered, serving, wait_for

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
CASES = 4
JANUARY = datetime(2024, 1, 10, 9, 0, tzinfo=UTC)
LATE = datetime(2024, 2, 1, 23, 30, tzinfo=UTC)  # 00:30 on 2 February in the city


def auditor() -> dict[str, str]:
    return bearer("auditor", subject="audit-1")


class Gate:
    """The jobs' `before_run` hook: passes unless held, so a test can keep a job running
    for as long as it needs (no timing)."""

    def __init__(self) -> None:
        self.held = False
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, kind: str, job_id: uuid.UUID) -> None:
        self.entered.set()
        if self.held:
            self.opened.wait(60)


@dataclass
class History:
    client: httpx.Client
    live: str
    access_log: str
    settings: Settings
    gate: Gate
    events: list[Incoming]


def relay_all(store: EventStore, database_url: str, bootstrap: str) -> None:
    relay = OutboxRelay(database_url, store.schema, bootstrap)
    with psycopg.connect(database_url) as conn:
        while relay.run_once(conn):
            pass
    assert store.outbox_depth() == 0


def build(database_url: str, schema: str, events: list[Incoming]) -> dict[str, str]:
    """Read models built straight from the events (no Kafka); their checksums."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, schema)
            readmodels.apply(conn, schema, events)
        return readmodels.checksum(conn, schema)


def drop_replays(database_url: str, live: str) -> None:
    """The replay schemas the jobs of `live` built (`<live>_replay_...`)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s",
            (live.replace("_", "\\_") + "\\_replay\\_%",),
        ).fetchall()
        for (name,) in rows:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def served(
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    schema: str,
    new_schema: Callable[[str], str],
) -> Iterator[Callable[[], Any]]:
    """Cases on Kafka (registered in January, closed just after 1 February in the city),
    the live read models of the same events in `schema`; `served()` starts the API."""
    for _ in range(CASES):
        store.append(
            str(uuid.uuid4()),
            0,
            [
                dataclasses.replace(registered(), occurred_at=JANUARY),
                dataclasses.replace(closed(), occurred_at=LATE),
            ],
        )
    relay_all(store, database_url, kafka_bootstrap)
    events = [decode_event(store.catalogue, store.topic, 0, 0, e.data) for e in store.read_all()]
    live = new_schema("live")
    build(database_url, live, events)
    settings = Settings(
        database_url=database_url, kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix
    )
    access_log = new_schema("al")
    gate = Gate()

    @contextmanager
    def serve() -> Iterator[History]:
        app = small_app(settings, access_log)
        install_history(app, settings, live, settle=0.3, before_run=gate)
        with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
            yield History(client, live, access_log, settings, gate, events)

    try:
        yield serve
    finally:
        gate.opened.set()
        drop_replays(database_url, live)


@pytest.fixture
def api(served: Callable[[], Any]) -> Iterator[History]:
    with served() as h:
        yield h


def small_app(settings: Settings, access_log: str) -> FastAPI:
    """The reporting app's frame as `api.create_app` makes it (HTTP conventions, sign-in,
    the access log), without its report routes: only the history is under test here."""
    app = FastAPI(title="Likvärd reporting (history)", responses=http.PROBLEM_RESPONSES)
    http.install(app, "projections", max_request_bytes=settings.max_request_bytes)
    guard.install(app, settings, "projections", access_log_schema=access_log)
    return app


def finished(h: History, path: str) -> dict[str, Any]:
    """Poll the job at `path` until it is no longer queued or running."""
    seen: dict[str, Any] = {}

    def done() -> bool:
        r = h.client.get(path, headers=auditor())
        assert r.status_code == 200, r.text
        seen.update(r.json())
        return seen["status"] not in ("queued", "running")

    wait_for(done, 60, f"{path} to finish")
    return seen


def test_a_full_replay_equals_the_live_read_models_and_is_listed(
    api: History, database_url: str
) -> None:
    started = api.client.post("/history/replays", json={"as_of": None}, headers=auditor())
    assert started.status_code == 202, started.text
    job = started.json()
    assert job["status"] in ("queued", "running") and job["actor"] == "audit-1"
    assert job["as_of"] is None and job["checksums"] is None
    done = finished(api, f"/history/replays/{job['id']}")
    assert done["status"] == "done", done
    assert done["events"] == done["total"] == 2 * CASES
    summary = done["summary"]
    assert (summary["projected"], summary["streams"], summary["break_count"]) == (
        2 * CASES,
        CASES,
        0,
    )
    with psycopg.connect(database_url) as conn:
        replayed = readmodels.checksum(conn, done["replay_schema"])
        live = readmodels.checksum(conn, api.live)
    assert done["replay_schema"].startswith(f"{api.live}_replay_")
    assert {c["table"]: c["replay"] for c in done["checksums"]} == replayed
    assert {c["table"]: c["live"] for c in done["checksums"]} == live
    assert all(c["equal"] for c in done["checksums"]) and done["equal"] is True
    listed = api.client.get("/history/replays", headers=auditor())
    assert listed.status_code == 200
    assert [j["id"] for j in listed.json()["jobs"]] == [job["id"]]
    # the start is in the access log, as `likvard replay` logs its read
    entries = search(api.settings, actor="audit-1", schema=api.access_log)
    assert [(e.action, e.resource, e.outcome) for e in entries] == [
        ("history.replay", "replay", "allowed")
    ]


def test_an_as_of_replay_has_the_checksums_of_the_history_then(
    api: History, database_url: str, new_schema: Callable[[str], str]
) -> None:
    started = api.client.post("/history/replays", json={"as_of": "2024-02-01"}, headers=auditor())
    assert started.status_code == 202, started.text
    done = finished(api, f"/history/replays/{started.json()['id']}")
    assert done["status"] == "done" and done["as_of"] == "2024-02-01", done
    assert done["summary"]["after_as_of"] == CASES  # the closings, on 2 February
    then = [e for e in api.events if e.event_type == "IntakeRegistered"]
    expected = build(database_url, new_schema("then"), then)
    assert {c["table"]: c["replay"] for c in done["checksums"]} == expected
    assert done["equal"] is False  # the live read models have the closings
    assert not next(c for c in done["checksums"] if c["table"] == "case_facts")["equal"]


def test_a_second_replay_while_one_runs_is_409(api: History) -> None:
    api.gate.held = True
    first = api.client.post("/history/replays", json={}, headers=auditor())
    assert first.status_code == 202, first.text
    assert api.gate.entered.wait(30)
    running = api.client.get(f"/history/replays/{first.json()['id']}", headers=auditor())
    assert running.json()["status"] == "running"
    second = api.client.post("/history/replays", json={"as_of": "2024-01-31"}, headers=auditor())
    assert second.status_code == 409, second.text
    assert second.headers["content-type"] == PROBLEM
    assert second.json()["type"].endswith("/replay-running")
    listed = api.client.get("/history/replays", headers=auditor()).json()["jobs"]
    assert [j["id"] for j in listed] == [first.json()["id"]]  # nothing else was queued
    api.gate.held = False
    api.gate.opened.set()
    assert finished(api, f"/history/replays/{first.json()['id']}")["status"] == "done"
    third = api.client.post("/history/replays", json={"as_of": "2024-01-31"}, headers=auditor())
    assert third.status_code == 202, third.text  # the lock went with the first job
    assert finished(api, f"/history/replays/{third.json()['id']}")["status"] == "done"


def test_only_auditors_and_every_refusal_is_logged(api: History) -> None:
    analyst = bearer("analyst", subject="analyst-9")
    calls = [
        ("POST", "/history/replays", {"as_of": None}),
        ("GET", "/history/replays", None),
        ("GET", f"/history/replays/{uuid.uuid4()}", None),
        ("POST", "/history/verifications", None),
        ("GET", "/history/verifications/latest", None),
    ]
    for method, path, body in calls:
        r = api.client.request(method, path, json=body, headers=analyst)
        assert r.status_code == 403, (path, r.text)
        assert r.headers["content-type"] == PROBLEM
    assert api.client.post("/history/replays", json={}).status_code == 401
    entries = search(api.settings, actor="analyst-9", schema=api.access_log)
    assert [(e.action, e.resource, e.outcome, e.reason) for e in entries] == [
        ("history.replay", "replay", "refused", "role-not-allowed"),
        ("history.replay", "replay", "refused", "role-not-allowed"),
        ("history.replay", "replay", "refused", "role-not-allowed"),
        ("history.verify", "verification", "refused", "role-not-allowed"),
        ("history.verify", "verification", "refused", "role-not-allowed"),
    ]
    assert api.client.get("/history/replays", headers=auditor()).json() == {"jobs": []}


def test_unknown_ids_and_no_verification_are_404(api: History) -> None:
    r = api.client.get(f"/history/replays/{uuid.uuid4()}", headers=auditor())
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    assert r.json()["type"].endswith("/unknown-replay")
    assert api.client.get("/history/replays/not-a-uuid", headers=auditor()).status_code == 422
    latest = api.client.get("/history/verifications/latest", headers=auditor())
    assert latest.status_code == 404 and latest.json()["type"].endswith("/no-verification")
    bad = api.client.post("/history/replays", json={"as_of": "2024-13-01"}, headers=auditor())
    assert bad.status_code == 422


def test_verification_counts_the_streams_and_lists_a_broken_record(
    api: History, store: EventStore, kafka_bootstrap: str
) -> None:
    started = api.client.post("/history/verifications", headers=auditor())
    assert started.status_code == 202, started.text
    assert started.json()["status"] == "running" and started.json()["source"] == "kafka"
    ok = finished(api, "/history/verifications/latest")
    assert ok["id"] == started.json()["id"]
    assert (ok["status"], ok["records"], ok["streams"], ok["breaks"]) == (
        "ok",
        2 * CASES,
        CASES,
        [],
    )
    # a record of a case without its chain headers: the chain cannot vouch for it
    victim = consume(kafka_bootstrap, store.topic, at_least=2 * CASES)[0]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    delivered: list[tuple[int, int]] = []
    producer.produce(
        store.topic,
        key=victim.key,
        value=victim.value,
        on_delivery=lambda err, msg: delivered.append((msg.partition() or 0, msg.offset() or 0)),
    )
    assert producer.flush(10) == 0 and len(delivered) == 1
    again = api.client.post("/history/verifications", headers=auditor())
    assert again.status_code == 202, again.text
    broken = finished(api, "/history/verifications/latest")
    assert broken["id"] == again.json()["id"]
    assert (broken["status"], broken["records"], broken["break_count"]) == (
        "broken",
        2 * CASES + 1,
        1,
    )
    (b,) = broken["breaks"]
    assert (b["topic"], b["partition"], b["offset"], b["stream_id"]) == (
        store.topic,
        *delivered[0],
        None,
    )
    assert "hash-chain headers missing" in b["reason"]
    assert set(b) == {"topic", "partition", "offset", "stream_id", "version", "position", "reason"}


def test_jobs_left_running_by_a_dead_process_are_failed_at_start(
    served: Callable[[], Any], database_url: str, schema: str
) -> None:
    with served() as h:
        live = h.live
    job_id, vid = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, actor, started_at, status, events, replay_schema)"
                " VALUES (%s, 'audit-1', now(), 'running', 17, 'gone')"
            ).format(sql.Identifier(live, "replay_jobs")),
            (job_id,),
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (id, actor, source, started_at, status)"
                " VALUES (%s, 'audit-1', 'kafka', now(), 'running')"
            ).format(sql.Identifier(live, "verifications")),
            (vid,),
        )
    with served() as h:
        job = h.client.get(f"/history/replays/{job_id}", headers=auditor()).json()
        latest = h.client.get("/history/verifications/latest", headers=auditor()).json()
    assert (job["status"], job["error"], job["events"]) == ("failed", "interrupted", 17)
    assert job["finished_at"] is not None
    assert (latest["id"], latest["status"], latest["error"]) == (str(vid), "failed", "interrupted")


def test_likvard_verify_records_its_store_check_for_the_console(
    api: History, store: EventStore, database_url: str
) -> None:
    env = dict(
        os.environ,
        LIKVARD_DATABASE_URL=database_url,
        LIKVARD_TOPIC_PREFIX=api.settings.topic_prefix,
        LIKVARD_TOKEN="",
    )
    args = [sys.executable, "-m", "likvard.cli", "verify", "intake", "--schema", store.schema]
    args += ["--projections-schema", api.live]
    ok = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert f"ok: {2 * CASES} events" in ok.stderr
    latest = api.client.get("/history/verifications/latest", headers=auditor()).json()
    assert (latest["source"], latest["status"], latest["records"], latest["streams"]) == (
        "store:intake",
        "ok",
        2 * CASES,
        CASES,
    )
    assert latest["actor"].startswith("os:")
    with psycopg.connect(database_url, autocommit=True) as conn:  # the bytes of one event
        conn.execute(
            sql.SQL("ALTER TABLE {}.events DISABLE TRIGGER events_append_only").format(
                sql.Identifier(store.schema)
            )
        )
        conn.execute(
            sql.SQL(
                "UPDATE {}.events SET data = overlay(data placing '\\x00'::bytea from 40 for 1)"
                " WHERE global_position = 1"
            ).format(sql.Identifier(store.schema))
        )
    broken = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1, broken.stderr
    latest = api.client.get("/history/verifications/latest", headers=auditor()).json()
    assert latest["status"] == "broken" and latest["break_count"] >= 1
    assert {(b["topic"], b["position"], b["offset"]) for b in latest["breaks"]} == {
        (store.topic, 1, None)
    }


# --- the pure part --------------------------------------------------------------------------
def test_checksums_side_by_side() -> None:
    rows = history.compare_checksums({"a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"})
    assert rows == [
        {"table": "a", "replay": "1", "live": "1", "equal": True},
        {"table": "b", "replay": "2", "live": "3", "equal": False},
        {"table": "c", "replay": None, "live": "4", "equal": False},
    ]
    assert [r["equal"] for r in history.compare_checksums({"a": "1"}, None)] == [False]


def test_a_failure_reason_never_quotes_the_database() -> None:
    from likvard.topic_reader import TopicReadError
    from services.projections.replay import ReplayError

    leaked = ReplayError("applying to the read models failed: Key (case_id)=(secret) exists")
    assert history.failure_reason(leaked) == "applying to the read models failed"
    assert "secret" not in history.failure_reason(psycopg.errors.UniqueViolation("(secret)"))
    assert history.failure_reason(TopicReadError("topic x is not on the broker")) == (
        "topic x is not on the broker"
    )
    assert history.failure_reason(KeyError("secret")) == "unexpected error (KeyError)"


def test_a_job_schema_is_a_valid_fresh_name() -> None:
    job = uuid.UUID(int=7)
    now = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert history.job_schema("t_abc", job, now) == "t_abc_replay_20260301_120000_000000"
    long = "x" * 50
    assert history.job_schema(long, job, now).startswith("projections_replay_20260301")
