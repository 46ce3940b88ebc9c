"""Shared set-up for benchmarks: real servers (embedded unless env points elsewhere),
percentiles, and printing figures in one format."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Iterator
from contextlib import contextmanager

from likvard.cli.devstack import broker_from, postgres_from


@contextmanager
def database() -> Iterator[str]:
    with postgres_from("LIKVARD_BENCH_DATABASE_URL") as url:
        yield url


@contextmanager
def kafka() -> Iterator[str]:
    with broker_from() as broker:
        yield broker.bootstrap if broker else os.environ["KAFKA_BOOTSTRAP_SERVERS"]


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
