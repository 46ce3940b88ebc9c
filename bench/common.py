"""Shared set-up for benchmarks: real servers (embedded unless env points elsewhere),
percentiles, and printing figures in one format."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Iterator
from contextlib import contextmanager

from likvard.devstack import EmbeddedPostgres, TansuBroker


@contextmanager
def database() -> Iterator[str]:
    url = os.environ.get("LIKVARD_BENCH_DATABASE_URL")
    if url:
        yield url
        return
    pg = EmbeddedPostgres()
    try:
        yield pg.start()
    finally:
        pg.stop()


@contextmanager
def kafka() -> Iterator[str]:
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if bootstrap:
        yield bootstrap
        return
    broker = TansuBroker()
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def report(
    name: str, count: int, seconds: float | None, latencies_ms: list[float] | None = None
) -> None:
    rate = f"{count / seconds:>10.0f} events/s" if seconds else " " * 19
    line = f"{name:<48} {count:>8} events  {rate}"
    if latencies_ms:
        p50, p99 = percentile(latencies_ms, 50), percentile(latencies_ms, 99)
        mean = statistics.fmean(latencies_ms)
        line += f"  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms  mean {mean:6.2f} ms"
    print(line, flush=True)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
