"""A case's hash-chain status per stream, from the timeline's stored links.

The pure fold first (rows in, statuses out, no database); then records published by the
outbox relay and records produced by hand (a hash that does not match its bytes, a skipped
version, a broken link, no chain headers) projected by the live worker and by the replay
on a real broker and PostgreSQL; then GET /cases/{case_id}/chain."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import httpx
import psycopg
import pytest
from confluent_kafka import Producer

from likvard.access_log_audit import search
from likvard.config import Settings
from likvard.eventstore import GENESIS_HASH, EventStore, StoredEvent, chain_hash
from likvard.inbox import decode_event
from likvard.relay import OutboxRelay
from services.projections import readmodels, worker
from services.projections.api import create_app
from services.projections.replay import Replay
from services.projections.timeline_chain import (
    HASH_MISMATCH,
    LINK_MISMATCH,
    MALFORMED,
    MISSING,
    NO_HEADERS,
    TWICE,
    ChainRow,
    Link,
    StreamChain,
    fold_chains,
    link_of,
)
from tests.identity import bearer
from tests.support import closed, registered, reopened, serving, wait_for

T = "likvard.intake.v1"
FORGED = bytes([0x11]) * 32


def chained(n: int, stream_id: str = "s1", topic: str = T) -> list[ChainRow]:
    """n rows of one intact stream."""
    rows, prev = [], GENESIS_HASH
    for v in range(1, n + 1):
        digest = chain_hash(prev, f"{stream_id}-{v}".encode())
        rows.append(ChainRow(topic, stream_id, v, prev, digest, True))
        prev = digest
    return rows


def one(rows: list[ChainRow]) -> tuple[str, int | None, str | None]:
    (stream,) = fold_chains(rows)
    return stream.status, stream.broken_at, stream.reason


def headers_of(prev: bytes, digest: bytes, stream_id: str = "s1") -> dict[str, bytes]:
    return {
        "stream_id": stream_id.encode(),
        "stream_version": b"1",
        "prev_hash": prev.hex().encode(),
        "hash": digest.hex().encode(),
    }


# --- the pure fold ----------------------------------------------------------------------


def test_intact_streams_are_verified_each_in_topic_and_stream_order() -> None:
    rows = chained(2, "s2") + chained(3, "s1") + chained(1, "s1", "likvard.referral.v1")
    assert fold_chains(reversed(rows)) == [
        StreamChain("s1", T, 3, "verified", None, None),
        StreamChain("s2", T, 2, "verified", None, None),
        StreamChain("s1", "likvard.referral.v1", 1, "verified", None, None),
    ]


def test_the_first_break_of_a_stream_is_its_version_and_reason() -> None:
    s = chained(4)
    assert one([s[0], s[2], s[3]]) == ("broken", 2, MISSING)
    assert one(s[1:]) == ("broken", 1, MISSING)  # version 1 never seen
    assert one([s[0], s[1], replace(s[1], hash=FORGED), s[2]]) == ("broken", 2, TWICE)
    bad = ChainRow(T, "s1", 2, s[1].prev_hash, s[1].hash, False)
    assert one([s[0], bad, s[2], s[3]]) == ("broken", 2, HASH_MISMATCH)
    relinked = ChainRow(T, "s1", 3, FORGED, chain_hash(FORGED, b"x"), True)
    assert one([s[0], s[1], relinked, s[3]]) == ("broken", 3, LINK_MISMATCH)
    unreadable = ChainRow(T, "s1", 1, None, None, False)
    assert one([unreadable, *s[1:]]) == ("broken", 1, MALFORMED)
    first_wrong = ChainRow(T, "s1", 1, FORGED, chain_hash(FORGED, b"y"), True)
    assert one([first_wrong]) == ("broken", 1, LINK_MISMATCH)  # not from the genesis hash


def test_records_without_chain_headers_are_unknown_unless_something_is_broken() -> None:
    s = chained(4)
    bare = ChainRow(T, "s1", 2, None, None, None)
    # version 3's link cannot be checked after an unchained version 2; its own hash can
    assert one([s[0], bare, s[2], s[3]]) == ("unknown", None, NO_HEADERS)
    bad = ChainRow(T, "s1", 4, s[3].prev_hash, s[3].hash, False)
    assert one([s[0], bare, s[2], bad]) == ("broken", 4, HASH_MISMATCH)
    nameless = [ChainRow(T, None, v, None, None, None) for v in (1, 2)]
    assert fold_chains(nameless + s) == [
        StreamChain("s1", T, 4, "verified", None, None),
        StreamChain(None, T, 2, "unknown", None, NO_HEADERS),
    ]
    assert fold_chains([]) == []


def test_a_records_link_is_judged_from_its_own_bytes() -> None:
    digest = chain_hash(GENESIS_HASH, b"value")
    assert link_of(headers_of(GENESIS_HASH, digest), b"value") == Link(
        "s1", GENESIS_HASH, digest, True
    )
    assert link_of(headers_of(GENESIS_HASH, digest), b"changed") == Link(
        "s1", GENESIS_HASH, digest, False
    )
    assert link_of({"event_type": b"X"}, b"value") is None
    assert link_of({"stream_id": b"s1"}, b"value") == Link("s1", None, None, None)
    malformed = headers_of(GENESIS_HASH, digest) | {"hash": b"zz"}
    assert link_of(malformed, b"value") == Link("s1", GENESIS_HASH, None, False)
    short = headers_of(GENESIS_HASH, digest) | {"prev_hash": b"00"}
    assert link_of(short, b"value") == Link("s1", None, digest, False)


# --- on a real broker and PostgreSQL ------------------------------------------------------


def relay_all(store: EventStore, database_url: str, bootstrap: str) -> None:
    relay = OutboxRelay(database_url, store.schema, bootstrap)
    with psycopg.connect(database_url) as conn:
        while relay.run_once(conn):
            pass
    assert store.outbox_depth() == 0


def chain_headers(
    e: StoredEvent, *, prev: bytes | None = None, digest: bytes | None = None
) -> list[tuple[str, bytes]]:
    """The relay's headers of a stored event (`relay.event_headers`), or with another link."""
    return [
        ("event_type", e.event_type.encode()),
        ("event_id", str(e.event_id).encode()),
        ("stream_id", e.stream_id.encode()),
        ("stream_version", str(e.stream_version).encode()),
        ("prev_hash", (e.prev_hash if prev is None else prev).hex().encode()),
        ("hash", (e.hash if digest is None else digest).hex().encode()),
    ]


@dataclass(frozen=True)
class Published:
    cases: dict[str, str]  # what was done to the case -> its id
    on_kafka: list[StoredEvent]  # every stored event with a record on the topic
    expected: dict[str, StreamChain]


@pytest.fixture
def published(store: EventStore, database_url: str, kafka_bootstrap: str) -> Published:
    """Four cases published by the relay; then, by hand: a fourth version whose hash is not
    its bytes', a fifth without the fourth, a fourth linked to a forged hash, and a fifth
    case whose records carry no chain headers."""
    cases = {n: str(uuid.uuid4()) for n in ("intact", "hash", "skip", "link", "bare")}
    for name in ("intact", "hash", "skip", "link"):
        store.append(cases[name], 0, [registered(), closed(), reopened()])
    relay_all(store, database_url, kafka_bootstrap)
    store.append(cases["hash"], 3, [closed()])  # left in the outbox: never relayed
    store.append(cases["skip"], 3, [closed(), reopened()])
    store.append(cases["link"], 3, [closed()])
    store.append(cases["bare"], 0, [registered(), closed()])
    streams = {name: store.read_stream(case) for name, case in cases.items()}
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    by_hand: list[tuple[StoredEvent, list[tuple[str, bytes]]]] = []
    h4 = streams["hash"][3]
    by_hand.append((h4, chain_headers(h4, digest=chain_hash(h4.prev_hash, h4.data + b"!"))))
    by_hand.append((streams["skip"][4], chain_headers(streams["skip"][4])))
    link4 = streams["link"][3]
    by_hand.append(
        (link4, chain_headers(link4, prev=FORGED, digest=chain_hash(FORGED, link4.data)))
    )
    for e in streams["bare"]:
        by_hand.append((e, [("event_type", e.event_type.encode())]))
    for e, headers in by_hand:
        producer.produce(
            store.topic,
            key=e.stream_id.encode(),
            value=e.data,
            headers=[(k, v) for k, v in headers],
        )
    assert producer.flush(30) == 0
    relayed = [e for name in ("intact", "hash", "skip", "link") for e in streams[name][:3]]
    c, topic = cases, store.topic
    return Published(
        cases,
        relayed + [e for e, _ in by_hand],
        {
            "intact": StreamChain(c["intact"], topic, 3, "verified", None, None),
            "hash": StreamChain(c["hash"], topic, 4, "broken", 4, HASH_MISMATCH),
            "skip": StreamChain(c["skip"], topic, 4, "broken", 4, MISSING),
            "link": StreamChain(c["link"], topic, 4, "broken", 4, LINK_MISMATCH),
            "bare": StreamChain(None, topic, 2, "unknown", None, NO_HEADERS),
        },
    )


def processed(database_url: str, schema: str) -> int:
    with psycopg.connect(database_url) as conn:
        return readmodels.processed_count(conn, schema)


def statuses(database_url: str, schema: str, cases: dict[str, str]) -> dict[str, StreamChain]:
    with psycopg.connect(database_url) as conn:
        found = {name: readmodels.chain_status(conn, schema, c) for name, c in cases.items()}
    assert all(len(streams) == 1 for streams in found.values()), found
    return {name: streams[0] for name, streams in found.items()}


def sums(database_url: str, schema: str) -> dict[str, str]:
    with psycopg.connect(database_url) as conn:
        return readmodels.checksum(conn, schema)


@pytest.mark.integration
def test_the_live_worker_and_the_replay_tell_each_streams_chain_from_the_timeline(
    published: Published,
    store: EventStore,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
) -> None:
    total = len(published.on_kafka)
    assert total == 17
    live = new_schema("live")
    settings = Settings(
        database_url=database_url, kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix
    )
    projection, consumer = worker.build(
        settings,
        live,
        batch_size=4,
        consumer_overrides={"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
    )
    stop = threading.Event()
    running = threading.Thread(target=projection.run, args=(consumer, stop), daemon=True)
    running.start()
    try:
        wait_for(lambda: processed(database_url, live) == total, 90, "the live projection")
    finally:
        stop.set()
        running.join(30)
    assert not running.is_alive()
    assert statuses(database_url, live, published.cases) == published.expected

    rebuilt = new_schema("replay")
    topics = [topic_prefix + t for t in readmodels.SOURCE_TOPICS]
    run = Replay(database_url, kafka_bootstrap, topics, rebuilt, settle=0.3)
    try:
        result = run.run()
    finally:
        run.close()
    assert result.projected == total
    # the replay's own check over Kafka finds the same places (and each unchained record)
    assert sorted((b.stream_id, b.stream_version) for b in result.breaks if b.stream_id) == sorted(
        (published.cases[n], 4) for n in ("hash", "skip", "link")
    )
    assert statuses(database_url, rebuilt, published.cases) == published.expected

    # Straight from the events (no records, so no links): every stream unknown, and the
    # checksums those of the live and replayed read models, links and all.
    direct = new_schema("direct")
    events = [decode_event(store.catalogue, store.topic, 0, 0, e.data) for e in published.on_kafka]
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, direct)
        assert readmodels.apply(conn, direct, events) == total
    plain = statuses(database_url, direct, published.cases)
    assert {s.status for s in plain.values()} == {"unknown"}
    assert sums(database_url, live) == sums(database_url, rebuilt) == sums(database_url, direct)


@pytest.fixture
def chain_api(
    store: EventStore, database_url: str, new_schema: Callable[[str], str]
) -> Iterator[tuple[httpx.Client, dict[str, str], str]]:
    """The API over two cases projected with their records' links (built from the stored
    events, as the relay would publish them): one intact, one whose second record's bytes
    changed; and the access-log schema its reads go to."""
    ok, bad = str(uuid.uuid4()), str(uuid.uuid4())
    store.append(ok, 0, [registered(), closed()])
    store.append(bad, 0, [registered(), closed(), reopened()])
    events, links = [], []
    for e in store.read_all():
        events.append(decode_event(store.catalogue, store.topic, 0, 0, e.data))
        value = e.data + b"!" if (e.stream_id, e.stream_version) == (bad, 2) else e.data
        links.append(link_of(dict(chain_headers(e)), value))
    projected, logged = new_schema("proj"), new_schema("al")
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        readmodels.migrate(conn, projected)
        readmodels.apply(conn, projected, events, links)
    app = create_app(
        Settings(database_url=database_url), schema=projected, access_log_schema=logged
    )
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        yield client, {"ok": ok, "bad": bad}, logged


@pytest.mark.integration
def test_get_chain_is_the_timelines_policy_and_every_read_is_logged(
    chain_api: tuple[httpx.Client, dict[str, str], str], store: EventStore, database_url: str
) -> None:
    api, cases, logged = chain_api
    auditor, own = bearer("auditor"), bearer("case-worker", districts=["nordost"])
    ok = api.get(f"/cases/{cases['ok']}/chain", headers=auditor)
    assert ok.status_code == 200, ok.text
    assert ok.json() == [
        {
            "stream_id": cases["ok"],
            "topic": store.topic,
            "versions": 2,
            "status": "verified",
            "broken_at": None,
            "reason": None,
        }
    ]
    bad = api.get(f"/cases/{cases['bad']}/chain", headers=own)
    assert bad.status_code == 200, bad.text
    assert [(s["status"], s["broken_at"], s["reason"]) for s in bad.json()] == [
        ("broken", 2, HASH_MISMATCH)
    ]
    # the timeline's answer is what it was: no link columns in it
    timeline = api.get(f"/cases/{cases['bad']}/timeline", headers=own)
    assert timeline.status_code == 200
    assert list(timeline.json()[0]) == list(readmodels.TIMELINE_COLUMNS)

    path = f"/cases/{cases['ok']}/chain"
    other = bearer("case-worker", districts=["hisingen"])
    refused = api.get(path, headers=other)
    assert refused.status_code == 403
    assert "not-your-district" in refused.json()["detail"]
    emergency = api.get(path, headers=other | {"Likvard-Emergency-Reason": "child-at-risk"})
    assert emergency.status_code == 200
    assert emergency.json() == ok.json()
    for role in ("analyst", "unit-staff", "records-officer", "ops"):
        assert api.get(path, headers=bearer(role)).status_code == 403, role
    assert api.get(path).status_code == 401

    missing = api.get(f"/cases/{uuid.uuid4()}/chain", headers=auditor)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert api.get("/cases/19121212-1212/chain", headers=auditor).status_code == 404

    entries = search(Settings(database_url=database_url), case_id=cases["ok"], schema=logged)
    assert [(e.action, e.outcome, e.reason) for e in entries][:3] == [
        ("case.history", "allowed", entries[0].reason),
        ("case.history", "refused", "not-your-district"),
        ("case.history", "allowed", "emergency"),
    ]
    assert len(entries) == 3 + 4  # and the four roles refused
    assert all(e.resource == entries[0].resource for e in entries)
