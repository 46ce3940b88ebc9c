"""Projection throughput: events/s from Kafka into the read models (live projection worker),
and the read-model code alone (batches applied straight to PostgreSQL).

Run: .venv/bin/python -m bench.bench_projection [--events N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from confluent_kafka import Producer

from bench.common import database, kafka, machine, report
from likvard.codec import Catalogue
from likvard.inbox import Incoming, decode_event
from likvard.topics import SERVICE_TOPICS, ensure_topics, load_topics
from services.projections import readmodels

DISTRICTS = ["nordost", "centrum", "sydvast", "hisingen"]


def synthetic_events(catalogue: Catalogue, n: int) -> list[tuple[str, bytes]]:
    """(case id, single-object bytes) of realistic intake histories, n events in all."""
    out: list[tuple[str, bytes]] = []
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    i = 0
    while len(out) < n:
        case = str(uuid.uuid4())
        district = DISTRICTS[i % 4]
        history: list[tuple[str, dict[str, Any]]] = [
            (
                "IntakeRegistered",
                {
                    "person": f"{i:064x}",
                    "district": district,
                    "substances": ["ALCOHOL"],
                    "referral_source": "SELF",
                    "children_in_household": "YES",
                    "birth_year": 1970,
                },
            ),
            (
                "AssessmentCompleted",
                {
                    "assessment_id": str(uuid.uuid4()),
                    "instrument": "AUDIT",
                    "scores": [{"scale": "total", "value": 20}],
                    "need_level": "HIGH",
                },
            ),
            ("CaseClosed", {"reason": "GOALS_REACHED"}),
            ("CaseReopened", {"reason": "RELAPSE"}),
        ]
        for version, (event_type, data) in enumerate(history, start=1):
            at = t0 + timedelta(days=i % 700, hours=version)
            metadata = {
                "event_id": str(uuid.uuid4()),
                "event_type": event_type,
                "case_id": case,
                "stream_version": version,
                "occurred_at": at,
                "recorded_at": at,
                "producer": "bench",
                "district": district,
                "actor": "bench",
                "correlation_id": case,
                "causation_id": None,
                "traceparent": None,
            }
            out.append((case, catalogue.encode(event_type, {"metadata": metadata, **data})))
        i += 1
    return out[:n]


def count(url: str, schema: str) -> int:
    with psycopg.connect(url) as conn:
        return readmodels.processed_count(conn, schema)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    print(f"# projection benchmark on {machine()}")
    catalogue = Catalogue.load()
    records = synthetic_events(catalogue, args.events)
    topic = SERVICE_TOPICS["intake"]
    with database() as url, kafka() as bootstrap:
        # 1. The read-model code alone: decoded batches applied in transactions.
        events: list[Incoming] = [
            decode_event(catalogue, topic, 0, i, v) for i, (_, v) in enumerate(records)
        ]
        with psycopg.connect(url, autocommit=True) as conn:
            with conn.transaction():
                readmodels.migrate(conn, "bench_direct")
            start = time.perf_counter()
            for i in range(0, len(events), args.batch):
                with conn.transaction():
                    readmodels.apply(conn, "bench_direct", events[i : i + args.batch])
            report(
                f"read models, batches of {args.batch} (no Kafka)",
                len(events),
                time.perf_counter() - start,
            )

        # 2. Kafka -> projection worker -> read models.
        prefix = f"b{uuid.uuid4().hex[:6]}."
        ensure_topics(bootstrap, load_topics(prefix=prefix))
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        for case, value in records:
            while True:
                try:
                    producer.produce(prefix + topic, key=case.encode(), value=value)
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.flush(120)
        env = dict(
            os.environ,
            LIKVARD_DATABASE_URL=url,
            KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            LIKVARD_TOPIC_PREFIX=prefix,
            LIKVARD_CONSUMER_SESSION_TIMEOUT_MS="4000",
            LIKVARD_PROJECTION_BATCH_SIZE=str(args.batch),
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "likvard.cli", "project", "--schema", "bench_live"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while count(url, "bench_live") == 0:
                time.sleep(0.05)
            start, first = time.perf_counter(), count(url, "bench_live")
            deadline = time.monotonic() + 1800
            while (done := count(url, "bench_live")) < len(records):
                if time.monotonic() > deadline:
                    print(f"  stopped waiting at {done} events")
                    break
                time.sleep(0.2)
            report(
                f"Kafka -> projection worker -> read models (batch {args.batch})",
                done - first,
                time.perf_counter() - start,
            )
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
