"""What operations see of a process: JSON log lines with trace ids and no personal data,
the ops port's health and metrics, consumer lag, and `likvard probe`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from likvard import telemetry
from likvard.logs import JsonFormatter, TextFormatter
from likvard.ops import Heartbeat, OpsServer
from likvard.telemetry import ConsumerLag


def record(message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("likvard.test", logging.WARNING, __file__, 1, message, (), exc_info)


def test_a_json_log_line_carries_the_trace_and_never_an_exceptions_text() -> None:
    tracer = TracerProvider().get_tracer("test")
    number = "19121212" + "-1212"  # as data, not in the source line a traceback shows
    try:
        raise ValueError(f"duplicate key: person {number}")
    except ValueError as exc:
        caught = exc
    with tracer.start_as_current_span("work") as span:
        line = JsonFormatter("intake").format(record("could not store", caught))
    entry = json.loads(line)
    assert entry["message"] == "could not store"
    assert entry["service"] == "intake" and entry["level"] == "WARNING"
    assert entry["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert entry["span_id"] == format(span.get_span_context().span_id, "016x")
    assert entry["exception"] == "ValueError"
    assert "test_observability.py" in entry["where"]
    assert "19121212" not in line  # the exception's text may quote personal data
    assert "19121212" not in TextFormatter().format(record("could not store", caught))


def test_outside_a_span_there_is_no_trace_id() -> None:
    assert "trace_id" not in json.loads(JsonFormatter("relay").format(record("idle")))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=5) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_ops_port_answers_health_readiness_and_metrics() -> None:
    telemetry.setup_metrics("test")
    telemetry.meter("test.ops").create_counter("likvard.test.ops.turns").add(3)
    clock, ready = Clock(), [True]
    heartbeat = Heartbeat(clock)
    server = OpsServer(0, heartbeat, lambda: ready[0], host="127.0.0.1", liveness_seconds=60)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (200, "ready\n")
        status, metrics = get(f"{base}/metrics")
        assert status == 200
        assert any(
            line.startswith("likvard_test_ops_turns_total{") and line.endswith(" 3.0")
            for line in metrics.splitlines()
        )
        assert get(f"{base}/nothing")[0] == 404

        ready[0] = False  # a dependency does not answer: alive, not ready
        assert get(f"{base}/healthz")[0] == 200 and get(f"{base}/readyz")[0] == 503
        ready[0] = True
        clock.now += 61  # the loop has not turned for a minute: stuck
        assert get(f"{base}/healthz") == (503, "stuck\n") and get(f"{base}/readyz")[0] == 503
        heartbeat.beat()
        assert get(f"{base}/healthz")[0] == 200
    finally:
        server.stop()


def test_consumer_lag_comes_from_librdkafka_statistics_per_partition() -> None:
    reader = InMemoryMetricReader()
    lag = ConsumerLag("likvard-referral", MeterProvider(metric_readers=[reader]).get_meter("t"))
    lag.from_statistics(
        json.dumps(
            {
                "topics": {
                    "likvard.intake.v1": {
                        "partitions": {
                            "0": {"consumer_lag": 12},
                            "1": {"consumer_lag": -1},  # not known yet: not reported
                            "-1": {"consumer_lag": 5},  # librdkafka's internal partition
                        }
                    }
                }
            }
        )
    )
    lag.from_statistics("not json")  # ignored, the last figures stay
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        (dict(p.attributes or {}), getattr(p, "value", None))
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "likvard.consumer.lag"
        for p in m.data.data_points
    ]
    assert points == [
        ({"group": "likvard-referral", "topic": "likvard.intake.v1", "partition": 0}, 12)
    ]
    assert lag.consumer_config()["stats_cb"] == lag.from_statistics


def probe(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "likvard.cli", "probe", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_likvard_probe_is_the_health_check_of_every_role(tmp_path: Path) -> None:
    server = OpsServer(0, Heartbeat(), host="127.0.0.1").start()
    port = str(server.port)
    note = tmp_path / "probe"
    try:
        assert probe("worker", LIKVARD_OPS_PORT=port).returncode == 0
        assert probe("worker", "--path", "/healthz", LIKVARD_OPS_PORT=port).returncode == 0
        missing = probe("worker", "--path", "/missing", LIKVARD_OPS_PORT=port)
        assert missing.returncode == 1 and "answered 404" in missing.stderr
        # With no target: where the container's process said it answers.
        nothing = probe(LIKVARD_PROBE_FILE=str(note))
        assert nothing.returncode == 1 and "no process here" in nothing.stderr
        note.write_text(f"http://127.0.0.1:{port}")
        assert probe(LIKVARD_PROBE_FILE=str(note)).returncode == 0
    finally:
        server.stop()
    down = probe("worker", LIKVARD_OPS_PORT=port)
    assert down.returncode == 1 and "does not answer" in down.stderr
    unset = {k: v for k, v in os.environ.items() if k != "LIKVARD_OPS_PORT"}
    r = subprocess.run(
        [sys.executable, "-m", "likvard.cli", "probe", "worker"],
        env=unset,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "LIKVARD_OPS_PORT is not set" in r.stderr


@pytest.mark.integration
def test_a_service_serves_its_request_metrics(intake: object) -> None:
    from tests.support import RunningService

    assert isinstance(intake, RunningService)
    from tests.identity import bearer

    unknown = f"{intake.base_url}/cases/{'0' * 8}-0000-0000-0000-{'0' * 12}"
    assert get(unknown, bearer("case-worker", districts=["nordost"]))[0] == 404
    assert get(f"{intake.base_url}/metrics")[0] == 401  # metrics are for ops only
    status, text = get(f"{intake.base_url}/metrics", bearer("ops"))
    assert status == 200
    series = [
        line
        for line in text.splitlines()
        if line.startswith("http_server_request_duration_seconds_count")
        and 'http_route="/cases/{case_id}"' in line
        and 'http_response_status_code="404"' in line
    ]
    assert series and float(series[0].rsplit(" ", 1)[1]) >= 1
