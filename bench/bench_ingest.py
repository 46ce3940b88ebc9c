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

The ceiling each run is measured against is encoding the same records (the district
system's side: `DistrictEncoder.encode`, no signing), timed in the same run; every stage
prints its records/s and the ratio against it. With `--runs 3` the stages alternate
(ceiling, processor, Kafka, ceiling, ...) and the medians are printed at the end.

Run: .venv/bin/python -m bench.bench_ingest [--records N] [--batch N] [--runs N]
     [--profile FILE]  (cProfile of the processor alone, one run, pstats to FILE)
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import logging
import multiprocessing
import os
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from confluent_kafka import Consumer, Message, Producer, TopicPartition
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
    IngestProcessor,
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
    source: tuple[str, dict[str, Any]] = field(compare=False, repr=False, default=("", {}))
    """(event type, record) before encoding: what the encode ceiling encodes again."""


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
        body = {"metadata": metadata, **payload}
        value = encoder.encode(event_type, body)
        own = [("event_type", event_type.encode()), ("event_id", event_id.encode())]
        headers = signed(key, value, list[tuple[str, str | bytes | None]](own), system)
        record = Planned(
            key,
            value,
            tuple((k, v.encode() if isinstance(v, str) else v) for k, v in headers),
            event_type,
            expect,
            (event_type, body),
        )
        timeline.append((when, len(timeline), record))
        if expect == "accepted" and rng.random() < 0.03:  # sent twice, a little later
            again = Planned(
                record.key, record.value, record.headers, event_type, "duplicate", record.source
            )
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


def encode_ceiling(catalogue: Catalogue, plan: list[Planned]) -> float:
    """Records/s of encoding the records as a district system does (schemas parsed once,
    no signing): the ceiling the ingest is measured against, in the same run."""
    encoder = DistrictEncoder(catalogue)
    for event_type in {r.source[0] for r in plan}:  # parse the schemas outside the timing
        encoder.encode(event_type, next(r.source[1] for r in plan if r.source[0] == event_type))
    start = time.perf_counter()
    for r in plan:
        encoder.encode(*r.source)
    seconds = time.perf_counter() - start
    report("ceiling: encode the records (no signing)", len(plan), seconds)
    return len(plan) / seconds


def _settings(url: str, bootstrap: str | None = None) -> Settings:
    prefix = f"b{uuid.uuid4().hex[:6]}."
    kek = base64.b64encode(os.urandom(32)).decode()  # the persons' keys, as `likvard up`
    if bootstrap is None:
        return Settings(database_url=url, topic_prefix=prefix, kek=kek)
    return Settings(database_url=url, kafka_bootstrap=bootstrap, topic_prefix=prefix, kek=kek)


def _schema() -> str:
    return f"bench_ingest_{uuid.uuid4().hex[:6]}"


def _close(processor: IngestProcessor) -> None:
    processor.store.pool.close()
    if processor.store.personal is not None:
        processor.store.personal.close()


def processor_alone(url: str, plan: list[Planned], batch: int, profile: str | None = None) -> float:
    """The processor judging batches straight from memory: dead letters only counted.
    Returns records/s."""
    settings = _settings(url)
    schema = _schema()
    processor = intake_ingest.build(settings, schema, f"{schema}_keys")
    topic = settings.topic(INGEST_TOPIC)
    records = [
        SourceRecord(topic, 0, offset, r.key, r.value, r.headers) for offset, r in enumerate(plan)
    ]
    counts: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    latencies = []
    profiler = cProfile.Profile() if profile else None
    try:
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        for i in range(0, len(records), batch):
            t = time.perf_counter()
            result = processor.process(records[i : i + batch])
            latencies.append((time.perf_counter() - t) * 1000)
            tally(result, counts, codes)
        seconds = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(profile))
    finally:
        _close(processor)
    report(
        f"processor alone, batches of {batch} (no Kafka), per-batch latency",
        len(records),
        seconds,
        latencies,
    )
    print(outcome_line(counts, codes), flush=True)
    print(appends(url, processor.store.schema), flush=True)
    check(plan, counts)
    return len(records) / seconds


def signatures_alone(plan: list[Planned]) -> None:
    """The signature check alone (the registry the ingest workers load), by algorithm."""
    keys = DistrictKeys.from_env(DistrictRegistry.load())
    start = time.perf_counter()
    for r in plan:
        keys.verify(r.key, r.value, r.headers)
    report("verify signatures alone (ES256, no I/O)", len(plan), time.perf_counter() - start)
    if hasattr(keys, "verify_many"):  # (not in the code before the batch check)
        start = time.perf_counter()
        for i in range(0, len(plan), 500):
            keys.verify_many([(r.key, r.value, r.headers) for r in plan[i : i + 500]])
        seconds = time.perf_counter() - start
        report("verify_many, batches of 500 (ES256, threads)", len(plan), seconds)
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


def end_to_end(url: str, bootstrap: str, plan: list[Planned], batch: int) -> float | None:
    """Produce the records to the ingest topic, then one intake worker judges them all.
    Returns records/s (None if the worker never received a record)."""
    settings = _settings(url, bootstrap)
    ensure_topics(bootstrap, load_topics(prefix=settings.topic_prefix))
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

    schema = _schema()
    processor = intake_ingest.build(settings, schema, f"{schema}_keys")
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
        _close(processor)
    s = worker.stats
    if consumer.first_records is None:
        print("  the worker never received a record", flush=True)
        return None
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
    return s.judged / (end - consumer.first_records)


class StaticConsumer(Consumer):
    """A consumer of a fixed share of the partitions (`assign` for `subscribe`), so that
    several worker processes split the topic from their first poll, with no rebalancing
    inside the timing; offsets are committed to the group as usual. Notes in `first`
    (monotonic, shared across processes) when it first hands out records."""

    def __init__(self, config: dict[str, Any], partitions: list[int], first: Any) -> None:
        super().__init__(config)
        self.partitions = partitions
        self.first = first
        self.seen = False

    def subscribe(self, topics: list[str], *args: Any, **kwargs: Any) -> None:
        self.assign([TopicPartition(t, p) for t in topics for p in self.partitions])

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        messages: list[Message] = super().consume(num_messages, timeout)
        if messages and not self.seen:
            self.seen = True
            with self.first.get_lock():
                if self.first.value == 0.0 or time.monotonic() < self.first.value:
                    self.first.value = time.monotonic()
        return messages


def _worker_process(
    settings: Settings, schema: str, partitions: list[int], batch: int, shared: Any
) -> None:
    """One ingest worker process: its own processor, dead-letter sink and consumer."""
    logging.getLogger("likvard.ingest").setLevel(logging.ERROR)
    judged, first, stop, results = shared
    processor = intake_ingest.build(settings, schema, f"{schema}_keys")
    sink = DeadLetterSink(
        str(settings.kafka_bootstrap), settings.topic(DEAD_LETTER_TOPIC), "intake"
    )
    worker = IngestWorker(processor, sink, batch_size=batch)
    group = f"bench-{schema}"
    config = consumer_config(str(settings.kafka_bootstrap), group, **FAST_GROUP)
    consumer = StaticConsumer(config, partitions, first)
    halt = threading.Event()
    thread = threading.Thread(
        target=worker.run, args=(consumer, settings.topic(INGEST_TOPIC), halt)
    )
    thread.start()
    try:
        last = 0
        while not stop.is_set():
            now = worker.stats.judged
            if now != last:
                with judged.get_lock():
                    judged.value += now - last
                last = now
            time.sleep(0.005)
    finally:
        halt.set()
        thread.join(60)
        _close(processor)
    s = worker.stats
    results.put((s.accepted, s.duplicates, dict(s.dead_lettered), s.batches, s.failures))


def end_to_end_processes(
    url: str, bootstrap: str, plan: list[Planned], batch: int, workers: int
) -> float | None:
    """As `end_to_end`, with `workers` ingest worker processes of the same group, each on
    its share of the topic's partitions (deployed as that many replicas). Returns
    records/s from the first consumed record to the last judged one."""
    settings = _settings(url, bootstrap)
    topics = load_topics(prefix=settings.topic_prefix)
    ensure_topics(bootstrap, topics)
    topic = settings.topic(INGEST_TOPIC)
    partitions = next(t.partitions for t in topics if t.name == topic)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for r in plan:
        while True:
            try:
                producer.produce(topic, key=r.key, value=r.value, headers=list(r.headers))
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120) != 0:
        raise RuntimeError("not every record was delivered to the ingest topic")
    schema = _schema()
    _close(intake_ingest.build(settings, schema, f"{schema}_keys"))  # migrate once, here
    ctx = multiprocessing.get_context("spawn")
    judged, first = ctx.Value("q", 0), ctx.Value("d", 0.0)
    stop, results = ctx.Event(), ctx.Queue()
    shares = [list(range(partitions))[n::workers] for n in range(workers)]
    procs = [
        ctx.Process(
            target=_worker_process,
            args=(settings, schema, share, batch, (judged, first, stop, results)),
        )
        for share in shares
    ]
    for proc in procs:
        proc.start()
    try:
        deadline = time.monotonic() + 120 + len(plan) / 100
        while judged.value < len(plan) and time.monotonic() < deadline:
            time.sleep(0.005)
        end = time.monotonic()
    finally:
        stop.set()
        outs = [results.get(timeout=90) for _ in procs]
        for proc in procs:
            proc.join(30)
    if first.value == 0.0:
        print("  the workers never received a record", flush=True)
        return None
    n = int(judged.value)
    report(f"Kafka -> {workers} IngestWorker processes (batch {batch})", n, end - first.value)
    accepted = sum(o[0] for o in outs)
    dups = sum(o[1] for o in outs)
    dead = sum(sum(o[2].values()) for o in outs)
    print(
        f"  accepted {accepted}, duplicates {dups}, dead-lettered {dead};"
        f" {sum(o[3] for o in outs)} batches, {sum(o[4] for o in outs)} failed",
        flush=True,
    )
    check(plan, Counter({"accepted": accepted, "duplicate": dups, "dead-lettered": dead}))
    return float(n / (end - first.value))


def ratio_line(name: str, rates: list[float], ceilings: list[float]) -> str:
    rate, ceiling = statistics.median(rates), statistics.median(ceilings)
    runs = ", ".join(f"{r:.0f}" for r in rates)
    return f"  {name:<28} median {rate:>8.0f} records/s ({runs}); ratio {rate / ceiling:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="also run N ingest worker processes")
    parser.add_argument("--profile", help="cProfile the processor alone into this file")
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
    ceilings: list[float] = []
    alone: list[float] = []
    live: list[float] = []
    many: list[float] = []
    with database() as url:
        if args.profile:
            ceilings.append(encode_ceiling(catalogue, plan))
            alone.append(processor_alone(url, plan, args.batch, args.profile))
            print(ratio_line("processor alone (profiled)", alone, ceilings), flush=True)
            return
        with kafka() as bootstrap:
            for run in range(args.runs):
                print(f"## run {run + 1} of {args.runs}", flush=True)
                ceilings.append(encode_ceiling(catalogue, plan))
                alone.append(processor_alone(url, plan, args.batch))
                rate = end_to_end(url, bootstrap, plan, args.batch)
                if rate is not None:
                    live.append(rate)
                if args.workers:
                    rate = end_to_end_processes(url, bootstrap, plan, args.batch, args.workers)
                    if rate is not None:
                        many.append(rate)
    print(f"## medians of {args.runs} run(s), {len(plan)} records, batches of {args.batch}")
    c = statistics.median(ceilings)
    print(f"  {'ceiling: encode':<28} median {c:>8.0f} records/s", flush=True)
    print(ratio_line("processor alone", alone, ceilings), flush=True)
    if live:
        print(ratio_line("Kafka -> IngestWorker", live, ceilings), flush=True)
    if many:
        name = f"Kafka -> {args.workers} worker processes"
        print(ratio_line(name, many, ceilings), flush=True)


if __name__ == "__main__":
    main()
