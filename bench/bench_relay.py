"""Relay throughput: a filled outbox drained to the broker, events/s and batch latency.

Run: .venv/bin/python -m bench.bench_relay [--events N] [--batch N]
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid

import psycopg
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from psycopg_pool import ConnectionPool

from bench.common import database, kafka, machine, report
from likvard.codec import Catalogue
from likvard.eventstore import EventStore
from likvard.relay import OutboxRelay
from likvard.topics import SERVICE_TOPICS, ensure_topics, load_topics
from tests.support import closed, registered, reopened


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=60000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--live-events", type=int, default=2000)
    args = parser.parse_args()
    print(f"# relay benchmark on {machine()}")
    with database() as url, kafka() as bootstrap:
        prefix = f"b{uuid.uuid4().hex[:6]}."
        ensure_topics(bootstrap, load_topics(prefix=prefix))
        pool = ConnectionPool(url, min_size=1, max_size=4, open=True)
        store = EventStore(
            pool,
            "bench_relay",
            Catalogue.load(),
            producer="bench",
            topic=prefix + SERVICE_TOPICS["intake"],
        )
        store.migrate()
        start = time.perf_counter()
        for _ in range(args.events // 3):
            store.append(str(uuid.uuid4()), 0, [registered(), closed(), reopened()])
        report(
            "fill outbox (3 events/append, 1 thread)",
            args.events // 3 * 3,
            time.perf_counter() - start,
        )
        relay = OutboxRelay(url, "bench_relay", bootstrap, batch_size=args.batch)
        latencies = []
        total = 0
        start = time.perf_counter()
        with psycopg.connect(url) as conn:
            while True:
                t = time.perf_counter()
                n = relay.run_once(conn)
                if n == 0:
                    break
                latencies.append((time.perf_counter() - t) * 1000)
                total += n
        report(
            f"relay outbox -> Kafka (batch {args.batch}), per-batch latency",
            total,
            time.perf_counter() - start,
            latencies,
        )
        live_latency(url, bootstrap, store, args.live_events)
        pool.close()


def live_latency(url: str, bootstrap: str, store: EventStore, n: int) -> None:
    """Append -> visible to a Kafka consumer, with the relay running as in production
    (woken by NOTIFY). Appends are paced at ~500/s so the figure is latency, not backlog."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    partitions = list(admin.list_topics(store.topic, timeout=10).topics[store.topic].partitions)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4()}",
            "fetch.wait.max.ms": 5,
            "enable.auto.commit": False,
        }
    )
    ends = {
        p: consumer.get_watermark_offsets(TopicPartition(store.topic, p))[1] for p in partitions
    }
    consumer.assign([TopicPartition(store.topic, p, ends[p]) for p in partitions])
    appended: dict[str, float] = {}
    seen: dict[str, float] = {}
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            msg = consumer.poll(0.05)
            if msg is not None and not msg.error():
                headers = dict(msg.headers() or [])
                event_id = headers.get("event_id")
                if isinstance(event_id, bytes):
                    seen[event_id.decode()] = time.perf_counter()

    relay = OutboxRelay(url, store.schema, bootstrap, idle_wait=1.0)
    relay_thread = threading.Thread(target=relay.run, args=(stop,))
    reader = threading.Thread(target=read)
    relay_thread.start()
    reader.start()
    try:
        warm = [
            str(store.append(str(uuid.uuid4()), 0, [registered()])[0].event_id) for _ in range(20)
        ]
        deadline = time.monotonic() + 30  # warm-up: producer connected, metadata fetched
        while not set(warm) <= seen.keys() and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(n):
            stored = store.append(str(uuid.uuid4()), 0, [registered()])
            appended[str(stored[0].event_id)] = time.perf_counter()
            time.sleep(0.002)  # pacing, not synchronisation
        deadline = time.monotonic() + 60
        while len(seen.keys() & appended.keys()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        relay_thread.join(30)
        reader.join(30)
        consumer.close()
    latencies = [(seen[e] - t) * 1000 for e, t in appended.items() if e in seen]
    report("live: append committed -> consumed from Kafka", len(latencies), None, latencies)
    if len(latencies) < n:
        print(f"  {n - len(latencies)} events not seen within the deadline")


if __name__ == "__main__":
    main()
