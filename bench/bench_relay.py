"""Relay throughput: a filled outbox drained to the broker, events/s and batch latency.

Run: .venv/bin/python -m bench.bench_relay [--events N] [--batch N]
"""

from __future__ import annotations

import argparse
import time
import uuid

import psycopg
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
        pool.close()


if __name__ == "__main__":
    main()
