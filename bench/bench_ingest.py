"""District ingest: records/s through the intake service's ingest processor alone (batches
judged against PostgreSQL, no Kafka), and end to end from the ingest topic through one
`IngestWorker` with its dead-letter sink.

Synthetic district traffic for the intake service: new cases registered (IntakeRegistered)
and, some hundreds of records later, assessed, given a care plan and closed; about 3 % of
the records are sent twice and about 2 % break a rule (an assessment on a closed case, a
case closed twice, a score out of range, an event for a case never registered). Encoded as
a district system encodes them (`tests/district.py`: plain fastavro, Avro single-object
encoding, headers `event_type` and `event_id`) and signed by the district's system with its
development key (`likvard-signature`, ES256), so the ingest verifies every record.

Run: .venv/bin/python -m bench.bench_ingest [--records N] [--batch N]
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from confluent_kafka import Consumer, Message, Producer
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from psycopg import sql

from bench.common import database, kafka, machine, report
from likvard.codec import Catalogue
from likvard.config import Settings
from likvard.district_keys import DistrictKeys
from likvard.districts import DistrictRegistry
from likvard.inbox import consumer_config
from likvard.ingest import (
    DEAD_LETTER_TOPIC,
    INGEST_TOPIC,
    BatchResult,
    DeadLetterSink,
    IngestWorker,
    SourceRecord,
    Status,
)
from likvard.topics import ensure_topics, load_topics
from services.intake import ingest as intake_ingest
from tests.district import DistrictSystem, assessment, signed, system_of
from tests.support import FAST_GROUP, consume

DISTRICTS = ["nordost", "centrum", "sydvast", "hisingen"]
MEAN_LAG = 150.0
"""Mean gap, in cases registered meanwhile, between one event of a case and its next."""

Headers = tuple[tuple[str, bytes | None], ...]


@dataclass(frozen=True)
class Planned:
    """A district record and what the intake service should make of it."""

    key: bytes
    value: bytes
    headers: Headers
    event_type: str
    expect: Status


class DistrictEncoder:
    """A district system's encoder, as `tests.district.single_object` (plain fastavro,
    single-object encoding) with each schema parsed once."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue
        self._schemas: dict[str, tuple[bytes, Any]] = {}

    def encode(self, event_type: str, record: dict[str, Any]) -> bytes:
        if event_type not in self._schemas:
            parsed = parse_schema(self.catalogue.schema(event_type))
            header = b"\xc3\x01" + bytes.fromhex(
                fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
            )
            self._schemas[event_type] = (header, parsed)
        header, parsed = self._schemas[event_type]
        body = io.BytesIO()
        schemaless_writer(body, parsed, record)
        return header + body.getvalue()


def district_records(catalogue: Catalogue, n: int, seed: int = 7) -> list[Planned]:
    """n records in the order a district system would send them (a case's records in order)."""
    rng = random.Random(seed)
    encoder = DistrictEncoder(catalogue)
    t0 = datetime.now(UTC) - timedelta(days=120)
    timeline: list[tuple[float, int, Planned]] = []  # (when, tie-breaker, record)

    def add(
        when: float,
        case: str,
        event_type: str,
        payload: dict[str, Any],
        at: datetime,
        expect: Status,
        district: str,
    ) -> None:
        event_id = str(uuid.uuid4())
        system = system_of(district)
        metadata = {
            "event_id": event_id,
            "event_type": event_type,
            "case_id": case,
            "stream_version": 0,
            "occurred_at": at,
            "recorded_at": at,
            "producer": system,
            "district": district,
            "actor": f"cw-{rng.randrange(1000, 9999)}",
            "correlation_id": str(uuid.uuid4()),
            "causation_id": None,
            "traceparent": None,
        }
        key = case.encode()
        value = encoder.encode(event_type, {"metadata": metadata, **payload})
        own = [("event_type", event_type.encode()), ("event_id", event_id.encode())]
        headers = signed(key, value, list[tuple[str, str | bytes | None]](own), system)
        record = Planned(
            key,
            value,
            tuple((k, v.encode() if isinstance(v, str) else v) for k, v in headers),
            event_type,
            expect,
        )
        timeline.append((when, len(timeline), record))
        if expect == "accepted" and rng.random() < 0.03:  # sent twice, a little later
            again = Planned(record.key, record.value, record.headers, event_type, "duplicate")
            timeline.append((when + rng.uniform(0, 50), len(timeline), again))

    i = 0
    while len(timeline) < n:
        case, district = str(uuid.uuid4()), DISTRICTS[i % 4]
        when, at = float(i), t0 + timedelta(minutes=5 * i)

        def later(when: float, at: datetime) -> tuple[float, datetime]:
            return when + rng.expovariate(1 / MEAN_LAG), at + timedelta(hours=rng.randrange(1, 72))

        if rng.random() < 0.012:  # an event for a case that was never registered
            add(when, case, "AssessmentCompleted", assessment(), at, "dead-lettered", district)
            i += 1
            continue
        registered = {
            "person": f"{rng.getrandbits(256):064x}",
            "district": district,
            "substances": rng.choice([["ALCOHOL"], ["NARCOTICS"], ["ALCOHOL", "GAMBLING"]]),
            "referral_source": rng.choice(["SELF", "HEALTHCARE", "RELATIVE"]),
            "children_in_household": rng.choice(["YES", "NO", "UNKNOWN"]),
            "birth_year": rng.randrange(1950, 2004),
        }
        add(when, case, "IntakeRegistered", registered, at, "accepted", district)
        if rng.random() < 0.01:  # a score outside the instrument's range
            when, at = later(when, at)
            bad = {**assessment(), "scores": [{"scale": "total", "value": 55}]}
            add(when, case, "AssessmentCompleted", bad, at, "dead-lettered", district)
        if rng.random() < 0.8:
            when, at = later(when, at)
            payload = {**assessment(), "scores": [{"scale": "total", "value": rng.randrange(41)}]}
            add(when, case, "AssessmentCompleted", payload, at, "accepted", district)
            if rng.random() < 0.75:
                when, at = later(when, at)
                plan = {
                    "plan_id": str(uuid.uuid4()),
                    "goals": ["Minska drickandet", "Behålla arbetet"][: rng.randrange(1, 3)],
                    "person_participated": rng.random() < 0.9,
                    "review_on": at.date() + timedelta(days=90),
                }
                add(when, case, "CarePlanAgreed", plan, at, "accepted", district)
                if rng.random() < 0.6:
                    when, at = later(when, at)
                    closed = {"reason": "GOALS_REACHED"}
                    add(when, case, "CaseClosed", closed, at, "accepted", district)
                    if rng.random() < 0.05:  # closed a second time, as a new event
                        when, at = later(when, at)
                        add(when, case, "CaseClosed", closed, at, "dead-lettered", district)
                    if rng.random() < 0.05:  # assessed after it was closed
                        when, at = later(when, at)
                        late = assessment()
                        add(when, case, "AssessmentCompleted", late, at, "dead-lettered", district)
        i += 1
    timeline.sort(key=lambda x: (x[0], x[1]))
    # A prefix in send order: every record's expected outcome depends only on earlier ones.
    return [r for _, _, r in timeline[:n]]


def describe(plan: list[Planned]) -> str:
    types = Counter(r.event_type for r in plan if r.expect == "accepted")
    expect = Counter(r.expect for r in plan)
    share = {k: 100 * v / len(plan) for k, v in expect.items()}
    return (
        ", ".join(f"{t} {types[t]}" for t in sorted(types, key=lambda t: -types[t]))
        + f"; duplicates {expect['duplicate']} ({share.get('duplicate', 0):.1f} %),"
        f" rule violations {expect['dead-lettered']} ({share.get('dead-lettered', 0):.1f} %)"
    )


def outcome_line(counts: Counter[str], codes: Counter[str]) -> str:
    return (
        f"  accepted {counts['accepted']}, duplicates {counts['duplicate']},"
        f" dead-lettered {counts['dead-lettered']}"
        f" ({', '.join(f'{c} {k}' for c, k in sorted(codes.items()))})"
    )


def processor_alone(url: str, plan: list[Planned], batch: int) -> None:
    """The processor judging batches straight from memory: dead letters only counted."""
    settings = Settings(database_url=url, topic_prefix=f"b{uuid.uuid4().hex[:6]}.")
    processor = intake_ingest.build(settings, "bench_ingest_direct")
    topic = settings.topic(INGEST_TOPIC)
    records = [
        SourceRecord(topic, 0, offset, r.key, r.value, r.headers) for offset, r in enumerate(plan)
    ]
    counts: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    latencies = []
    try:
        start = time.perf_counter()
        for i in range(0, len(records), batch):
            t = time.perf_counter()
            result = processor.process(records[i : i + batch])
            latencies.append((time.perf_counter() - t) * 1000)
            tally(result, counts, codes)
        seconds = time.perf_counter() - start
    finally:
        processor.store.pool.close()
    report(
        f"processor alone, batches of {batch} (no Kafka), per-batch latency",
        len(records),
        seconds,
        latencies,
    )
    print(outcome_line(counts, codes), flush=True)
    print(appends(url, processor.store.schema), flush=True)
    check(plan, counts)


def signatures_alone(plan: list[Planned]) -> None:
    """The signature check alone (the registry the ingest workers load), by algorithm."""
    keys = DistrictKeys.from_env(DistrictRegistry.load())
    start = time.perf_counter()
    for r in plan:
        keys.verify(r.key, r.value, r.headers)
    report("verify signatures alone (ES256, no I/O)", len(plan), time.perf_counter() - start)
    rsa = DistrictSystem(Catalogue.load(), district="angered")  # RS256
    sample = [rsa.raw(r.key, r.value, list(r.headers)) for r in plan[:2000]]
    start = time.perf_counter()
    for x in sample:
        keys.verify(x.key, x.value, x.headers)
    report("verify signatures alone (RS256, no I/O)", len(sample), time.perf_counter() - start)


def tally(result: BatchResult, counts: Counter[str], codes: Counter[str]) -> None:
    counts.update(o.status for o in result.outcomes)
    codes.update(o.rejection.code for o in result.dead_letters if o.rejection is not None)


def appends(url: str, schema: str) -> str:
    """How the events were stored: an append transaction stamps all its events with one
    `recorded_at`, so each distinct one is a transaction, each (stream, recorded_at) pair a
    stream's part of it."""
    with psycopg.connect(url) as conn:
        query = sql.SQL(
            "SELECT count(DISTINCT recorded_at), count(DISTINCT (stream_id, recorded_at)),"
            " count(*) FROM {}.events"
        ).format(sql.Identifier(schema))
        row = conn.execute(query).fetchone()
    transactions, parts, events = (int(row[0]), int(row[1]), int(row[2])) if row else (0, 0, 0)
    return (
        f"  {events} events stored by {transactions} transactions"
        f" ({parts} stream appends, {events / max(parts, 1):.2f} events per stream append)"
    )


def check(plan: list[Planned], counts: Counter[str]) -> None:
    expected = Counter(r.expect for r in plan)
    if +counts != +expected:
        print(f"  !! expected {dict(expected)}, got {dict(counts)}", flush=True)


class TimedConsumer(Consumer):
    """A consumer that notes when it first hands out records."""

    first_records: float | None = None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        messages: list[Message] = super().consume(num_messages, timeout)
        if messages and self.first_records is None:
            self.first_records = time.perf_counter()
        return messages


def end_to_end(url: str, bootstrap: str, plan: list[Planned], batch: int) -> None:
    """Produce the records to the ingest topic, then one intake worker judges them all."""
    prefix = f"b{uuid.uuid4().hex[:6]}."
    settings = Settings(database_url=url, kafka_bootstrap=bootstrap, topic_prefix=prefix)
    ensure_topics(bootstrap, load_topics(prefix=prefix))
    topic = settings.topic(INGEST_TOPIC)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    start = time.perf_counter()
    for r in plan:
        while True:
            try:
                producer.produce(topic, key=r.key, value=r.value, headers=list(r.headers))
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120) != 0:
        raise RuntimeError("not every record was delivered to the ingest topic")
    report("produce to the ingest topic (setup)", len(plan), time.perf_counter() - start)

    processor = intake_ingest.build(settings, "bench_ingest_live")
    sink = DeadLetterSink(bootstrap, settings.topic(DEAD_LETTER_TOPIC), "intake")
    worker = IngestWorker(processor, sink, batch_size=batch)
    consumer = TimedConsumer(consumer_config(bootstrap, f"bench-{uuid.uuid4()}", **FAST_GROUP))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(consumer, topic, stop))
    thread.start()
    try:
        deadline = time.monotonic() + 120 + len(plan) / 100
        while worker.stats.judged < len(plan) and time.monotonic() < deadline:
            time.sleep(0.01)
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join(60)
        processor.store.pool.close()
    s = worker.stats
    if consumer.first_records is None:
        print("  the worker never received a record", flush=True)
        return
    report(
        f"Kafka -> IngestWorker (batch {batch}) -> event store + dead letters",
        s.judged,
        end - consumer.first_records,
    )
    dead = sum(s.dead_lettered.values())
    counts = Counter({"accepted": s.accepted, "duplicate": s.duplicates, "dead-lettered": dead})
    print(
        f"  accepted {s.accepted}, duplicates {s.duplicates}, dead-lettered {dead}"
        f" (by stage: {dict(s.dead_lettered)}); {s.batches} batches"
        f" (mean {s.judged / max(s.batches, 1):.0f} records), {s.failures} failed",
        flush=True,
    )
    if s.judged < len(plan):
        print(f"  stopped waiting at {s.judged} of {len(plan)} records", flush=True)
    print(appends(url, processor.store.schema), flush=True)
    check(plan, counts)
    letters = consume(bootstrap, settings.topic(DEAD_LETTER_TOPIC), at_least=dead, timeout=30)
    print(f"  {len(letters)} records on the dead-letter topic", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    print(f"# ingest benchmark on {machine()}")
    # One warning per dead letter would flood the figures; errors still show.
    logging.getLogger("likvard.ingest").setLevel(logging.ERROR)
    catalogue = Catalogue.load()
    start = time.perf_counter()
    plan = district_records(catalogue, args.records)
    report("encode and sign district records (setup)", len(plan), time.perf_counter() - start)
    print(f"  {describe(plan)}", flush=True)
    signatures_alone(plan)
    with database() as url, kafka() as bootstrap:
        processor_alone(url, plan, args.batch)
        end_to_end(url, bootstrap, plan, args.batch)


if __name__ == "__main__":
    main()
