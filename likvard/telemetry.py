"""OpenTelemetry set up in one place.

Tracing is on in every process; spans go nowhere unless OTEL_EXPORTER_OTLP_ENDPOINT is set
(OTLP over HTTP) or LIKVARD_TRACE_CONSOLE=1 (console, for debugging); metrics likewise
go to OTLP when it is set. The W3C
`traceparent` of a request travels in the stored event metadata and the Kafka headers, so
one trace follows a decision from HTTP to the read models. Span attributes never carry
personal data: only ids that are pseudonymous (case ids, event ids) and types.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import context as otel_context, metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()
_configured = False


def setup_tracing(service_name: str, extra_processor: SpanProcessor | None = None) -> None:
    """Install the tracer provider once per process (later calls only add a processor)."""
    global _configured
    if _configured:
        provider = trace.get_tracer_provider()
        if extra_processor is not None and isinstance(provider, TracerProvider):
            provider.add_span_processor(extra_processor)
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"likvard-{service_name}"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if os.environ.get("LIKVARD_TRACE_CONSOLE") == "1":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    if extra_processor is not None:
        provider.add_span_processor(extra_processor)
    trace.set_tracer_provider(provider)
    _configured = True


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


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


_metrics_configured = False


def setup_metrics(service_name: str) -> None:
    """Install the meter provider once per process. Metrics are exported with OTLP when
    OTEL_EXPORTER_OTLP_ENDPOINT is set; otherwise instruments count into nothing."""
    global _metrics_configured
    if _metrics_configured:
        return
    readers: list[MetricReader] = []
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    resource = Resource.create({"service.name": f"likvard-{service_name}"})
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    _metrics_configured = True


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)
