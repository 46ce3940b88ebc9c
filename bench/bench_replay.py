"""A full replay (`likvard replay`) of a large history: events/s from Kafka to read models,
with every stream's hash chain verified on the way.

Synthetic care chains over the three service topics (intake: registered, assessed,
closed; referral: requested, across districts for one in four, accepted, intervention
started and ended; follow-up: two scheduled, one completed), encoded and chained exactly as
the relay publishes them (single-object Avro, chain link in the headers).

Each run replays into a fresh schema in its own process (so its peak memory is the replay's
alone), interleaved with a bare consume + fastavro decode of the same records (the ceiling);
medians of `--runs`. For how cost grows, run it for 250000, 1000000 and 3000000 events.

Run: .venv/bin/python -m bench.bench_replay [--events 1000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from fastavro import schemaless_reader

from bench.common import database, kafka, machine, report
from likvard.codec import Catalogue
from likvard.eventstore import GENESIS_HASH, chain_hash
from likvard.topics import SERVICE_TOPICS, ensure_topics, load_topics
from services.projections.replay import Replay

DISTRICTS = ["nordost", "centrum", "sydvast", "hisingen"]
T0 = datetime(2023, 1, 1, tzinfo=UTC)


def _streams(i: int) -> list[tuple[str, str, list[tuple[str, dict[str, Any]]]]]:
    """(service, stream id, [(event type, payload)]) of case number i."""
    case = str(uuid.UUID(int=i + 1))
    district = DISTRICTS[i % 4]
    unit_district = DISTRICTS[(i + (1 if i % 4 == 0 else 0)) % 4]
    referral, intervention = str(uuid.uuid4()), str(uuid.uuid4())
    code = "relapse-prevention-alcohol"
    referral_events: list[tuple[str, dict[str, Any]]] = [
        (
            "ReferralRequested",
            {
                "referral_id": referral,
                "unit_id": "centrum-beroendeteam",
                "intervention_code": code,
                "person_district": district,
                "unit_district": unit_district,
                "recipient_kind": "CITY_SOCIAL_SERVICES",
                "consent_id": None,
                "consent_override": None,
            },
        )
    ]
    if unit_district != district:
        referral_events.append(
            (
                "ReferredAcrossDistrict",
                {
                    "referral_id": referral,
                    "unit_id": "centrum-beroendeteam",
                    "from_district": district,
                    "to_district": unit_district,
                },
            )
        )
    referral_events += [
        ("ReferralAccepted", {"referral_id": referral, "planned_start": None}),
        (
            "InterventionStarted",
            {
                "intervention_id": intervention,
                "referral_id": referral,
                "intervention_code": code,
                "unit_id": "centrum-beroendeteam",
                "guideline_priority": 2,
            },
        ),
        (
            "InterventionEnded",
            {
                "intervention_id": intervention,
                "referral_id": referral,
                "intervention_code": code,
                "started_at": T0 + timedelta(days=i % 700, hours=30),
                "outcome": "COMPLETED_AS_PLANNED",
            },
        ),
    ]
    followups = [str(uuid.uuid4()), str(uuid.uuid4())]
    return [
        (
            "intake",
            case,
            [
                (
                    "IntakeRegistered",
                    {
                        "person": f"{i:064x}",
                        "district": district,
                        "substances": ["ALCOHOL"],
                        "referral_source": "SELF",
                        "children_in_household": "YES" if i % 3 == 0 else "NO",
                        "birth_year": 1970 + i % 40,
                    },
                ),
                (
                    "AssessmentCompleted",
                    {
                        "assessment_id": str(uuid.uuid4()),
                        "instrument": "AUDIT",
                        "scores": [{"scale": "total", "value": 8 + i % 30}],
                        "need_level": ("LOW", "MODERATE", "HIGH")[i % 3],
                    },
                ),
                ("CaseClosed", {"reason": "GOALS_REACHED"}),
            ],
        ),
        ("referral", referral, referral_events),
        (
            "followup",
            case,
            [
                (
                    "FollowUpScheduled",
                    {
                        "followup_id": f,
                        "kind": kind,
                        "due_on": date(2024, 1, 1) + timedelta(days=i % 700),
                        "intervention_id": intervention,
                        "referral_id": referral,
                        "district": district,
                    },
                )
                for f, kind in zip(followups, ("ASI_6_MONTHS", "ASI_12_MONTHS"), strict=True)
            ]
            + [
                (
                    "FollowUpCompleted",
                    {
                        "followup_id": followups[0],
                        "kind": "ASI_6_MONTHS",
                        "days_of_use_last_30": i % 30,
                        "housing": "OWN_HOME",
                        "occupation": "EMPLOYED",
                        "self_rated_health": 1 + i % 5,
                        "goals_reached": "YES" if i % 2 else "PARTLY",
                        "situation_improved": "BETTER",
                    },
                )
            ],
        ),
    ]


Headers = list[tuple[str, str | bytes | None]]
Record = tuple[str, bytes, bytes, Headers]  # topic, key, value, headers


def records(catalogue: Catalogue, n: int, prefix: str) -> Iterator[Record]:
    """n records, each stream chained as the event store chains it."""
    made, i = 0, 0
    while made < n:
        case = str(uuid.UUID(int=i + 1))
        for service, stream_id, events in _streams(i):
            prev = GENESIS_HASH
            for version, (event_type, data) in enumerate(events, start=1):
                hours = version + (0 if service == "intake" else 24)
                at = T0 + timedelta(days=i % 700, hours=hours)
                event_id = str(uuid.uuid4())
                metadata = {
                    "event_id": event_id,
                    "event_type": event_type,
                    "case_id": case,
                    "stream_version": version,
                    "occurred_at": at,
                    "recorded_at": at,
                    "producer": f"likvard-{service}",
                    "district": DISTRICTS[i % 4],
                    "actor": "bench",
                    "correlation_id": case,
                    "causation_id": None,
                    "traceparent": None,
                }
                value = catalogue.encode(event_type, {"metadata": metadata, **data})
                digest = chain_hash(prev, value)
                headers: Headers = [
                    ("event_type", event_type.encode()),
                    ("event_id", event_id.encode()),
                    ("stream_id", stream_id.encode()),
                    ("stream_version", str(version).encode()),
                    ("prev_hash", prev.hex().encode()),
                    ("hash", digest.hex().encode()),
                ]
                prev = digest
                yield prefix + SERVICE_TOPICS[service], case.encode(), value, headers
                made += 1
                if made == n:
                    return
        i += 1


def ceiling(bootstrap: str, topics: list[str], n: int, catalogue: Catalogue) -> float:
    """Events/s of a bare batch consumer that only decodes (fastavro, the writer schema):
    what the broker and the decoder deliver on this machine, from first record to the n-th."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"ceiling-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 100,
            "queued.max.messages.kbytes": 65536,
        }
    )
    meta = consumer.list_topics(timeout=15)
    consumer.assign(
        [TopicPartition(t, p, 0) for t in topics for p in sorted(meta.topics[t].partitions)]
    )
    writers = {w.fingerprint: w.parsed for w in catalogue.writers()}
    got, start = 0, 0.0
    try:
        while got < n:
            for m in consumer.consume(5000, timeout=1.0):
                if m.error() is not None:
                    continue
                if not got:
                    start = time.perf_counter()
                value = m.value() or b""
                schemaless_reader(io.BytesIO(value[10:]), writers[value[2:10]], None)
                got += 1
        return (got - 1) / (time.perf_counter() - start)
    finally:
        consumer.close()


def replay_child(url: str, bootstrap: str, topics: list[str], schema: str, batch: int) -> None:
    """One replay in this (fresh) process: prints its figures and the process's peak memory
    as one JSON line, so the memory is the replay's alone."""
    run = Replay(url, bootstrap, topics, schema, batch_size=batch)
    try:
        result = run.run()
    finally:
        run.close()
    print(
        json.dumps(
            {
                "projected": result.projected,
                "breaks": len(result.breaks),
                "streams": result.streams,
                "seconds": result.seconds - result.checksum_seconds,
                "checksum_seconds": result.checksum_seconds,
                "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                # the largest of its processes, when the replay ran in several
                "rss_part_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def replay(url: str, bootstrap: str, topics: list[str], schema: str, batch: int) -> dict[str, Any]:
    """`replay_child` in its own process."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_replay", "--child", schema, "--batch", str(batch)],
        env=dict(
            os.environ, BENCH_URL=url, BENCH_BOOTSTRAP=bootstrap, BENCH_TOPICS=",".join(topics)
        ),
        check=True,
        capture_output=True,
        text=True,
    )
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one replay into this schema
    args = parser.parse_args()
    if args.child:
        env = os.environ
        topics = env["BENCH_TOPICS"].split(",")
        replay_child(env["BENCH_URL"], env["BENCH_BOOTSTRAP"], topics, args.child, args.batch)
        return
    print(f"# replay benchmark on {machine()}", flush=True)
    catalogue = Catalogue.load()
    with database() as url, kafka() as bootstrap:
        prefix = f"r{uuid.uuid4().hex[:6]}."
        ensure_topics(bootstrap, load_topics(prefix=prefix))
        producer = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000}
        )
        start = time.perf_counter()
        for topic, key, value, headers in records(catalogue, args.events, prefix):
            while True:
                try:
                    producer.produce(topic, key=key, value=value, headers=headers)
                    break
                except BufferError:
                    producer.poll(0.05)
        assert producer.flush(300) == 0, "not every record was delivered"
        report("encode, chain and produce (setup)", args.events, time.perf_counter() - start)

        topics = [prefix + t for t in SERVICE_TOPICS.values()]
        mine: list[float] = []
        ceilings: list[float] = []
        figures: list[dict[str, Any]] = []
        for run in range(args.runs):
            steps = ["likvard", "ceiling"] if run % 2 == 0 else ["ceiling", "likvard"]
            for step in steps:
                if step == "ceiling":
                    rate = ceiling(bootstrap, topics, args.events, catalogue)
                    ceilings.append(rate)
                    print(f"  run {run + 1}: ceiling  {rate:>10.0f} events/s", flush=True)
                    continue
                f = replay(url, bootstrap, topics, f"bench_replay_{run}", args.batch)
                assert f["breaks"] == 0, f
                assert f["projected"] == args.events, (f["projected"], args.events)
                figures.append(f)
                mine.append(f["projected"] / f["seconds"])
                print(
                    f"  run {run + 1}: likvard  {mine[-1]:>10.0f} events/s  {f['seconds']:.1f} s"
                    f" (+ checksums {f['checksum_seconds']:.1f} s), {f['streams']} streams,"
                    f" peak RSS {f['rss_mib']:.0f} MiB (largest part process"
                    f" {f['rss_part_mib']:.0f} MiB)",
                    flush=True,
                )
        m, c = statistics.median(mine), statistics.median(ceilings)
        seconds = statistics.median(f["seconds"] for f in figures)
        rss = max(f["rss_mib"] for f in figures)
        print(
            f"replay (read, verify chain, project; batch {args.batch}), {args.events} events,"
            f" median of {args.runs}: {m:.0f} events/s ({seconds:.1f} s); bare consume + decode"
            f" {c:.0f} events/s; ratio {m / c:.2f}; peak RSS {rss:.0f} MiB,"
            f" {figures[0]['streams']} streams"
        )


if __name__ == "__main__":
    main()
