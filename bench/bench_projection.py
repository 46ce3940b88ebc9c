"""Live projection throughput and latency, side by side with the ceiling measured in the same
run: events/s from Kafka into the read models (`likvard project`, its own process) against a
bare consume + fastavro decode of the same records (no read model, nothing written), medians
of interleaved runs; then the commit-to-read-model latency while records arrive at a fixed
rate; and the read-model code alone (decoded batches applied straight to PostgreSQL).

The records are the replay benchmark's chained care chains over the three service topics
(six partitions each), with their chain-link headers, as the relay publishes them.

Latency: each record's produce time (when the relay would publish it, right after its
event-store commit) against the first moment the worker's provenance mark for its partition
(`applied_offsets`, written in the same transaction as its read-model rows) covers its offset,
polled every 20 ms.

Run: .venv/bin/python -m bench.bench_projection [--events N] [--runs 3] [--rate 50000]
"""

from __future__ import annotations

import argparse
import bisect
import functools
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from typing import Any

import psycopg
from confluent_kafka import KafkaError, Message, Producer

from bench.bench_replay import Record, ceiling, records as chained_records
from bench.common import database, kafka, machine, percentile, report
from likvard.codec import Catalogue
from likvard.db import check_schema_name
from likvard.inbox import Incoming, decode_event
from likvard.topics import ensure_topics, load_topics
from services.projections import readmodels
from services.projections.timeline_chain import link_of

POLL = 0.02  # seconds between looks at the read models


def produce(bootstrap: str, prefix: str, recs: Sequence[Record]) -> None:
    """Every record onto the topics of `prefix` (fresh topics, so each run starts empty)."""
    ensure_topics(bootstrap, load_topics(prefix=prefix))
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000}
    )
    for topic, key, value, headers in recs:
        while True:
            try:
                producer.produce(prefix + topic, key=key, value=value, headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(300) == 0, "not every record was delivered"


def topics_of(recs: Sequence[Record]) -> list[str]:
    return sorted({r[0] for r in recs})


WORKERS = 1  # `likvard project` processes in the one consumer group (--workers)


@contextmanager
def worker(url: str, bootstrap: str, prefix: str, schema: str, batch: int) -> Iterator[None]:
    """`likvard project` into `schema`, WORKERS processes of one consumer group (the
    partitions shared between them), over the topics of `prefix`."""
    env = dict(
        os.environ,
        LIKVARD_DATABASE_URL=url,
        KAFKA_BOOTSTRAP_SERVERS=bootstrap,
        LIKVARD_TOPIC_PREFIX=prefix,
        LIKVARD_CONSUMER_SESSION_TIMEOUT_MS="4000",
        LIKVARD_PROJECTION_BATCH_SIZE=str(batch),
    )
    env.pop("LIKVARD_OPS_PORT", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "likvard.cli", "project", "--schema", schema],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(WORKERS)
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


class Watch:
    """Looks at a worker's progress over one kept connection, in its tiny provenance table
    (`applied_offsets`, one row per partition, written in each batch's transaction).

    Before 2026-12-05 the benchmark opened a connection and ran `count(*)` over the whole
    `processed` table every 20 ms: a PostgreSQL backend fork plus a scan growing with the
    events, on the two cores the worker and PostgreSQL share (measured against it in
    bench/results/projection.md)."""

    def __init__(self, url: str, schema: str) -> None:
        self.schema = check_schema_name(schema)
        self.conn = psycopg.connect(url, autocommit=True)

    def close(self) -> None:
        self.conn.close()

    def offsets(self) -> dict[tuple[str, int], int]:
        try:
            rows = self.conn.execute(
                f'SELECT topic, partition, "offset" FROM {self.schema}.applied_offsets'
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
        return {(t, int(p)): int(o) for t, p, o in rows}

    def records(self) -> int:
        """Records applied so far: on fresh topics, each partition's next offset."""
        return sum(o + 1 for o in self.offsets().values())

    def events(self) -> int:
        return readmodels.processed_count(self.conn, self.schema)


def live(url: str, bootstrap: str, prefix: str, schema: str, n: int, batch: int) -> float:
    """Events/s of the live worker over n records already on Kafka, from the first applied
    batch to the last event (every record is a new event: checked once at the end)."""
    with worker(url, bootstrap, prefix, schema, batch), closing(Watch(url, schema)) as watch:
        deadline = time.monotonic() + 600
        while (first := watch.records()) == 0:
            if time.monotonic() > deadline:
                raise RuntimeError("the projection worker applied nothing in 600 s")
            time.sleep(POLL)
        start = time.perf_counter()
        while (done := watch.records()) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the projection worker stopped at {done} of {n} records")
            time.sleep(POLL)
        elapsed = time.perf_counter() - start
        if (events := watch.events()) != n:
            raise RuntimeError(f"{events} events in the read models for {n} records")
        return (done - first) / elapsed


def latency(
    url: str, bootstrap: str, recs: Sequence[Record], batch: int, rate: float
) -> tuple[list[float], float]:
    """Per record, ms from produce to its partition's applied offset covering it, while the
    records are produced at `rate` per second; and the rate achieved."""
    prefix, schema = f"l{uuid.uuid4().hex[:6]}.", "bench_latency"
    ensure_topics(bootstrap, load_topics(prefix=prefix))
    produced: dict[tuple[str, int], list[tuple[int, float]]] = {}

    def delivered(at: float, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            key = (str(msg.topic()), int(msg.partition() or 0))
            produced.setdefault(key, []).append((int(msg.offset() or 0), at))

    seen: list[tuple[float, dict[tuple[str, int], int]]] = []
    stop = threading.Event()

    def watch() -> None:
        with closing(Watch(url, schema)) as watcher:
            while not stop.is_set():
                seen.append((time.perf_counter(), watcher.offsets()))
                time.sleep(POLL)

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    warm, rest = recs[:1000], recs[1000:]
    with worker(url, bootstrap, prefix, schema, batch), closing(Watch(url, schema)) as progress:
        for topic, key, value, headers in warm:  # the worker joins its group and migrates
            producer.produce(prefix + topic, key=key, value=value, headers=headers)
        producer.flush(60)
        deadline = time.monotonic() + 120
        while progress.records() < len(warm):
            if time.monotonic() > deadline:
                raise RuntimeError("the projection worker did not start")
            time.sleep(POLL)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.perf_counter()
        step = max(1, int(rate * 0.01))  # a slice every 10 ms
        for i in range(0, len(rest), step):
            due = start + i / rate
            while (now := time.perf_counter()) < due:
                producer.poll(min(0.005, due - now))
            for topic, key, value, headers in rest[i : i + step]:
                now = time.perf_counter()
                while True:
                    try:
                        producer.produce(
                            prefix + topic,
                            key=key,
                            value=value,
                            headers=headers,
                            on_delivery=functools.partial(delivered, now),
                        )
                        break
                    except BufferError:
                        producer.poll(0.005)
            producer.poll(0)
        producer.flush(120)
        achieved = len(rest) / (time.perf_counter() - start)
        deadline = time.monotonic() + 300
        while progress.records() < len(recs) and time.monotonic() < deadline:
            time.sleep(POLL)
        time.sleep(2 * POLL)
        stop.set()
        watcher.join()
    out: list[float] = []
    times = [t for t, _ in seen]
    for where, items in produced.items():
        for offset, at in items:
            k = bisect.bisect_left(times, at)
            while k < len(seen) and seen[k][1].get(where, -1) < offset:
                k += 1
            if k < len(seen):
                out.append((seen[k][0] - at) * 1000)
    return out, achieved


def direct(url: str, catalogue: Catalogue, recs: Sequence[Record], batch: int) -> None:
    """The read-model code alone: decoded batches applied in transactions (no Kafka)."""
    events: list[Incoming] = []
    links = []
    for i, (topic, _key, value, headers) in enumerate(recs):
        events.append(decode_event(catalogue, topic, 0, i, value))
        links.append(link_of({k: v if isinstance(v, bytes) else b"" for k, v in headers}, value))
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            readmodels.migrate(conn, "bench_direct")
        start = time.perf_counter()
        for i in range(0, len(events), batch):
            with conn.transaction():
                readmodels.apply(conn, "bench_direct", events[i : i + batch], links[i : i + batch])
        report(
            f"read models, batches of {batch} (no Kafka)", len(events), time.perf_counter() - start
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50_000, help="records/s, latency phase")
    parser.add_argument("--latency-events", type=int, default=300_000)
    parser.add_argument("--workers", type=int, default=1, help="`likvard project` processes")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    global WORKERS
    WORKERS = args.workers
    print(f"# projection benchmark on {machine()}", flush=True)
    catalogue = Catalogue.load()
    need = max(args.events, args.latency_events)
    recs: list[Record] = list(chained_records(catalogue, need, ""))
    with database() as url, kafka() as bootstrap:
        direct(url, catalogue, recs[: min(args.events, 100_000)], args.batch)
        mine: list[float] = []
        ceilings: list[float] = []
        for run in range(args.runs):
            prefix = f"b{uuid.uuid4().hex[:6]}."
            produce(bootstrap, prefix, recs[: args.events])
            topics = [prefix + t for t in topics_of(recs)]
            steps: list[tuple[str, Any]] = [
                (
                    "likvard",
                    lambda p=prefix, r=run: live(
                        url, bootstrap, p, f"bench_live_{r}", args.events, args.batch
                    ),
                ),
                ("ceiling", lambda t=topics: ceiling(bootstrap, t, args.events, catalogue)),
            ]
            for name, step in steps if run % 2 == 0 else reversed(steps):
                rate = step()
                (mine if name == "likvard" else ceilings).append(rate)
                print(f"  run {run + 1}: {name:<8} {rate:>10.0f} events/s", flush=True)
        m, c = statistics.median(mine), statistics.median(ceilings)
        print(
            f"live projection (batch {args.batch}, {args.workers} worker process(es)),"
            f" {args.events} events, median of {args.runs}:"
            f" {m:.0f} events/s; bare consume + decode {c:.0f} events/s; ratio {m / c:.2f}"
        )
        if args.skip_latency:
            return
        lat, achieved = latency(url, bootstrap, recs[: args.latency_events], args.batch, args.rate)
        print(
            f"latency at {achieved:.0f} records/s offered ({len(lat)} records): produce ->"
            f" read model p50 {percentile(lat, 50):.0f} ms, p99 {percentile(lat, 99):.0f} ms,"
            f" max {max(lat):.0f} ms"
        )


if __name__ == "__main__":
    main()
