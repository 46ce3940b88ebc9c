"""One trace from a case worker's request to the read model: the HTTP span, the relay's
publish span (parent: the request, from the stored event's metadata), and the projection's
span (parent: the publish span, from the Kafka record's `traceparent` header). The spans
are collected with OpenTelemetry's in-memory exporter; the projection runs in this process
too, on the record read from Kafka. A second part runs the real projection worker as a process
and reads its spans from its console exporter."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from likvard import telemetry
from likvard.codec import Catalogue
from likvard.inbox import decode_event
from likvard.relay import OutboxRelay
from services.projections import readmodels
from services.projections.worker import Projector
from tests.identity import bearer
from tests.support import RunningService, consume, live_worker, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.setup_tracing("test", extra_processor=SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def in_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [
        s for s in exporter.get_finished_spans() if s.context and s.context.trace_id == trace_id
    ]


def ancestry(span: ReadableSpan, trace: list[ReadableSpan]) -> list[ReadableSpan]:
    """The span, its parent, its parent's parent ... up to the root (all must be there)."""
    by_id = {s.context.span_id: s for s in trace if s.context}
    chain = [span]
    while chain[-1].parent is not None:
        chain.append(by_id[chain[-1].parent.span_id])
    return chain


def register(intake: RunningService) -> str:
    r = httpx.post(
        f"{intake.base_url}/cases",
        timeout=30,
        headers=bearer("case-worker", districts=("nordost",), subject="cw-17"),
        json={
            "personal_identity_number": "19121212-1212",
            "district": "nordost",
            "substances": ["ALCOHOL"],
            "referral_source": "SELF",
            "children_in_household": "NO",
        },
    )
    assert r.status_code == 201, r.text
    return str(r.json()["case_id"])


def test_one_trace_from_the_request_through_the_relay_and_kafka_to_the_projection(
    intake: RunningService,
    spans: InMemorySpanExporter,
    database_url: str,
    kafka_bootstrap: str,
    catalogue: Catalogue,
    new_schema: Callable[[str], str],
) -> None:
    case = register(intake)
    (stored,) = intake.store.read_stream(case)
    trace_id = int(stored.metadata["traceparent"].split("-")[1], 16)

    with psycopg.connect(database_url) as conn:
        relay = OutboxRelay(database_url, intake.schema, kafka_bootstrap)
        assert relay.run_once(conn) == 1
    (record,) = consume(kafka_bootstrap, intake.topic, at_least=1)
    event = decode_event(catalogue, record.topic, record.partition, record.offset, record.value)
    projector = Projector(database_url, new_schema("pt"))
    assert projector.apply([event], [record.headers["traceparent"].decode()]) == 1

    trace = in_trace(spans, trace_id)
    by_name = {s.name: s for s in trace}
    project = by_name["project IntakeRegistered"]
    # Parent by parent, from the read model's span up to the request that started it all:
    # project <- publish (the Kafka header) <- the request's spans (the event's metadata).
    names = [s.name for s in ancestry(project, trace)]
    assert names[:2] == ["project IntakeRegistered", f"publish {intake.topic}"]
    assert names[-1] == "POST /cases"
    assert by_name["POST /cases"].parent is None  # the request started the trace
    assert project.attributes is not None
    assert project.attributes["likvard.event_id"] == str(stored.event_id)
    for span in trace:  # pseudonymous ids and types only, never the person
        values = " ".join(str(v) for v in (span.attributes or {}).values())
        assert "19121212" not in values and stored.payload["person"] not in values


def test_the_live_worker_projects_in_the_same_trace(
    intake: RunningService,
    spans: InMemorySpanExporter,
    database_url: str,
    kafka_bootstrap: str,
    topic_prefix: str,
    new_schema: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """The live worker, as `likvard project` runs it, with its spans on the console."""
    case = register(intake)
    (stored,) = intake.store.read_stream(case)
    trace_id = f"0x{stored.metadata['traceparent'].split('-')[1]}"
    with psycopg.connect(database_url) as conn:
        OutboxRelay(database_url, intake.schema, kafka_bootstrap).run_once(conn)
    (publish,) = [
        s
        for s in spans.get_finished_spans()
        if s.name == f"publish {intake.topic}"
        and s.context
        and f"0x{s.context.trace_id:032x}" == trace_id
    ]

    schema = new_schema("pw")
    env = {
        **os.environ,
        "LIKVARD_DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LIKVARD_TOPIC_PREFIX": topic_prefix,
        "LIKVARD_CONSUMER_SESSION_TIMEOUT_MS": "2000",
        "LIKVARD_TRACE_CONSOLE": "1",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    out = tmp_path / "worker.out"
    with live_worker(env, schema, out):
        wait_for(lambda: projected(database_url, schema) == 1, 90, "the worker to project")
        wait_for(lambda: bool(console_spans(out, trace_id)), 30, "the worker's span")
    (span,) = console_spans(out, trace_id)
    assert span["parent_id"] == f"0x{publish.context.span_id:016x}"
    assert span["attributes"]["likvard.event_id"] == str(stored.event_id)


def projected(url: str, schema: str) -> int:
    try:
        with psycopg.connect(url) as conn:
            return readmodels.processed_count(conn, schema)
    except psycopg.errors.UndefinedTable:
        return 0


def console_spans(path: Path, trace_id: str) -> list[dict[str, Any]]:
    """The `project ...` spans of a trace that the console exporter printed (JSON objects
    between other output)."""
    found: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    text = path.read_text(errors="replace")
    at = text.find("{")
    while at != -1:
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at = text.find("{", at + 1)
            continue
        if (
            isinstance(value, dict)
            and str(value.get("name", "")).startswith("project ")
            and value.get("context", {}).get("trace_id") == trace_id
        ):
            found.append(value)
        at = text.find("{", end)
    return found
