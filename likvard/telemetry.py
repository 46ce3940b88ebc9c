"""OpenTelemetry set up in one place: traces, metrics and the consumer-lag gauge.

Traces: on in every process; spans go nowhere unless OTEL_EXPORTER_OTLP_ENDPOINT is set
(OTLP over HTTP) or LIKVARD_TRACE_CONSOLE=1 (console, for debugging). The W3C
`traceparent` of a request travels in the stored event metadata and the Kafka headers, so
one trace follows a decision from HTTP through the relay and Kafka to the read models.

Metrics: every process can be scraped by Prometheus at `/metrics` (the HTTP services on
their own port, the workers on their ops port, `likvard.ops`), and pushes them with OTLP as
well with OTEL_METRICS_EXPORTER=otlp. Span and metric attributes never carry personal data: only
pseudonymous ids (case ids, event ids), types, topics and service names.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context, metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_configured = False
_exported = False  # whether any span processor was installed (spans go somewhere)
_metrics_configured = False
_lock = threading.Lock()


def setup_tracing(service_name: str, extra_processor: SpanProcessor | None = None) -> None:
    """Install the tracer provider once per process (later calls only add a processor)."""
    global _configured, _exported
    with _lock:
        if _configured:
            provider = trace.get_tracer_provider()
            if extra_processor is not None and isinstance(provider, TracerProvider):
                provider.add_span_processor(extra_processor)
                _exported = True
            return
        provider = TracerProvider(resource=_resource(service_name))
        processors: list[SpanProcessor] = []
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        if os.environ.get("LIKVARD_TRACE_CONSOLE") == "1":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
        if extra_processor is not None:
            processors.append(extra_processor)
        for processor in processors:
            provider.add_span_processor(processor)
        _exported = bool(processors)
        trace.set_tracer_provider(provider)
        _configured = True


def spans_exported() -> bool:
    """Whether spans go anywhere (an OTLP endpoint, the console, a test's exporter). A span
    that ends no trace anyone sees, made once per event on a hot path, is work for nothing:
    the projection worker's per-event spans took a third of its applying thread with no
    exporter (bench/results/projection.md, 2026-12-05), so it asks this first."""
    return _exported


def _resource(service_name: str) -> Resource:
    return Resource.create({"service.name": f"likvard-{service_name}"})


def setup_metrics(service_name: str) -> None:
    """Install the meter provider once per process: a Prometheus reader (what `/metrics`
    serves) and, with OTEL_METRICS_EXPORTER=otlp and OTEL_EXPORTER_OTLP_ENDPOINT set, an
    OTLP exporter too (for a collector that should receive them pushed)."""
    global _metrics_configured
    with _lock:
        if _metrics_configured:
            return
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        readers: list[MetricReader] = [PrometheusMetricReader()]
        pushed = os.environ.get("OTEL_METRICS_EXPORTER", "").split(",")
        if "otlp" in pushed and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        provider = MeterProvider(resource=_resource(service_name), metric_readers=readers)
        metrics.set_meter_provider(provider)
        _metrics_configured = True


def prometheus_exposition() -> tuple[bytes, str]:
    """The process's metrics in the Prometheus text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(), CONTENT_TYPE_LATEST


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


def current_traceparent() -> str | None:
    """The W3C traceparent of the active span, to store with an event."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def context_from_headers(headers: Mapping[str, str]) -> otel_context.Context:
    """The trace context a caller sent (HTTP headers or a stored traceparent)."""
    return _propagator.extract(dict(headers))


def context_from_traceparent(traceparent: str | None) -> otel_context.Context:
    return _propagator.extract({"traceparent": traceparent} if traceparent else {})


class ConsumerLag:
    """Consumer lag per partition (records behind the end of the partition), as the
    gauge `likvard.consumer.lag` {group, topic, partition}. The consumer loop feeds it
    from watermarks asked of the broker (`set`); `from_statistics` reads librdkafka's."""

    def __init__(self, group: str, meter_: metrics.Meter | None = None) -> None:
        self.group = group
        self._lags: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()
        (meter_ or meter("likvard.consumer")).create_observable_gauge(
            "likvard.consumer.lag",
            callbacks=[self._observe],
            unit="{record}",
            description="Records in a partition not yet consumed by the group, per partition.",
        )

    def set(self, topic: str, partition: int, lag: int) -> None:
        with self._lock:
            self._lags[(topic, partition)] = max(lag, 0)

    def lags(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self._lags)

    def from_statistics(self, stats_json: str) -> None:
        """librdkafka's statistics JSON: topics -> partitions -> consumer_lag (-1: unknown;
        partition -1 is librdkafka's internal one)."""
        try:
            stats = json.loads(stats_json)
        except ValueError:
            return
        for topic, info in (stats.get("topics") or {}).items():
            for key, part in (info.get("partitions") or {}).items():
                lag = part.get("consumer_lag", -1)
                if key != "-1" and isinstance(lag, int) and lag >= 0:
                    self.set(topic, int(key), lag)

    def consumer_config(self, interval_ms: int = 10_000) -> dict[str, object]:
        """The settings that make a confluent-kafka consumer report its lag here."""
        return {"statistics.interval.ms": interval_ms, "stats_cb": self.from_statistics}

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        for (topic, partition), lag in self.lags().items():
            yield Observation(lag, {"group": self.group, "topic": topic, "partition": partition})
